"""The command line end to end on small builder datasets."""

import json
import subprocess
import sys
from importlib import metadata

import pandas as pd
import pytest
from bids_builder import SessionSpec, build_bids

from workflows import cli


def test_every_console_script_imports():
    scripts = [
        ep
        for ep in metadata.entry_points(group="console_scripts")
        if ep.dist and ep.dist.name == "trajectome"
    ]
    assert {ep.name for ep in scripts} == {"trajectome", "trajectome-simulate"}
    for entry_point in scripts:
        assert callable(entry_point.load())


def test_version_flag():
    out = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("trajectome ")


@pytest.fixture(autouse=True)
def no_anatomy(monkeypatch):
    """The builder's 4x5x6 images cannot be registered; these tests are about the CLI's
    mechanics (labels, exit codes, failure isolation, provenance).  The anatomical
    workflow runs for real in test_integration.py on the example dataset."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from workflows import base, dwi, func
    from workflows.anat import SESSION_OUTPUTS
    from workflows.engine import Workflow

    def identity(name, fields):
        return pe.Node(niu.IdentityInterface(fields=list(fields)), name=name)

    def fake_anat(**kwargs):
        workflow = Workflow(name="anat_wf")
        workflow.add_nodes([identity(f"outputnode_ses_{s.label}", SESSION_OUTPUTS)
                            for s in kwargs["sessions"]])
        return workflow

    def fake_connectome(**kwargs):
        workflow = Workflow(name=kwargs["name"])
        workflow.add_nodes([identity("inputnode", SESSION_OUTPUTS)])
        return workflow

    monkeypatch.setattr(base, "init_anat_wf", fake_anat)
    monkeypatch.setattr(func, "init_func_wf", fake_connectome)
    monkeypatch.setattr(dwi, "init_dwi_wf", fake_connectome)
    monkeypatch.setattr(base, "_add_session_metrics", lambda *args, **kwargs: None)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids") / "ds"
    return build_bids(
        root,
        {
            "01": {
                "pre": SessionSpec(acq_time="2024-01-01T09:00:00"),
                "post": SessionSpec(acq_time="2024-02-01T09:00:00", dwi=0),
            },
            "02": {"pre": SessionSpec(), "post": SessionSpec(), "fu1": SessionSpec(bold=0)},
        },
        groups={"01": "patient", "02": "control"},
    )


def _run(dataset, out, *extra):
    return cli.main(
        [
            str(dataset),
            str(out),
            "participant",
            "-w",
            str(out.parent / "work"),
            "--nprocs",
            "1",
            "--skip-bids-validation",
            *extra,
        ]
    )


def test_participant_and_group_levels(dataset, tmp_path):
    out = tmp_path / "out"
    assert _run(dataset, out) == cli.EXIT_OK
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "Trajectome"
    sessions = pd.read_csv(out / "sub-01" / "sub-01_sessions.tsv", sep="\t", keep_default_na=False)
    assert sessions["session_id"].tolist() == ["ses-pre", "ses-post"]
    assert sessions["role"].tolist() == ["pre", "post"]
    assert sessions["missing"].tolist() == ["", "dwi"]
    sessions2 = pd.read_csv(out / "sub-02" / "sub-02_sessions.tsv", sep="\t", keep_default_na=False)
    assert sessions2["role"].tolist() == ["pre", "post", "maintenance"]
    assert sessions2["missing"].tolist() == ["", "", "bold"]
    logs = out / "logs"
    assert list(logs.glob("trajectome-*_config.toml")) and list(
        logs.glob("trajectome-*_versions.json")
    )
    assert "Trajectome" in (logs / "CITATION.md").read_text()
    import hashlib

    (inputs,) = logs.glob("trajectome-*_inputs.tsv")
    checksums = pd.read_csv(inputs, sep="\t").set_index("filename")
    bold = "sub-01/ses-pre/func/sub-01_ses-pre_task-rest_bold.nii.gz"
    assert {bold, bold.replace(".nii.gz", ".json")} <= set(checksums.index)
    assert any(name.endswith("_dwi.bvec") for name in checksums.index)
    assert checksums.loc[bold, "sha256"] == hashlib.sha256(
        (dataset / bold).read_bytes()).hexdigest()

    assert cli.main([str(dataset), str(out), "group"]) == cli.EXIT_OK
    cohort = pd.read_csv(out / "group" / "cohort_sessions.tsv", sep="\t")
    assert len(cohort) == 5
    assert set(cohort["group"]) == {"patient", "control"}


def test_failure_is_isolated_and_summarised(dataset, tmp_path, capsys):
    broken = tmp_path / "ds"
    subprocess.run(["cp", "-r", str(dataset), str(broken)], check=True)
    bold = broken / "sub-02" / "ses-post" / "func" / "sub-02_ses-post_task-rest_bold.nii.gz"
    bold.write_bytes(bold.read_bytes()[:200])
    out = tmp_path / "out"
    assert _run(broken, out) == cli.EXIT_FAILED
    summary = capsys.readouterr().err.splitlines()
    assert any("1 step(s) failed" in line for line in summary)
    assert any(
        "[sub-02 ses-post] input check" in line
        and str(bold) in line
        and "corrupt or truncated" in line
        for line in summary
    )
    # everything else finished: both subjects' tables are there
    assert (out / "sub-01" / "sub-01_sessions.tsv").exists()
    assert (out / "sub-02" / "sub-02_sessions.tsv").exists()
    # no temporary files left behind
    assert not [p for p in out.rglob("*.tmp*")]


def test_unknown_label_lists_existing(dataset, tmp_path, capsys):
    assert _run(dataset, tmp_path / "out", "--participant-label", "sub-99") == cli.EXIT_USAGE
    message = capsys.readouterr().err
    assert "99" in message and "01" in message and "02" in message


def test_group_before_participant_is_a_clear_error(dataset, tmp_path, capsys):
    assert cli.main([str(dataset), str(tmp_path / "out"), "group"]) == cli.EXIT_USAGE
    assert "run the participant level first" in capsys.readouterr().err


def test_boilerplate_only_writes_methods_without_running(dataset, tmp_path):
    out = tmp_path / "out"
    assert _run(dataset, out, "--boilerplate-only") == cli.EXIT_OK
    assert "Nipype" in (out / "logs" / "CITATION.md").read_text()
    assert not list(out.glob("sub-*"))


def test_unwritable_output_dir(dataset, tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root can write anywhere; permission errors cannot be provoked")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert _run(dataset, locked / "out") == cli.EXIT_USAGE
    assert "cannot write the outputs (Permission denied)" in capsys.readouterr().err


@pytest.mark.parametrize("nprocs", [1, 2])
def test_subject_results_keep_each_subjects_failure_in_parallel_too(tmp_path, nprocs):
    # sub-b's session metrics table is unreadable: its trajectories fail, every subject
    # still gets its report, and the failure is the only one, with its crash file
    out, crash = tmp_path / "out", tmp_path / "crash"
    crash.mkdir()
    for label in "abc":
        (out / f"sub-{label}").mkdir(parents=True)
    broken = out / "sub-b" / "ses-1" / "sub-b_ses-1_atlas-X_desc-network_metrics.tsv"
    broken.parent.mkdir()
    broken.write_text("not\ta table\n")
    failures = cli.write_subject_results(out, list("abc"), include_flagged=False,
                                         crash_dir=crash, nprocs=nprocs)
    assert [(f.subject, f.node) for f in failures] == [("b", "trajectories")]
    assert sorted(p.name for p in out.glob("*.html")) == ["sub-a.html", "sub-b.html",
                                                          "sub-c.html"]
    assert [p.name for p in crash.iterdir()] == ["crash-sub-b-trajectories.txt"]
