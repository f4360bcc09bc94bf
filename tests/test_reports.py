"""HTML reports on a small synthetic derivatives folder with planted numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib
import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from pipeline import reports
from pipeline.derivatives import write_tsv

ATLAS = "Toy"
NETWORKS = ["Visual", "DefaultMode", "Salience", "DefaultMode", "Salience", "DefaultMode",
            "Visual", "DefaultMode", "Salience"]  # interleaved on purpose: the report reorders
NAMES = [f"P{i:02d}" for i in range(len(NETWORKS))]
SESSIONS = [("preECT", "pre"), ("postECT", "post"), ("maint", "maintenance")]
FD_THRESHOLD = 0.4
CRASH_MESSAGE = "ValueError: planted failure in the diffusion step"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def _atlas_table() -> pd.DataFrame:
    return pd.DataFrame({"index": np.arange(1, len(NAMES) + 1), "name": NAMES,
                         "network": NETWORKS})


def _relmat(path: Path, matrix: np.ndarray) -> None:
    table = pd.DataFrame(matrix, columns=NAMES)
    table.insert(0, "Node", NAMES)
    write_tsv(path, table)


def _nifti(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nb.save(nb.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), path)


def _trajectories(rng: np.random.Generator, klass: str, group: str) -> pd.DataFrame:
    rows = []
    for metric, net_a, net_b in (("connectivity", "DefaultMode", "DefaultMode"),
                                 ("connectivity", "Salience", "DefaultMode"),
                                 ("connectivity", "Visual", "Visual"),
                                 ("hippocampal_volume", "", "")):
        base = rng.normal(0.3, 0.05)
        for order, (session, role) in enumerate(SESSIONS, start=1):
            rows.append({
                "metric": metric, "network_a": net_a, "network_b": net_b,
                "session": f"ses-{session}", "role": role, "order": order,
                "value": round(base + 0.1 * order, 4), "se": 0.02,
                "maintenance_class": klass, "p_regression": 0.82, "p_stabilisation": 0.13,
                "p_continued_remodelling": 0.05, "acute_change": 0.1, "group": group,
            })
    return pd.DataFrame(rows)


def _session(root: Path, subject: str, session: str, rng: np.random.Generator,
             *, anat: bool = True, func: bool = True, dwi: bool = True) -> dict:
    """One processed session; returns the planted numbers the report must show."""
    ses = root / f"sub-{subject}" / f"ses-{session}"
    stem = f"sub-{subject}_ses-{session}"
    planted: dict = {}
    if anat:
        shape = (12, 14, 10)
        grid = np.stack(np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij"))
        radius = np.sqrt((grid**2).sum(axis=0))
        mask = radius < 4.5
        t1 = np.where(mask, 100 + 20 * rng.random(shape), 5 * rng.random(shape))
        _nifti(ses / "anat" / f"{stem}_desc-preproc_T1w.nii.gz", t1)
        _nifti(ses / "anat" / f"{stem}_desc-brain_mask.nii.gz", mask.astype(float))
        _nifti(ses / "anat" / f"{stem}_label-GM_probseg.nii.gz", (radius > 3) & mask)
        _nifti(ses / "anat" / f"{stem}_label-WM_probseg.nii.gz", radius <= 3)
    if func:
        n = len(NAMES)
        a = rng.normal(size=(n, n))
        fc = np.corrcoef(a)
        _relmat(ses / "func" / f"{stem}_task-rest_space-MNI152NLin2009aSym_atlas-{ATLAS}"
                "_stat-pearsoncorrelation_relmat.tsv", fc)
        fd = rng.uniform(0.05, 0.3, 40)
        fd[[10, 25, 26]] = [0.9, 1.1, 0.6]
        censored = (fd > FD_THRESHOLD).astype(int)
        fd[0] = np.nan
        write_tsv(ses / "func" / f"{stem}_task-rest_space-MNI152NLin2009aSym_atlas-{ATLAS}"
                  "_outliers.tsv", pd.DataFrame({
                      "run": [1] * 20 + [2] * 20, "volume": list(range(20)) * 2,
                      "framewise_displacement": fd, "non_steady_state": [0] * 40,
                      "censored": censored}))
        qc = pd.DataFrame([{"atlas": ATLAS, "n_runs": 2, "n_volumes": 40, "n_dummy": 0,
                            "n_censored": 3, "percent_censored": 7.5,
                            "remaining_minutes": 1.234, "mean_fd": float(np.nanmean(fd)),
                            "max_fd": 1.1, "tsnr_median": 55.5, "n_dropped_parcels": 0,
                            "qc_pass": 0, "qc_reason": "only 1.234 min of data left"}])
        qc_path = ses / "func" / (f"{stem}_task-rest_space-MNI152NLin2009aSym_atlas-{ATLAS}"
                                  "_desc-qc_bold.tsv")
        write_tsv(qc_path, qc)
        qc_path.with_name(qc_path.name.replace(".tsv", ".json")).write_text(
            json.dumps({"FDThreshold": FD_THRESHOLD}))
        series = pd.DataFrame(rng.normal(size=(37, n)), columns=NAMES)
        write_tsv(ses / "func" / f"{stem}_task-rest_space-MNI152NLin2009aSym_atlas-{ATLAS}"
                  "_stat-mean_timeseries.tsv", series)
        planted |= {"mean_fd": f"mean FD {np.nanmean(fd):.3f} mm", "n_censored": 3}
    if dwi:
        sc = np.triu(rng.integers(0, 50, size=(len(NAMES),) * 2), 1).astype(float)
        sc = sc + sc.T
        path = ses / "dwi" / f"{stem}_space-T1w_atlas-{ATLAS}_stat-streamlinecount_relmat.tsv"
        _relmat(path, sc)
        path.with_name(path.name.replace(".tsv", ".json")).write_text(json.dumps(
            {"n_streamlines": 5000, "fraction_assigned_two_parcels": 0.6123,
             "FibreModel": "csd"}))
        write_tsv(ses / "dwi" / f"{stem}_atlas-{ATLAS}_desc-qc_dwi.tsv", pd.DataFrame([{
            "atlas": ATLAS, "n_volumes": 33, "mean_fd": 0.21, "n_streamlines": 5000,
            "fraction_assigned_two_parcels": 0.6123}]))
        planted["sc_total"] = float(np.triu(sc, 1).sum())
    return planted


@pytest.fixture
def derivatives(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, dict]:
    root = tmp_path / "out"
    planted = {}
    subjects = {"01": ("patient", "regression"), "c1": ("control", "none"),
                "c2": ("control", "none")}
    for subject, (group, klass) in subjects.items():
        write_tsv(root / f"sub-{subject}" / f"sub-{subject}_sessions.tsv", pd.DataFrame(
            {"session_id": [f"ses-{s}" for s, _ in SESSIONS],
             "role": [r for _, r in SESSIONS], "order": [1, 2, 3]}))
        traj = _trajectories(rng, klass, group)
        write_tsv(root / f"sub-{subject}" / f"sub-{subject}_desc-trajectories_metrics.tsv",
                  traj)
        planted[subject] = traj
    for session, _ in SESSIONS[:2]:
        planted[session] = _session(root, "01", session, rng)
    # maintenance: diffusion only, so anatomy, BOLD and FC are "not available"
    planted["maint"] = _session(root, "01", "maint", rng, anat=False, func=False)
    cohort = pd.DataFrame([{"participant_id": f"sub-{s}", "session_id": f"ses-{ses}",
                            "role": role, "group": g}
                           for s, (g, _) in subjects.items() for ses, role in SESSIONS])
    write_tsv(root / "group" / "cohort_sessions.tsv", cohort)
    write_tsv(root / "group" / "group_desc-lme_stats.tsv", pd.DataFrame({
        "metric": ["connectivity", "connectivity", "hippocampal_volume"],
        "network_a": ["DefaultMode", "Salience", ""], "network_b": ["DefaultMode",
                                                                     "DefaultMode", ""],
        "term": ["role[post]"] * 3, "effect": [-0.123, 0.045, 0.0031],
        "p": [0.0004, 0.2, 0.01], "q": [0.0012, 0.3, 0.015]}))
    logs = root / "logs"
    (logs / "crash-20260101").mkdir(parents=True)
    (logs / "CITATION.md").write_text("Preprocessing used Trajectome (https://example.org).\n")
    (logs / "crash-20260101" / "crash-001.txt").write_text(
        "Node: trajectome_wf.sub_01_wf.dwi_wf.ses_postECT.tracking\n"
        f"Traceback (most recent call last):\n  File x\n{CRASH_MESSAGE}\n")
    (logs / "crash-20260101" / "crash-002.txt").write_text(
        "Node: trajectome_wf.sub_c1_wf.anat_wf.preproc\nRuntimeError: other subject\n")
    return root, planted


def _report(root: Path) -> str:
    path = reports.write_subject_report(root, "sub-01", atlas_tables={ATLAS: _atlas_table()})
    assert path == root / "sub-01.html"
    return path.read_text()


def _no_remote_resources(text: str) -> None:
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert not re.search(r"""url\(\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert not re.search(r"<(?:script|link|iframe)\b", text, re.I)


def test_subject_report_sections_figures_and_numbers(derivatives):
    root, planted = derivatives
    text = _report(root)
    for heading in ("Session preECT (pre)", "Session postECT (post)",
                    "Session maint (maintenance)", "<h3>Anatomy</h3>", "<h3>BOLD QC</h3>",
                    "<h3>Connectomes</h3>", "<h3>Tractography</h3>", "<h3>QC flags</h3>",
                    '<h2>Trajectories</h2>', "<h2>Methods</h2>", "<h2>Errors</h2>"):
        assert heading in text
    # pre and post: anatomy, FD, carpet, FC, SC; maintenance: SC only; trajectories: the 3
    # key metrics (DMN within, salience-DMN, hippocampus), not the Visual control metric
    assert text.count("<svg") == 5 + 5 + 1 + 3
    assert text.count("data:image/png;base64,") >= 2 * 8 + 1  # 5 slices + carpet + 2 matrices
    assert "DefaultMode · Salience" not in text and "Visual · Visual" not in text
    for label in ("connectivity · DefaultMode", "connectivity · Salience · DefaultMode",
                  "hippocampal_volume"):
        assert f"<b>{label}</b>" in text
    assert "connectivity · Visual</b>" not in text
    # planted numbers from the tables
    assert planted["preECT"]["mean_fd"] in text and planted["postECT"]["mean_fd"] in text
    assert "3 censored; threshold 0.4 mm." in text
    assert f"threshold {FD_THRESHOLD:g} mm" in text  # legend of the FD plot
    for session in ("preECT", "postECT", "maint"):
        assert f"<td>{planted[session]['sc_total']:.4g}</td>" in text
    assert "<td>0.6123</td>" in text and "<td>5000</td>" in text
    assert "only 1.234 min of data left" in text and "FLAG" in text
    assert text.count('<tr class="flag">') == 2 + 1  # two BOLD QC flags, one crash
    # trajectory: class, probability and the values of the subject
    assert '<span class="class">regression</span> (p = 0.82)' in text
    assert "regression 0.82, stabilisation 0.13, continued_remodelling 0.05" in text
    dmn = planted["01"].query("metric == 'connectivity' and network_a == 'DefaultMode'")
    values = ", ".join(f"{s.removeprefix('ses-')}: {v:.4g}"
                       for s, v in zip(dmn["session"], dmn["value"], strict=True))
    assert f"Values: {values}" in text
    assert "controls ±1 SD" in text  # two controls: band drawn
    # matrices ordered by network: ticks in atlas order of first appearance
    assert re.search(r"Visual.*DefaultMode.*Salience", text, re.DOTALL)
    assert "Preprocessing used Trajectome (https://example.org)." in text
    assert CRASH_MESSAGE in text and "other subject" not in text
    # maintenance has no anatomy or BOLD: said, not crashed
    assert text.count("not available") >= 4
    _no_remote_resources(text)


def test_subject_report_is_deterministic_and_small(derivatives):
    root, _ = derivatives
    first = _report(root).encode()
    # the caller's matplotlib settings (random SVG hash salt, other fonts) must not leak in
    with matplotlib.rc_context({"svg.hashsalt": None, "font.size": 17, "axes.titlesize": 20}):
        second = _report(root).encode()
    assert first == second
    assert len(second) < 1_000_000
    assert not list(root.glob(".sub-01.html.*"))  # atomic write left no temporary


def test_missing_inputs_say_not_available(tmp_path):
    (tmp_path / "sub-02" / "ses-a").mkdir(parents=True)
    text = reports.write_subject_report(tmp_path, "02").read_text()
    for what in ("Preprocessed T1w", "Framewise displacement", "Carpet plot",
                 "Connectivity matrices", "Tractography summary", "QC tables", "Trajectories",
                 "Methods text"):
        assert f"{what} (" in text and "not available" in text
    assert "No crash reports" in text and "<svg" not in text
    # nothing at all for the subject: still a report
    assert "Sessions (no sub-09" in reports.write_subject_report(tmp_path, "09").read_text()
    group = reports.write_group_report(tmp_path / "empty").read_text()
    for what in ("Cohort sessions", "Mixed-model statistics", "Trajectories of the cohort",
                 "Maintenance classes"):
        assert f"{what} (" in group


def test_unreadable_file_becomes_a_message(derivatives):
    root, _ = derivatives
    bad = next((root / "sub-01" / "ses-preECT" / "func").glob("*pearsoncorrelation_relmat.tsv"))
    bad.write_text("Node\tP00\nP00\t1\nP01\t2\n")
    text = _report(root)
    assert "could not be drawn (ValueError" in text and "not a square relmat" in text
    assert text.count("<svg") == 5 + 5 + 1 + 3 - 1


def test_group_report(derivatives):
    root, _ = derivatives
    text = reports.write_group_report(root).read_text()
    for heading in ("Cohort and QC", "Mixed models", "Effects by role", "Maintenance classes",
                    "<h2>Methods</h2>", "<h2>Errors</h2>"):
        assert heading in text
    assert "3 subjects, 9 sessions." in text
    assert "2 of 5 QC rows flagged." in text
    # q < 0.05 highlighted, sorted by q
    assert "2 with q &lt; 0.05 (highlighted)" in text
    assert text.count('<tr class="highlight">') == 2 and "<td>-0.123</td>" in text
    assert text.index("<td>0.0012</td>") < text.index("<td>0.015</td>") < text.index(
        "<td>0.3</td>")
    # effect plots for the three metrics of the stats table, most significant first
    assert text.count("<svg") == 3
    assert text.index("connectivity · DefaultMode: 3 subjects") < text.index(
        "hippocampal_volume: 3 subjects")
    # class counts: one regression (sub-01) and two 'none' (controls) per metric
    classes = text[text.index('id="classes"'):text.index('id="methods"')]
    assert classes.count("<td>2</td><td>1</td>") == 4  # columns: none, regression
    assert "other subject" in text and CRASH_MESSAGE in text
    _no_remote_resources(text)
    assert reports.write_group_report(root).read_bytes() == text.encode()


def test_load_trajectories_wide_equals_long(tmp_path):
    wide = pd.DataFrame({"metric": ["connectivity"], "network_a": ["Salience"],
                         "network_b": ["FrontoParietal"], "pre": [0.1], "post": [0.3],
                         "maintenance": [0.25], "post_se": [0.01],
                         "maintenance_class": ["stabilisation"], "p_stabilisation": [0.7],
                         "p_regression": [0.3]})
    write_tsv(tmp_path / "w.tsv", wide)
    points, summary = reports.load_trajectories(tmp_path / "w.tsv")
    assert list(points["role"]) == ["pre", "post", "maintenance"]
    np.testing.assert_allclose(points["value"], [0.1, 0.3, 0.25])
    np.testing.assert_allclose(points["se"], [np.nan, 0.01, np.nan])
    row = summary.iloc[0]
    assert row["label"] == "connectivity · Salience · FrontoParietal"
    assert row["maintenance_class"] == "stabilisation" and row["class_probability"] == 0.7


def test_control_ranges_match_numpy(rng):
    values = rng.normal(size=(4, 3))
    cohort = pd.DataFrame([{"label": "m", "role": role, "subject": f"s{i}",
                            "group": "control" if i < 3 else "patient", "value": values[i, j]}
                           for i in range(4) for j, role in enumerate(("pre", "post", "x"))])
    ranges = reports.control_ranges(cohort).set_index("role")
    np.testing.assert_allclose(ranges.loc["pre", "mean"], values[:3, 0].mean())
    np.testing.assert_allclose(ranges.loc["post", "sd"], values[:3, 1].std(ddof=1))
    assert reports.control_ranges(cohort[cohort["subject"] != "s1"].assign(
        group=lambda t: t["group"].where(t["subject"] != "s2", "patient"))).empty
