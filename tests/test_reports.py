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

from pipeline import groupstats, longitudinal, reports
from pipeline.derivatives import write_json, write_tsv

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
        # the atlas brought to the T1w by the MNI registration: left/right halves of the brain
        halves = np.where(mask, 1 + (grid[0] > 0), 0)
        _nifti(ses / "anat" / f"{stem}_atlas-{ATLAS}_space-T1w_dseg.nii.gz", halves)
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


def build_derivatives(root: Path, rng: np.random.Generator) -> dict:
    """A patient (three sessions, the last diffusion-only) and two controls, their
    trajectories, the group tables, logs and two crash files; returns the planted numbers."""
    planted: dict = {}
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
    # class counts as the group level writes them: from every subject's changes, patients only
    long = pd.concat([planted[s].assign(subject=s) for s in subjects], ignore_index=True)
    long = long.rename(columns={"network_a": "network"})[
        ["subject", "session", "role", "order", "group", "metric", "network", "network_b",
         "value", "se"]]
    changes = longitudinal.change_table(longitudinal.prepare_long_table(long))
    classes = root / groupstats.GROUP_OUTPUTS["class_counts"]
    write_tsv(classes, groupstats.class_counts(changes))
    write_json(classes.with_suffix(".json"), {"IncludeFlagged": False})
    write_tsv(root / "group" / "group_desc-lme_stats.tsv", pd.DataFrame({
        "metric": ["connectivity", "connectivity", "hippocampal_volume", "coupling",
                   "coupling"],
        "network_a": ["DefaultMode", "Salience", "", "", ""],
        "network_b": ["DefaultMode", "DefaultMode", "", "", ""], "node": [""] * 5,
        "model": ["patient"] * 3 + ["control"] * 2,
        "term": ["role[post]"] * 5, "effect": [-0.123, 0.045, 0.0031, np.nan, np.nan],
        "p": [0.0004, 0.2, 0.01, np.nan, np.nan], "q": [0.0012, 0.3, 0.015, np.nan, np.nan],
        "converged": [True, True, True, False, False],
        "skipped": ["", "", "", *["control: fewer than 3 subjects with a pre-ECT value"] * 2],
    }))
    logs = root / "logs"
    (logs / "crash-20260101").mkdir(parents=True)
    (logs / "CITATION.md").write_text("Preprocessing used Trajectome (https://example.org).\n")
    (logs / "crash-20260101" / "crash-001.txt").write_text(
        "Node: trajectome_wf.sub_01_wf.dwi_wf.ses_postECT.tracking\n"
        f"Traceback (most recent call last):\n  File x\n{CRASH_MESSAGE}\n")
    (logs / "crash-20260101" / "crash-002.txt").write_text(
        "Node: trajectome_wf.sub_c1_wf.anat_wf.preproc\nRuntimeError: other subject\n")
    return planted


@pytest.fixture
def derivatives(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, dict]:
    root = tmp_path / "out"
    return root, build_derivatives(root, rng)


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
    # pre and post: anatomy, atlas on the T1w, FD, carpet, FC, SC; maintenance: SC only;
    # trajectories: the 3 key metrics (DMN within, salience-DMN, hippocampus), not the
    # Visual control metric
    assert text.count("<svg") == 6 + 6 + 1 + 3
    # 5 slices (+ contours) for the T1w and again for the atlas, carpet and 2 matrices
    assert text.count("data:image/png;base64,") >= 2 * 13 + 1
    assert "atlas Toy warped from MNI to the T1w (colours)" in text
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
    assert text.count("<svg") == 6 + 6 + 1 + 3 - 1


def test_group_report(derivatives):
    root, _ = derivatives
    text = reports.write_group_report(root).read_text()
    for heading in ("Cohort and QC", "Mixed models", "Effects by role", "Maintenance classes",
                    "<h2>Methods</h2>", "<h2>Errors</h2>"):
        assert heading in text
    assert "3 subjects, 9 sessions." in text
    assert "2 of 5 QC rows flagged." in text
    # q < 0.05 highlighted, sorted by q
    assert "3 fitted contrasts, 2 with q &lt; 0.05 (highlighted), sorted by q" in text
    models = text[text.index('id="models"'):text.index('id="effects"')]
    # identity columns become one label; the empty node column and the skipped rows go,
    # the skipped ones counted once per reason (converged: only True left, so dropped)
    assert "<th>metric</th><th>model</th><th>term</th><th>effect</th><th>p</th><th>q</th>" \
        "</tr>" in models and "every fit converged" in models
    assert "<td class=\"text\">connectivity · Salience · DefaultMode</td>" in models
    assert "coupling</td>" not in models.split("<h3>Not fitted</h3>")[0]
    assert ("<tr><td class=\"text\">control</td><td class=\"text\">control: fewer than 3 "
            "subjects with a pre-ECT value</td><td>2</td></tr>") in models
    assert text.count('<tr class="highlight">') == 2 and "<td>-0.123</td>" in text
    assert text.index("<td>0.0012</td>") < text.index("<td>0.015</td>") < text.index(
        "<td>0.3</td>")
    # effect plots for the three metrics of the stats table, most significant first
    assert text.count("<svg") == 3
    assert text.index("connectivity · DefaultMode: 3 subjects") < text.index(
        "hippocampal_volume: 3 subjects")
    # class counts come from the group table, over patients only: every subject's values
    # rise by 0.1 per session (SE 0.02), so the one patient is continued remodelling with
    # retention (maint - pre) / (post - pre) = 2; the classes the trajectory tables carry
    # (regression for the patient, 'none' for the two controls) are not recounted
    classes = text[text.index('id="classes"'):text.index('id="methods"')]
    head = ("<th>metric</th><th>patients</th><th>regression</th><th>stabilisation</th>"
            "<th>continued_<wbr>remodelling</th><th>no_<wbr>acute_<wbr>change</th>"
            "<th>median_<wbr>retention</th>")
    assert head in classes and "patients only" in classes
    assert classes.count("<td>1</td><td>0</td><td>0</td><td>1</td><td>0</td><td>2</td>") == 4
    assert "<th>none</th>" not in classes and "QC-flagged sessions left out" in classes
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


def test_class_without_probability_shows_none(tmp_path):
    # trajectory tables as pipeline.group writes them: class_probability n/a for
    # no_acute_change (the three posterior probabilities still filled in), and every
    # probability n/a for a metric without SE (a point classification)
    rows = []
    for metric, klass, prob, p_reg, se in (
            ("coupling", "no_acute_change", np.nan, 0.61, 0.05),
            ("hippocampal_volume", "regression", 0.97, 0.97, 0.05),
            ("hippocampus_volume_mm3", "regression", np.nan, np.nan, np.nan)):
        for order, (session, role) in enumerate(SESSIONS, start=1):
            rows.append({"subject": "02", "session": session, "role": role, "order": order,
                         "metric": metric, "value": 356.47 + 0.01 * (order % 2), "se": se,
                         "maintenance_class": klass, "class_probability": prob,
                         "p_regression": p_reg, "p_stabilisation": 0.27 * (p_reg < 0.9),
                         "p_continued_remodelling": 0.12 * (p_reg < 0.9)})
    path = tmp_path / "sub-02" / "sub-02_desc-trajectories_metrics.tsv"
    write_tsv(path, pd.DataFrame(rows))
    _, summary = reports.load_trajectories(path)
    summary = summary.set_index("label")
    assert pd.isna(summary.loc["coupling", "class_probability"])
    assert summary.loc["hippocampal_volume", "class_probability"] == 0.97
    text = reports.write_subject_report(tmp_path, "02").read_text()
    coupling = text[text.index("<b>coupling</b>"):text.index("<b>hippocampal_volume</b>")]
    assert '<span class="class">no_acute_change</span> (acute change within noise' in coupling
    assert "p = " not in coupling and "0.61" not in coupling
    assert '<span class="class">regression</span> (p = 0.97)' in text
    point = text[text.index("<b>hippocampus_volume_mm3</b>"):]
    assert "(no standard error: a point classification, no probability)" in point
    assert "p = " not in point
    # values 0.01 apart around 356 keep the digits that tell them apart (not 356.5 thrice)
    assert "Values: preECT: 356.48, postECT: 356.47, maint: 356.48<" in point


def test_trajectory_page_shows_key_metrics_first(tmp_path):
    # the layout pipeline.group writes (KEY_COLUMNS of pipeline.longitudinal), in its file
    # order: anat, coupling (global + one row per network), fc, sc
    keys = [("anat", "volume_mm3", "structure", "", "", "hippocampus_L"),
            ("coupling", "sc_fc_spearman", "global", "", "", ""),
            *(("coupling", "sc_fc_spearman", "network", n, "", "")
              for n in ("Auditory", "DefaultMode", "Visual")),
            *(("fc", "connectivity", "network_pair", a, b, "")
              for a, b in (("Auditory", "Visual"), ("DefaultMode", "DefaultMode"),
                           ("DefaultMode", "Salience"), ("DefaultMode", "Visual"))),
            ("fc", "strength", "network", "FrontoParietal", "", ""),
            ("fc", "anchored_connectivity", "anchor_network", "hippocampus", "Visual", ""),
            ("sc", "connectivity", "network_pair", "Salience", "Salience", ""),
            ("sc", "strength", "network", "Visual", "", "")]
    rows = [{"subject": "03", "modality": m, "atlas": "A", "metric": metric, "scope": scope,
             "network": net, "network_b": net_b, "node": node, "session": ses, "role": role,
             "order": order, "value": 0.1 * order, "se": 0.01, "maintenance_class": "",
             "class_probability": np.nan}
            for m, metric, scope, net, net_b, node in keys
            for order, (ses, role) in enumerate(SESSIONS, start=1)]
    write_tsv(tmp_path / "sub-03" / "sub-03_desc-trajectories_metrics.tsv", pd.DataFrame(rows))
    text = reports.write_subject_report(tmp_path, "03").read_text()
    shown = re.findall(r"<b>([^<]+)</b>", text)
    assert shown == [
        "connectivity · fc · network_pair · DefaultMode · A",  # within: DMN once
        "connectivity · fc · network_pair · DefaultMode · Salience · A",
        "sc_fc_spearman · coupling · global · A",
        "volume_mm3 · anat · structure · hippocampus_L · A",
        "connectivity · sc · network_pair · Salience · A",
        "sc_fc_spearman · coupling · network · DefaultMode · A",
        "connectivity · fc · network_pair · DefaultMode · Visual · A",  # one key network
        "strength · fc · network · FrontoParietal · A",
        "anchored_connectivity · fc · anchor_network · hippocampus · Visual · A",
    ]
    assert f"{len(shown)} of {len(keys)} metrics" in text


def test_matrix_labels_do_not_overlap():
    # 300 parcels: three 2-parcel networks between big ones cannot all be labelled
    sizes = {"BigA": 100, "TinyB": 2, "TinyC": 2, "TinyD": 2, "BigE": 94, "BigF": 100}
    networks = {f"p{i}": net for i, net in enumerate(
        n for n, size in sizes.items() for _ in range(size))}
    matrix = pd.DataFrame(np.eye(300), index=list(networks), columns=list(networks))
    for svg in (reports.matrix_svg(matrix, networks),
                reports.carpet_svg(pd.DataFrame(np.eye(300)[:20], columns=list(networks)),
                                   networks)):
        assert all(big in svg for big in ("BigA", "BigE", "BigF"))
        assert sum(tiny in svg for tiny in ("TinyB", "TinyC", "TinyD")) == 1


def test_group_tables_fold_and_say_when_nothing_was_fitted(tmp_path):
    # 60 metrics: more than the 50 rows a group table shows before folding the rest
    networks = [f"Net{i:02d}" for i in range(59)] + ["DefaultMode"]
    classes = pd.DataFrame({
        "modality": "fc", "atlas": "A", "metric": "strength", "scope": "network",
        "network": networks, "network_b": "", "node": "", "n_regression": 1,
        "n_stabilisation": 0, "n_continued_remodelling": 0, "n_no_acute_change": 2,
        "n_subjects": 3, "median_retention": 0.5})
    write_tsv(tmp_path / groupstats.GROUP_OUTPUTS["class_counts"], classes)
    write_tsv(tmp_path / groupstats.GROUP_OUTPUTS["lme"], classes[["metric", "network"]].assign(
        model="patient", contrast="post_vs_pre", estimate=np.nan, p=np.nan, q=np.nan,
        converged=False, skipped="fewer than 3 subjects with a pre-ECT value"))
    text = reports.write_group_report(tmp_path).read_text()
    models = text[text.index('id="models"'):text.index('id="effects"')]
    assert "no contrast could be estimated" in models and "converged" not in models
    assert ('<td class="text">fewer than 3 subjects with a pre-ECT value</td><td>60</td>'
            in models)
    section = text[text.index('id="classes"'):text.index('id="methods"')]
    # totals over the 60 metrics, the one key metric (DMN), then all 60 folded
    assert "<td>60</td><td>60</td><td>0</td><td>0</td><td>120</td>" in section
    key = section[section.index("Key metrics"):section.index("<details>")]
    assert key.count("<tr>") == 2 and "strength · fc · network · DefaultMode · A" in key
    folded = section[section.index("<details>"):]
    assert "<summary>All 60 metrics</summary>" in folded and folded.count("<tr>") == 61
