"""Longitudinal post-step and group level on a tiny synthetic output folder (no imaging).

Three patients and two controls, three sessions each (pre/post/maintenance, labels chosen so
that alphabetical order is not the timeline), two atlases. One metric carries a planted ECT
effect in the patients (``+ACUTE`` after ECT, ``+MAINTAINED`` at maintenance: regression);
everything else is noise. Expected numbers are computed here from the planted values.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import derivatives, group, groupstats, longitudinal
from workflows import cli

PATIENTS, CONTROLS = ("pat01", "pat02", "pat03"), ("ctl01", "ctl02")
#: (label, role, acq_time): alphabetical order is baseline, maint, post.
SESSIONS = (("baseline", "pre", "2024-01-01T09:00:00"),
            ("post", "post", "2024-02-01T09:00:00"),
            ("maint", "maintenance", "2024-07-01T09:00:00"))
ACUTE, MAINTAINED, NOISE = 0.2, 0.05, 0.005
#: (atlas, modality, metric, scope, network, network_b, node); the first is the planted one.
PLANTED = ("TinyA", "fc", "connectivity", "network_pair", "DefaultMode", "DefaultMode", "")
METRICS = (
    PLANTED,
    ("TinyA", "fc", "connectivity", "network_pair", "DefaultMode", "Salience", ""),
    ("TinyA", "fc", "global_efficiency", "global", "", "", ""),
    ("TinyA", "sc", "global_efficiency", "global", "", "", ""),
    ("TinyA", "coupling", "coupling", "global", "", "", ""),
    ("TinyA", "anat", "volume_mm3", "structure", "", "", "hippocampus_L"),
    ("TinyA", "fc", "strength", "node", "", "", "P01"),  # node level: not followed
    ("TinyB", "fc", "connectivity", "network_pair", "DefaultMode", "DefaultMode", ""),
    ("TinyB", "fc", "global_efficiency", "global", "", "", ""),
)
#: ctl02's BOLD at "post" fails QC for atlas TinyA only.
FLAGGED = ("ctl02", "post", "TinyA")
NAME = re.compile(r"^sub-[A-Za-z0-9]+_desc-[A-Za-z0-9]+_metrics\.(tsv|json)$")


def _values(seed: int = 11) -> dict[tuple, float]:
    """``(subject, session, *metric) -> value``: subject baseline + noise + planted effect."""
    rng = np.random.default_rng(seed)
    shifts = {"pre": 0.0, "post": ACUTE, "maintenance": MAINTAINED}
    values = {}
    for subject in (*PATIENTS, *CONTROLS):
        for metric in METRICS:
            base = rng.normal(0.4, 0.05) * (1000 if metric[2] == "volume_mm3" else 1)
            for session, role, _ in SESSIONS:
                value = base + rng.normal(0, NOISE)
                if metric == PLANTED and subject in PATIENTS:
                    value += shifts[role]
                values[(subject, session, *metric)] = value
    return values


def write_outputs(out: Path, values: dict[tuple, float], subjects=(*PATIENTS, *CONTROLS),
                  sessions=SESSIONS) -> None:
    """What the participant level leaves: sessions.tsv, metric tables, BOLD QC tables."""
    for subject in subjects:
        sub = out / f"sub-{subject}"
        records = [{"session_id": f"ses-{s}", "role": r, "order": i, "acq_time": t,
                    "n_t1w": 1, "n_bold": 1, "n_dwi": 1, "missing": ""}
                   for i, (s, r, t) in enumerate(sessions, start=1)]
        derivatives.write_tsv(sub / f"sub-{subject}_sessions.tsv", pd.DataFrame(records))
        for session, _, _ in sessions:
            stem = f"sub-{subject}_ses-{session}"
            for atlas in ("TinyA", "TinyB"):
                rows = [{"modality": m, "metric": k, "scope": sc, "network": n,
                         "network_b": nb_, "node": node,
                         "value": values[(subject, session, a, m, k, sc, n, nb_, node)],
                         "se": np.nan if m == "anat" else NOISE}
                        for a, m, k, sc, n, nb_, node in METRICS if a == atlas]
                derivatives.write_tsv(sub / f"ses-{session}"
                                      / f"{stem}_atlas-{atlas}_desc-network_metrics.tsv",
                                      pd.DataFrame(rows))
                failed = (subject, session, atlas) == FLAGGED
                qc = pd.DataFrame([{"atlas": atlas, "remaining_minutes": 2.1 if failed else 8.0,
                                    "qc_pass": 0 if failed else 1,
                                    "qc_reason": "2.1 min of uncensored data (< 4)" if failed
                                    else np.nan}])
                derivatives.write_tsv(sub / f"ses-{session}" / "func"
                                      / f"{stem}_space-MNI_atlas-{atlas}_desc-qc_bold.tsv", qc)


def _participants(path: Path, subjects=(*PATIENTS, *CONTROLS)) -> Path:
    groups = ["Patient" if s.startswith("pat") else "control" for s in subjects]  # case varies
    table = pd.DataFrame({"participant_id": [f"sub-{s}" for s in subjects], "group": groups,
                          "age": 50})
    derivatives.write_tsv(path / "participants.tsv", table)
    return path / "participants.tsv"


@pytest.fixture(scope="module")
def planted() -> dict[tuple, float]:
    return _values()


@pytest.fixture(scope="module")
def bids(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bids")
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "tiny", "BIDSVersion": "1.10.0"}))
    _participants(root)
    return root


@pytest.fixture
def out(tmp_path, planted, bids) -> Path:
    root = tmp_path / "out"
    write_outputs(root, planted)
    group.write_participants(root, bids)
    return root


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False,
                       dtype={"network": str, "network_b": str, "node": str, "session": str})


def _is(table: pd.DataFrame, metric: tuple) -> pd.Series:
    keys = ("atlas", "modality", "metric", "scope", "network", "network_b", "node")
    mask = pd.Series(True, index=table.index)
    for key, value in zip(keys, metric, strict=True):
        mask &= table[key].fillna("").astype(str) == value
    return mask


# --------------------------------------------------------------------------- collect


def test_collect_session_metrics_roles_order_groups_and_qc(out, planted):
    long = group.collect_session_metrics(out, participants_tsv=out / "participants.tsv")
    assert set(long["subject"]) == {*PATIENTS, *CONTROLS}
    assert "node" not in set(long["scope"])  # node level is not followed
    assert len(long) == 5 * 3 * (len(METRICS) - 1)
    assert dict(zip(long["subject"], long["group"], strict=False))["pat01"] == "patient"
    row = long[(long["subject"] == "pat02") & (long["session"] == "maint") & _is(long, PLANTED)]
    assert row["value"].item() == pytest.approx(planted[("pat02", "maint", *PLANTED)], abs=1e-9)
    assert (row["role"].item(), row["order"].item()) == ("maintenance", 3)
    # QC: only the BOLD-derived rows of the failing atlas of that session are flagged
    flagged = long[long["qc_flag"].astype(bool)]
    assert set(zip(flagged["subject"], flagged["session"], flagged["atlas"],
                   strict=True)) == {FLAGGED}
    assert set(flagged["modality"]) == {"fc", "coupling"}
    assert set(flagged["qc_reason"]) == {"2.1 min of uncensored data (< 4)"}
    assert set(long.loc[~long["qc_flag"].astype(bool), "qc_reason"]) == {""}
    only = group.collect_session_metrics(out, subjects=["sub-pat01"])
    assert set(only["subject"]) == {"pat01"} and set(only["group"]) == {""}
    with pytest.raises(group.GroupInputError, match=r"sub-nobody.*participant level"):
        group.collect_session_metrics(out, subjects=["nobody"])


# --------------------------------------------------------------------------- subject level


def test_subject_outputs_trajectories_changes_normalisation(out, planted):
    paths = group.write_subject_outputs(out, "pat01")
    assert {p.name for p in paths} == {f"sub-pat01_desc-{d}_metrics.{e}" for d in
                                       ("trajectories", "changes", "normalisation")
                                       for e in ("tsv", "json")}
    assert all(p.parent == out / "sub-pat01" and NAME.match(p.name) for p in paths)

    traj = _read(out / "sub-pat01" / "sub-pat01_desc-trajectories_metrics.tsv")
    planted_rows = traj[_is(traj, PLANTED)]
    assert planted_rows["session"].tolist() == ["baseline", "post", "maint"]  # timeline
    assert planted_rows["order"].tolist() == [1, 2, 3]
    assert planted_rows["time"].tolist() == [0, 31, 182]
    np.testing.assert_allclose(planted_rows["value"],
                               [planted[("pat01", s, *PLANTED)] for s, _, _ in SESSIONS],
                               atol=1e-9)
    assert set(traj["atlas"]) == {"TinyA", "TinyB"} and "node" not in set(traj["scope"])
    per_metric = traj.groupby(["atlas", "modality", "metric", "network", "network_b", "node"],
                              dropna=False, sort=False)["order"].apply(list)
    assert len(per_metric) == len(METRICS) - 1 and all(o == [1, 2, 3] for o in per_metric)
    assert set(planted_rows["maintenance_class"]) == {"regression"}

    changes = _read(out / "sub-pat01" / "sub-pat01_desc-changes_metrics.tsv")
    row = changes[_is(changes, PLANTED)].iloc[0]
    pre, post, maint = (planted[("pat01", s, *PLANTED)] for s, _, _ in SESSIONS)
    assert row["acute_change"] == pytest.approx(post - pre, abs=1e-9) and row["acute_change"] > 0
    assert row["maintenance_change"] == pytest.approx(maint - post, abs=1e-9)
    assert row["retention"] == pytest.approx((maint - pre) / (post - pre), abs=1e-8)
    assert row["maintenance_class"] == "regression"
    assert row["se_acute"] == pytest.approx(np.sqrt(2) * NOISE)

    # normalisation: control mean over control sessions, SD pooled over roles; ctl02's
    # flagged TinyA post session is left out of the reference
    norm = _read(out / "sub-pat01" / "sub-pat01_desc-normalisation_metrics.tsv")
    ref = {(c, s): planted[(c, s, *PLANTED)] for c in CONTROLS for s, _, _ in SESSIONS
           if (c, s, PLANTED[0]) != FLAGGED}
    per_role = [[v for (c, s), v in ref.items() if s == ses] for ses, _, _ in SESSIONS]
    ss = sum((len(v) - 1) * np.var(v, ddof=1) for v in per_role if len(v) > 1)
    sd = np.sqrt(ss / sum(len(v) - 1 for v in per_role))
    mean = np.mean(list(ref.values()))
    rows = norm[_is(norm, PLANTED)]
    assert rows["session"].tolist() == ["baseline", "post", "maint"]
    np.testing.assert_allclose(rows["z"], [(v - mean) / sd for v in (pre, post, maint)],
                               rtol=1e-8)
    assert set(rows["control_df"]) == {2} and set(rows["n_controls"]) == {2}
    sidecar = json.loads((out / "sub-pat01" / "sub-pat01_desc-normalisation_metrics.json")
                         .read_text())
    assert sidecar["ControlSubjects"] == ["sub-ctl01", "sub-ctl02"]
    assert set(longitudinal.NORMALISATION_SIDECAR) <= set(sidecar)


def test_controls_single_sessions_and_no_groups(out, planted, tmp_path):
    # a control gets trajectories and changes, no normalisation, and the sidecar says why
    paths = group.write_subject_outputs(out, "sub-ctl01")
    assert {p.name for p in paths if p.suffix == ".tsv"} == {
        "sub-ctl01_desc-trajectories_metrics.tsv", "sub-ctl01_desc-changes_metrics.tsv"}
    sidecar = json.loads((out / "sub-ctl01" / "sub-ctl01_desc-trajectories_metrics.json")
                         .read_text())
    assert "group is 'control'" in sidecar["NormalisationIndex"]

    # one session: a trajectories table, no changes (the earlier one is removed), no error
    group.write_subject_outputs(out, "pat01")
    assert (out / "sub-pat01" / "sub-pat01_desc-changes_metrics.tsv").exists()
    write_outputs(out, {(s, "baseline", *m): v for (s, ses, *m), v in planted.items()
                        if ses == "baseline"}, subjects=("pat01",), sessions=SESSIONS[:1])
    paths = group.write_subject_outputs(out, "pat01")
    assert {p.name for p in paths if p.suffix == ".tsv"} == {
        "sub-pat01_desc-trajectories_metrics.tsv", "sub-pat01_desc-normalisation_metrics.tsv"}
    traj = _read(out / "sub-pat01" / "sub-pat01_desc-trajectories_metrics.tsv")
    assert set(traj["session"]) == {"baseline"} and traj["change_from_post"].isna().all()
    assert not (out / "sub-pat01" / "sub-pat01_desc-changes_metrics.tsv").exists()

    # no participants table: no controls known, normalisation skipped and said so
    alone = tmp_path / "alone"
    write_outputs(alone, planted, subjects=("pat02",))
    paths = group.write_subject_outputs(alone, "pat02")
    assert not any("normalisation" in p.name for p in paths)
    sidecar = json.loads((alone / "sub-pat02" / "sub-pat02_desc-trajectories_metrics.json")
                         .read_text())
    assert "no group" in sidecar["NormalisationIndex"]
    for path in (alone / "sub-pat02").glob("ses-*"):
        shutil.rmtree(path)
    with pytest.raises(group.GroupInputError, match="no session metric tables"):
        group.write_subject_outputs(alone, "pat02")


# --------------------------------------------------------------------------- group level


def test_group_level_cli(out, planted, bids, capsys):
    assert cli.main([str(bids), str(out), "group", "--skip-bids-validation"]) == cli.EXIT_OK
    for name, relative in groupstats.GROUP_OUTPUTS.items():
        path = out / relative
        assert path.exists() and path.with_suffix(".json").exists(), name
        assert re.match(r"^desc-[a-z]+_[a-z]+\.tsv$", path.name) and path.parent.name == "group"
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert set(_read(path).columns) <= set(sidecar), name

    lme = _read(out / groupstats.GROUP_OUTPUTS["lme"])
    patients = lme[(lme["model"] == "patient") & (lme["skipped"].fillna("") == "")]
    post_pre = patients[patients["contrast"] == "post_vs_pre"]
    wide = {s: [planted[(p, s, *PLANTED)] for p in PATIENTS] for s, _, _ in SESSIONS}
    row = patients[_is(patients, PLANTED) & (patients["contrast"] == "post_vs_pre")].iloc[0]
    # balanced design: the REML contrast is the difference of the role means
    assert row["estimate"] == pytest.approx(np.mean(wide["post"]) - np.mean(wide["baseline"]),
                                            abs=1e-6)
    assert row["estimate"] > 0 and row["q"] < 0.05
    assert row["p"] == post_pre["p"].min()
    # every followed scope is modelled, the hippocampus (structure) included
    hippocampus = ("TinyA", "anat", "volume_mm3", "structure", "", "", "hippocampus_L")
    assert _is(post_pre, hippocampus).sum() == 1
    assert not _is(post_pre, METRICS[6]).any()  # node level: not modelled
    back = patients[_is(patients, PLANTED) & (patients["contrast"] == "maintenance_vs_post")]
    assert back["estimate"].item() == pytest.approx(
        np.mean(wide["maint"]) - np.mean(wide["post"]), abs=1e-6)
    assert back["estimate"].item() < 0
    # two controls: the control model is skipped, and says why; ctl02's flagged session
    # is left out by default (5 of the 6 control sessions)
    controls = lme[lme["model"] == "control"]
    assert controls["skipped"].str.contains("fewer than 3 subjects").all()
    assert controls[_is(controls, PLANTED)]["n_obs"].iloc[0] == 5

    excluded = _read(out / groupstats.GROUP_OUTPUTS["excluded_sessions"])
    assert excluded[["subject", "session"]].values.tolist() == [["ctl02", "post"]]
    classes = _read(out / groupstats.GROUP_OUTPUTS["class_counts"])
    assert classes[_is(classes, PLANTED)]["n_regression"].item() == 3
    cohort = _read(out / groupstats.GROUP_OUTPUTS["metrics"])
    assert set(cohort["subject"]) == {*PATIENTS, *CONTROLS}

    # the group level refreshed the subjects' tables; the report was written
    assert (out / "sub-pat03" / "sub-pat03_desc-normalisation_metrics.tsv").exists()
    html = (out / "group.html").read_text()
    assert "desc-lme_stats.tsv" in html and "<svg" in html
    assert "[group] statistics: done" in capsys.readouterr().err


def test_group_level_options_and_errors(out, bids, tmp_path, capsys):
    kept = ("pat01", "pat02", "ctl01", "ctl02")
    code = cli.main([str(bids), str(out), "group", "--participant-label", "pat01", "sub-pat02",
                     "ctl01", "ctl02", "--include-flagged"])
    assert code == cli.EXIT_OK
    cohort = _read(out / groupstats.GROUP_OUTPUTS["metrics"])
    assert set(cohort["subject"]) == set(kept)
    sessions = _read(out / "group" / "cohort_sessions.tsv")
    assert set(sessions["participant_id"]) == {f"sub-{s}" for s in kept}
    assert not (out / "sub-pat03" / "sub-pat03_desc-trajectories_metrics.tsv").exists()
    # the flagged session counts with --include-flagged (6 control sessions, 5 without)
    lme = _read(out / groupstats.GROUP_OUTPUTS["lme"])
    assert lme[(lme["model"] == "control") & _is(lme, PLANTED)]["n_obs"].iloc[0] == 6
    assert json.loads((out / groupstats.GROUP_OUTPUTS["lme"]).with_suffix(".json")
                      .read_text())["IncludeFlagged"] is True

    assert cli.main([str(bids), str(out), "group", "--participant-label", "pat09"]) == 2
    assert "sub-pat09" in capsys.readouterr().err
    assert cli.main([str(bids), str(tmp_path / "empty"), "group"]) == cli.EXIT_USAGE
    assert "run the participant level first" in capsys.readouterr().err


# --------------------------------------------------------------------------- participant level


def test_participant_level_post_step_isolates_a_broken_subject(tmp_path, planted, monkeypatch,
                                                                capsys):
    """``run_participant`` after its workflow: trajectories and reports per subject; the
    subject whose metric table is broken fails alone (exit 1), the others are complete."""
    from bids_builder import SessionSpec, build_bids

    from workflows import base, engine, run

    subjects = (*PATIENTS, *CONTROLS)
    dataset = build_bids(
        tmp_path / "ds",
        {s: {ses: SessionSpec(acq_time=t, bold=0, dwi=0) for ses, _, t in SESSIONS}
         for s in subjects},
        groups={s: "patient" if s in PATIENTS else "control" for s in subjects})
    out = tmp_path / "out"
    broken = (out / "sub-pat02" / "ses-post"
              / "sub-pat02_ses-post_atlas-TinyA_desc-network_metrics.tsv")

    def fake_run_workflow(workflow, **kwargs):  # what the Nipype graph would write
        write_outputs(out, planted)
        broken.write_text("modality\tvalue\nfc\t0.3\n")
        return []

    monkeypatch.setattr(base, "init_trajectome_wf", lambda **kw: engine.Workflow(name="wf"))
    monkeypatch.setattr(run, "run_workflow", fake_run_workflow)
    monkeypatch.setattr(cli, "prepare_atlases", lambda config: [])
    code = cli.main([str(dataset), str(out), "participant", "--skip-bids-validation",
                     "-w", str(tmp_path / "work")])
    assert code == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "1 step(s) failed" in err
    failure = [line for line in err.splitlines() if "[sub-pat02] trajectories:" in line
               and "GroupInputError" in line]
    assert failure and str(broken) in failure[0] and "missing column(s)" in failure[0]
    assert re.search(r"\[sub-pat01\] trajectories: done in \d+\.\d s", err)
    for subject in subjects:
        assert (out / f"sub-{subject}.html").exists(), subject  # pat02's report too
        has = (out / f"sub-{subject}" / f"sub-{subject}_desc-trajectories_metrics.tsv").exists()
        assert has == (subject != "pat02"), subject
    # patients processed in one run see every control
    norm = _read(out / "sub-pat01" / "sub-pat01_desc-normalisation_metrics.tsv")
    assert set(norm["n_controls"]) == {2}
    crash = list((out / "logs").glob("crash-*/crash-sub-pat02-trajectories.txt"))
    assert crash and "Traceback" in crash[0].read_text()
    assert "GroupInputError" in (out / "sub-pat02.html").read_text()  # its errors section
    participants = _read(out / "participants.tsv")
    assert list(participants.columns) == ["participant_id", "group"]
    assert dict(zip(participants["participant_id"], participants["group"], strict=True)) == {
        f"sub-{s}": "patient" if s in PATIENTS else "control" for s in subjects}
    html = (out / "sub-pat01.html").read_text()
    assert "regression" in html  # the maintenance class reaches the report
