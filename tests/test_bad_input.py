"""Reliability matrix (issue 9): bad input, partial data, crashes, concurrent runs.

Every case checks what the user sees: the message names the file and the fix, the failure
stays in its session/run, the other subjects and sessions still get their outputs, no
temporary or half-written file is left, and the exit code and summary say what failed.

The heavy workflows are replaced by fakes (as in ``test_cli.py``) that write one small real
file per session and modality, listing the inputs it received, so survival is checkable.
"""

from __future__ import annotations

import errno
import gc
import gzip
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from bids_builder import SessionSpec, build_bids

from pipeline import derivatives, inputs
from pipeline.bids import collect_subjects
from pipeline.config import package_version
from workflows import cli

TESTS = Path(__file__).parent


# --------------------------------------------------------------------------- fakes
def write_marker(output_dir, subject, session, kind, files):
    """Fake workflow node: a per-session TSV listing the input files it was given."""
    from pathlib import Path

    import pandas as pd

    from pipeline import derivatives

    entities = {"subject": subject, "session": session, "description": "fake"}
    path = Path(output_dir) / derivatives.build_path(entities, kind, ".tsv", None)
    derivatives.write_tsv(path, pd.DataFrame({"file": [Path(f).name for f in files]}))
    return str(path)


def _marker_node(name, output_dir, subject, session, kind, files):
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    node = pe.Node(
        niu.Function(
            input_names=["output_dir", "subject", "session", "kind", "files"],
            output_names=["out"],
            function=write_marker,
        ),
        name=name,
    )
    node.inputs.output_dir = str(output_dir)
    node.inputs.subject = subject
    node.inputs.session = session
    node.inputs.kind = kind
    node.inputs.files = [str(f) for f in files]
    return node


def install_fakes(setattr_=setattr):
    """Replace the anatomical and connectome workflows by marker-writing fakes."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from workflows import base, dwi, func
    from workflows.anat import SESSION_OUTPUTS
    from workflows.engine import Workflow

    def fake_anat(**kwargs):
        workflow = Workflow(name="anat_wf")
        for session in kwargs["sessions"]:
            key = base._session_key(session)
            workflow.add_nodes([
                pe.Node(niu.IdentityInterface(fields=list(SESSION_OUTPUTS)),
                        name=f"outputnode_{key}"),
                _marker_node(f"marker_{key}", kwargs["output_dir"], session.subject,
                             session.label, "anat", session.t1w),
            ])
        return workflow

    def fake_connectome(**kwargs):
        session = kwargs["session"]
        kind, runs = ("func", kwargs["bold_runs"]) if "bold_runs" in kwargs else (
            "dwi", kwargs["dwi_runs"])
        workflow = Workflow(name=kwargs["name"])
        workflow.add_nodes([
            pe.Node(niu.IdentityInterface(fields=list(SESSION_OUTPUTS)), name="inputnode"),
            _marker_node("marker", kwargs["output_dir"], session.subject, session.label, kind,
                         [r.path for r in runs]),
        ])
        return workflow

    setattr_(base, "init_anat_wf", fake_anat)
    setattr_(func, "init_func_wf", fake_connectome)
    setattr_(dwi, "init_dwi_wf", fake_connectome)
    setattr_(base, "_add_session_metrics", lambda *args, **kwargs: None)


@pytest.fixture(autouse=True)
def fakes(monkeypatch):
    install_fakes(monkeypatch.setattr)


def _run(bids, out, *extra, work=None):
    return cli.main([str(bids), str(out), "participant", "-w", str(work or out.parent / "work"),
                     "--nprocs", "1", "--skip-bids-validation", *extra])


def _markers(out):
    """{relative marker path: [file names listed]} for every fake output."""
    return {
        str(p.relative_to(out)): pd.read_csv(p, sep="\t")["file"].tolist()
        for p in sorted(out.rglob("*_desc-fake_*.tsv"))
    }


def _leftovers(out):
    """Temporary files of atomic writes left in the output directory."""
    return [p for p in out.rglob("*") if ".tmp" in p.name]


# --------------------------------------------------------------------------- mutations
def _nifti(path, data, affine=None, tr=None):
    img = nb.Nifti1Image(np.asarray(data, dtype=np.float32),
                         np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None:
        img.header["pixdim"][4] = tr
    nb.save(img, path)


def _empty(path):
    path.write_bytes(b"")


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path):
    with gzip.open(path, "wb") as handle:
        handle.write(b"this is not a NIfTI header" * 20)


def _all_nan(path):
    img = nb.load(path)
    _nifti(path, np.full(img.shape, np.nan))


def _to_3d(path):
    img = nb.load(path)
    _nifti(path, np.asanyarray(img.dataobj)[..., 0])


def _short(path):
    img = nb.load(path)
    _nifti(path, np.asanyarray(img.dataobj)[..., :5], tr=2.0)


def _drop_tr(sidecar):
    meta = json.loads(sidecar.read_text())
    del meta["RepetitionTime"]
    sidecar.write_text(json.dumps(meta))


def _bval(values):
    return lambda path: path.write_text(" ".join(map(str, values)) + "\n")


def _bvec(rows):
    return lambda path: path.write_text(
        "\n".join(" ".join(f"{v:g}" for v in row) for row in np.asarray(rows).T) + "\n")


DIRS7 = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1],
                  [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)

_T1W = "anat/sub-01_ses-pre_T1w.nii.gz"
_BOLD = "func/sub-01_ses-pre_task-rest_bold.nii.gz"
_BOLD_JSON = "func/sub-01_ses-pre_task-rest_bold.json"
_DWI = "dwi/sub-01_ses-pre_dwi.nii.gz"
_BVAL = "dwi/sub-01_ses-pre_dwi.bval"
_BVEC = "dwi/sub-01_ses-pre_dwi.bvec"

#: id -> (file to damage, damage, file the message starts with, message pattern, fix pattern)
ERROR_CASES = {
    "empty_nifti": (_T1W, _empty, _T1W, r"the file is empty \(0 bytes\)", "re-export it"),
    "truncated_nifti": (_BOLD, _truncate, _BOLD, "corrupt or truncated",
                        "re-copy or re-convert"),
    "corrupt_gzip": (_DWI, _garbage, _DWI, "cannot be read as NIfTI", "re-copy or re-convert"),
    "all_nan": (_T1W, _all_nan, _T1W, "every voxel is NaN or Inf", "--bids-filter-file"),
    "bold_3d": (_BOLD, _to_3d, _BOLD, r"must be 4-D .* shape \(4, 5, 6\)", "--bids-filter-file"),
    "dwi_3d": (_DWI, _to_3d, _DWI, r"must be 4-D .* shape \(4, 5, 6\)", "--bids-filter-file"),
    "bold_too_short": (_BOLD, _short, _BOLD, "only 5 volumes; at least 20", "--bids-filter-file"),
    "missing_tr": (_BOLD_JSON, _drop_tr, _BOLD, "RepetitionTime is missing", r"add it \(in s"),
    "bval_count": (_BVAL, _bval([0, 1000, 1000, 1000, 2000, 2000]), _DWI,
                   "7 volumes but 6 b-values", "one entry per volume"),
    "bvec_count": (_BVEC, _bvec(DIRS7[:5]), _DWI, "7 volumes but 7 b-values .* 5 b-vectors",
                   "one entry per volume"),
    "bvec_rows": (_BVEC, lambda p: p.write_text("0 1 0 0 1 0 0\n0 0 1 0 0 1 0\n"), _BVEC,
                  "must have 3 rows", "re-export"),
    "zero_bvec": (_BVEC, _bvec(DIRS7 * [1, 1, 0]), _BVEC, "2 diffusion-weighted volume",
                  "fix the gradient table"),
    "no_b0": (_BVAL, _bval([1000] * 7), _DWI, "no b=0 volume", "--bids-filter-file"),
}
_RUN_IMAGE = {"anat": _T1W, "func": _BOLD, "dwi": _DWI}


def _one_session(root):
    build_bids(root, {"01": {"pre": SessionSpec()}})
    return root / "sub-01" / "ses-pre"


def _preflight(root):
    (subject,) = collect_subjects(root)
    return inputs.preflight_session(subject.sessions[0])


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_file_is_dropped_with_a_message_naming_it(tmp_path, case):
    damaged, damage, cited, pattern, fix = ERROR_CASES[case]
    ses = _one_session(tmp_path / "ds")
    (subject,) = collect_subjects(tmp_path / "ds")
    session = subject.sessions[0]
    damage(ses / damaged)
    if case == "missing_tr":
        # collect_subjects may refuse the whole dataset on this (see
        # test_missing_sidecar_data_is_isolated); the check sees the run without the key
        bold = replace(session.bold[0], metadata={})
        session = replace(session, bold=(bold,))
    usable, problems, _ = inputs.preflight_session(session)
    (problem,) = problems
    modality = damaged.split("/")[0]
    assert (problem.subject, problem.session) == ("01", "pre")
    assert problem.path == str(ses / _RUN_IMAGE[modality])
    assert problem.message.startswith(f"{ses / cited}")
    assert re.search(pattern, problem.message), problem.message
    assert re.search(fix, problem.message), problem.message
    # only the damaged run is dropped; the rest of the session goes on
    dropped = {"anat": "t1w", "func": "bold", "dwi": "dwi"}[modality]
    kept = {"t1w": len(usable.t1w), "bold": len(usable.bold), "dwi": len(usable.dwi)}
    assert kept == {"t1w": 1, "bold": 1, "dwi": 1} | {dropped: 0}


def _warnings(summaries):
    return [w for s in summaries for w in s.warnings]


def test_nan_and_inf_voxels_are_counted_and_kept(tmp_path):
    ses = _one_session(tmp_path / "ds")
    t1w = ses / _T1W
    data = np.asanyarray(nb.load(t1w).dataobj).astype(np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, :2] = np.inf
    _nifti(t1w, data)
    usable, problems, summaries = _preflight(tmp_path / "ds")
    assert not problems and usable.t1w == (t1w,)
    assert "sub-01_ses-pre_T1w.nii.gz: 5 NaN/Inf voxel values will be treated as 0." in (
        _warnings(summaries))


def test_header_tr_differing_from_sidecar_warns_and_uses_sidecar(tmp_path):
    ses = _one_session(tmp_path / "ds")
    bold = ses / _BOLD
    _nifti(bold, np.asanyarray(nb.load(bold).dataobj), tr=2.5)
    usable, problems, summaries = _preflight(tmp_path / "ds")
    assert not problems and len(usable.bold) == 1
    (summary,) = [s for s in summaries if s.modality == "func"]
    assert summary.repetition_time == 2.0
    assert summary.warnings == [
        "sub-01_ses-pre_task-rest_bold.nii.gz: NIfTI header TR 2.5 s differs from sidecar "
        "RepetitionTime 2 s; the sidecar value is used."]


def test_non_unit_bvecs_are_normalised_with_a_warning(tmp_path):
    ses = _one_session(tmp_path / "ds")
    _bvec(DIRS7 * 1.3)(ses / _BVEC)
    _, problems, summaries = _preflight(tmp_path / "ds")
    assert not problems
    assert "sub-01_ses-pre_dwi.bvec: b-vectors are not unit norm; they are normalised." in (
        _warnings(summaries))


@pytest.mark.parametrize(("n_dirs", "expected"), [
    (20, []),  # CSD: no warning
    (10, ["sub-01_ses-pre_dwi.nii.gz: only 10 directions: too few for CSD (>= 15), "
          "CSA Q-ball at SH order 2."]),
    (4, ["sub-01_ses-pre_dwi.nii.gz: 4 diffusion directions: at least 6 on one shell are "
         "needed for any fibre-orientation model; this run cannot be used for tractography."]),
])
def test_single_shell_with_few_directions_says_which_model(tmp_path, n_dirs, expected):
    """Too few directions for CSD falls back to CSA, and the input check says so."""
    ses = _one_session(tmp_path / "ds")
    rng = np.random.default_rng(3)
    dirs = rng.normal(size=(n_dirs, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    data = np.asanyarray(nb.load(ses / _DWI).dataobj)
    _nifti(ses / _DWI, np.concatenate([data[..., :1], np.repeat(data[..., 1:2], n_dirs, 3)], 3))
    _bval([0] + [1000] * n_dirs)(ses / _BVAL)
    _bvec(np.vstack([[0, 0, 0], dirs]))(ses / _BVEC)
    _, problems, summaries = _preflight(tmp_path / "ds")
    assert not problems
    (summary,) = [s for s in summaries if s.modality == "dwi"]
    assert summary.shells == (1000.0,) and summary.n_b0 == 1
    assert summary.warnings == expected


@pytest.mark.parametrize("kind", ["oblique", "lps"])
def test_oblique_and_flipped_affines_are_accepted(tmp_path, kind):
    ses = _one_session(tmp_path / "ds")
    zooms = np.array([1.0, 1.2, 1.5])
    if kind == "oblique":
        angle = np.deg2rad(20)
        rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                        [0, np.sin(angle), np.cos(angle)]])
    else:
        rot = np.diag([-1.0, -1.0, 1.0])  # LPS+ storage order
    affine = np.eye(4)
    affine[:3, :3] = rot * zooms
    affine[:3, 3] = [10, -20, 5]
    for rel in (_T1W, _BOLD):
        img = nb.load(ses / rel)
        _nifti(ses / rel, np.asanyarray(img.dataobj), affine=affine,
               tr=2.0 if rel == _BOLD else None)
    usable, problems, summaries = _preflight(tmp_path / "ds")
    assert not problems and len(usable.t1w) == len(usable.bold) == 1
    for summary in summaries[:2]:
        np.testing.assert_allclose(summary.zooms, zooms, atol=1e-6)
        assert not summary.warnings


def test_sessions_with_very_different_voxel_sizes_share_the_finest_grid():
    """The unbiased template grid covers every session at the finest voxel size."""
    from pipeline.registration import _template_grid

    fine = nb.Nifti1Image(np.zeros((7, 8, 9), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
    coarse_affine = np.diag([-3.0, 3.0, 3.0, 1.0])  # x flipped, 3 mm
    coarse_affine[:3, 3] = [12.0, -6.0, 0.0]
    coarse = nb.Nifti1Image(np.zeros((5, 4, 3), np.float32), coarse_affine)
    grid = _template_grid([fine, coarse], [np.zeros(3), np.zeros(3)], margin_mm=0.0)
    np.testing.assert_allclose(grid.header.get_zooms(), (1.0, 1.0, 1.0))
    # fine spans x 0..6, coarse x 0..12 (flipped), y -6..6, z 0..8: union x 0..12
    np.testing.assert_allclose(grid.affine[:3, 3], [0.0, -6.0, 0.0])
    assert grid.shape == (13, 14, 9)


# --------------------------------------------------------------------------- CLI: one messy dataset
def _messy_dataset(root):
    """Four subjects; six unusable files spread over three sessions, the rest fine.

    * sub-01: pre fine; post BOLD truncated, DWI with 6 b-values for 7 volumes.
    * sub-02: pre T1w empty (0 bytes) and BOLD of 5 volumes (uses post's anatomy); post fine.
    * sub-03: a single session, T1w with some NaN voxels (kept, with a warning).
    * sub-04: pre DWI without b=0; post only BOLD; fu1 only DWI.
    """
    build_bids(root, {
        "01": {"pre": SessionSpec(), "post": SessionSpec()},
        "02": {"pre": SessionSpec(n_volumes=5), "post": SessionSpec()},
        "03": {"pre": SessionSpec()},
        "04": {"pre": SessionSpec(), "post": SessionSpec(t1w=0, dwi=0),
               "fu1": SessionSpec(t1w=0, bold=0)},
    })
    ses = {s: root / f"sub-{s[:2]}" / f"ses-{s[3:]}" for s in
           ("01_pre", "01_post", "02_pre", "02_post", "03_pre", "04_pre", "04_post", "04_fu1")}
    _truncate(ses["01_post"] / "func/sub-01_ses-post_task-rest_bold.nii.gz")
    _bval([0, 1000, 1000, 1000, 2000, 2000])(ses["01_post"] / "dwi/sub-01_ses-post_dwi.bval")
    _empty(ses["02_pre"] / "anat/sub-02_ses-pre_T1w.nii.gz")
    t1w = ses["03_pre"] / "anat/sub-03_ses-pre_T1w.nii.gz"
    data = np.asanyarray(nb.load(t1w).dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    _nifti(t1w, data)
    _bval([1000] * 7)(ses["04_pre"] / "dwi/sub-04_ses-pre_dwi.bval")
    return root


def test_messy_dataset_fails_per_file_and_finishes_the_rest(tmp_path, capsys):
    bids = _messy_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    assert _run(bids, out) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "5 step(s) failed; everything else finished:" in err
    summary = err[err.index("5 step(s) failed"):].splitlines()
    expected = [
        ("01 ses-post", "sub-01/ses-post/func/sub-01_ses-post_task-rest_bold.nii.gz",
         "corrupt or truncated - re-copy or re-convert it"),
        ("01 ses-post", "sub-01/ses-post/dwi/sub-01_ses-post_dwi.nii.gz",
         "7 volumes but 6 b-values"),
        ("02 ses-pre", "sub-02/ses-pre/anat/sub-02_ses-pre_T1w.nii.gz",
         "the file is empty (0 bytes); re-export it"),
        ("02 ses-pre", "sub-02/ses-pre/func/sub-02_ses-pre_task-rest_bold.nii.gz",
         "only 5 volumes; at least 20 are needed"),
        ("04 ses-pre", "sub-04/ses-pre/dwi/sub-04_ses-pre_dwi.nii.gz", "no b=0 volume"),
    ]
    for where, path, message in expected:
        assert any(f"[sub-{where}] input check: {bids / path}: " in line and message in line
                   for line in summary), (where, path, summary)
    assert "sub-03_ses-pre_T1w.nii.gz: 1 NaN/Inf voxel values will be treated as 0." in err
    assert _markers(out) == {
        "sub-01/ses-pre/sub-01_ses-pre_desc-fake_anat.tsv": ["sub-01_ses-pre_T1w.nii.gz"],
        "sub-01/ses-pre/sub-01_ses-pre_desc-fake_func.tsv":
            ["sub-01_ses-pre_task-rest_bold.nii.gz"],
        "sub-01/ses-pre/sub-01_ses-pre_desc-fake_dwi.tsv": ["sub-01_ses-pre_dwi.nii.gz"],
        "sub-01/ses-post/sub-01_ses-post_desc-fake_anat.tsv": ["sub-01_ses-post_T1w.nii.gz"],
        "sub-02/ses-pre/sub-02_ses-pre_desc-fake_dwi.tsv": ["sub-02_ses-pre_dwi.nii.gz"],
        "sub-02/ses-post/sub-02_ses-post_desc-fake_anat.tsv": ["sub-02_ses-post_T1w.nii.gz"],
        "sub-02/ses-post/sub-02_ses-post_desc-fake_func.tsv":
            ["sub-02_ses-post_task-rest_bold.nii.gz"],
        "sub-02/ses-post/sub-02_ses-post_desc-fake_dwi.tsv": ["sub-02_ses-post_dwi.nii.gz"],
        "sub-03/ses-pre/sub-03_ses-pre_desc-fake_anat.tsv": ["sub-03_ses-pre_T1w.nii.gz"],
        "sub-03/ses-pre/sub-03_ses-pre_desc-fake_func.tsv":
            ["sub-03_ses-pre_task-rest_bold.nii.gz"],
        "sub-03/ses-pre/sub-03_ses-pre_desc-fake_dwi.tsv": ["sub-03_ses-pre_dwi.nii.gz"],
        "sub-04/ses-pre/sub-04_ses-pre_desc-fake_anat.tsv": ["sub-04_ses-pre_T1w.nii.gz"],
        "sub-04/ses-pre/sub-04_ses-pre_desc-fake_func.tsv":
            ["sub-04_ses-pre_task-rest_bold.nii.gz"],
        "sub-04/ses-post/sub-04_ses-post_desc-fake_func.tsv":
            ["sub-04_ses-post_task-rest_bold.nii.gz"],
        "sub-04/ses-fu1/sub-04_ses-fu1_desc-fake_dwi.tsv": ["sub-04_ses-fu1_dwi.nii.gz"],
    }
    tables = {s: pd.read_csv(out / f"sub-{s}" / f"sub-{s}_sessions.tsv", sep="\t",
                             keep_default_na=False) for s in ("01", "02", "03", "04")}
    assert tables["01"]["missing"].tolist() == ["", "bold,dwi"]
    assert tables["02"][["n_t1w", "n_bold", "n_dwi"]].values.tolist() == [[0, 0, 1], [1, 1, 1]]
    assert tables["03"]["missing"].tolist() == [""]
    assert tables["04"]["missing"].tolist() == ["dwi", "t1w,dwi", "t1w,bold"]
    assert not _leftovers(out)
    json.loads((out / "dataset_description.json").read_text())


@pytest.mark.parametrize(("damaged", "kept", "message"), [
    ("func/sub-01_ses-pre_task-rest_bold.json", "dwi",
     "func/sub-01_ses-pre_task-rest_bold.nii.gz: RepetitionTime is missing"),
    ("dwi/sub-01_ses-pre_dwi.bval", "func", "cannot read the gradient table"),
])
def test_missing_sidecar_data_is_isolated(tmp_path, capsys, damaged, kept, message):
    bids = build_bids(tmp_path / "ds", {"01": {"pre": SessionSpec()},
                                        "02": {"pre": SessionSpec()}})
    target = bids / "sub-01" / "ses-pre" / damaged
    _drop_tr(target) if target.suffix == ".json" else target.unlink()
    out = tmp_path / "out"
    code = _run(bids, out)
    err = capsys.readouterr().err
    assert "1 step(s) failed; everything else finished:" in err
    assert f"[sub-01 ses-pre] input check: {bids / 'sub-01' / 'ses-pre'}/" in err
    assert message in err
    assert code == cli.EXIT_FAILED
    assert f"sub-01/ses-pre/sub-01_ses-pre_desc-fake_{kept}.tsv" in _markers(out)
    assert "sub-02/ses-pre/sub-02_ses-pre_desc-fake_func.tsv" in _markers(out)
    assert "sub-02/ses-pre/sub-02_ses-pre_desc-fake_dwi.tsv" in _markers(out)


# --------------------------------------------------------------------------- CLI: whole-run errors
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two subjects, one with two sessions and one with a single session."""
    return build_bids(tmp_path_factory.mktemp("small") / "ds", {
        "01": {"pre": SessionSpec(), "post": SessionSpec()},
        "02": {"pre": SessionSpec()},
    })


@pytest.mark.parametrize(("option", "message"), [
    (["--participant-label", "sub-01", "99"],
     "--participant-label: unknown participant label(s) 99; the dataset has: sub-01, sub-02."),
    (["--session-label", "post", "fu9"],
     "--session-label: unknown session label(s) fu9; the dataset has: ses-post, ses-pre."),
])
def test_labels_that_do_not_exist(small, tmp_path, capsys, option, message):
    out = tmp_path / "out"
    assert _run(small, out, *option) == cli.EXIT_USAGE
    assert f"trajectome: {message}" in capsys.readouterr().err
    assert not list(out.glob("sub-*"))


def test_invalid_bids_lists_validator_errors(tmp_path, capsys):
    bids = build_bids(tmp_path / "ds", {"01": {"pre": SessionSpec()}}, dataset_description=False)
    out = tmp_path / "out"
    code = cli.main([str(bids), str(out), "participant", "-w", str(tmp_path / "work")])
    assert code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"The BIDS validator found 1 error type(s) in {bids}" in err
    assert "[ERROR] MISSING_DATASET_DESCRIPTION" in err and "/dataset_description.json" in err
    assert "pass --skip-bids-validation" in err
    assert not list(out.glob("sub-*")) and not (tmp_path / "work").exists()


def test_custom_atlas_whose_table_does_not_match(small, tmp_path, capsys):
    labels = np.zeros((7, 8, 9), np.int16)
    labels[:2], labels[2:4], labels[4:] = 1, 2, 3
    image = tmp_path / "atlas-Bad_space-MNI152NLin2009cAsym_res-2_dseg.nii.gz"
    nb.save(nb.Nifti1Image(labels, np.diag([2.0, 2.0, 2.0, 1.0])), image)
    table = tmp_path / "atlas-Bad_space-MNI152NLin2009cAsym_res-2_dseg.tsv"
    table.write_text("index\tname\tnetwork\n1\tA\tDefault\n2\tB\tVisual\n4\tD\tVisual\n")
    out = tmp_path / "out"
    assert _run(small, out, "--atlas", str(image)) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert (f"trajectome: {image} / {table.name}: the table and the image disagree on labels "
            "(in image only: [3]; in table only: [4]). Give one table row per non-zero label "
            "of the image.") in err
    assert not list(out.glob("sub-*")) and not (out / "atlases" / "atlas-Bad").exists()


def test_output_dir_that_is_a_file(small, tmp_path, capsys):
    """Root writes anywhere, so chmod cannot make a directory unwritable here (test_cli.py
    covers chmod as a non-root user); an output path under a regular file always fails."""
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a directory\n")
    out = blocker / "out"
    assert _run(small, out, work=tmp_path / "work") == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"trajectome: {out}: cannot write the outputs (Not a directory)" in err
    assert blocker.read_text() == "not a directory\n"


def test_work_dir_of_an_older_version_is_left_alone(small, tmp_path):
    major, minor = package_version().split(".")[:2]
    old = tmp_path / "work" / f"trajectome_{major}_{int(minor) + 1 if minor == '0' else 0}_wf"
    assert old.name != f"trajectome_{major}_{minor}_wf"
    stale = old / "sub_01_wf" / "sessions_tsv" / "result_sessions_tsv.pklz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"garbage from an older version")  # would crash if it were read
    os.utime(stale, (1_000_000_000, 1_000_000_000))
    out = tmp_path / "out"
    assert _run(small, out, work=tmp_path / "work") == cli.EXIT_OK
    current = tmp_path / "work" / f"trajectome_{major}_{minor}_wf"
    assert (current / "sub_01_wf" / "sessions_tsv" / "result_sessions_tsv.pklz").exists()
    assert stale.read_bytes() == b"garbage from an older version"
    assert stale.stat().st_mtime == 1_000_000_000
    assert sorted(_markers(out)) == sorted(
        f"sub-{s}/ses-{ses}/sub-{s}_ses-{ses}_desc-fake_{kind}.tsv"
        for s, ses in (("01", "pre"), ("01", "post"), ("02", "pre"))
        for kind in ("anat", "func", "dwi"))


# --------------------------------------------------------------------------- concurrent runs
_CHILD = ("import sys; sys.path.insert(0, {tests!r}); import test_bad_input as t; "
          "t.install_fakes(); from workflows import cli; sys.exit(cli.main(sys.argv[1:]))")


def test_two_participant_runs_share_the_output_dir(small, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD.format(tests=str(TESTS)), str(small), str(out),
             "participant", "-w", str(work), "--nprocs", "1", "--skip-bids-validation",
             "--participant-label", label],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for label in ("01", "02")
    ]
    logs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs
    description = json.loads((out / "dataset_description.json").read_text())
    assert description == derivatives.dataset_description(
        name="Trajectome outputs", version=package_version(),
        source_datasets=[f"file://{small}"])
    assert sorted(_markers(out)) == sorted(
        f"sub-{s}/ses-{ses}/sub-{s}_ses-{ses}_desc-fake_{kind}.tsv"
        for s, ses in (("01", "pre"), ("01", "post"), ("02", "pre"))
        for kind in ("anat", "func", "dwi"))
    assert (out / "sub-01" / "sub-01_sessions.tsv").exists()
    assert (out / "sub-02" / "sub-02_sessions.tsv").exists()
    assert len(list((out / "logs").glob("trajectome-*_config.toml"))) == 2
    # the atlas both runs wrote is whole: every image label has its table row
    atlas = out / "atlases" / "atlas-Seitzman300"
    (image,) = atlas.glob("*_dseg.nii.gz")
    table = pd.read_csv(atlas / "atlas-Seitzman300_dseg.tsv", sep="\t")
    labels = set(np.unique(np.asanyarray(nb.load(image).dataobj)).tolist()) - {0}
    assert labels == set(table["index"]) and len(table) == 300
    assert not _leftovers(out)


# --------------------------------------------------------------------------- disk full
def _disk_fills_after(monkeypatch, limit):
    """Make every ``os.fdopen`` file accept ``limit`` bytes, then fail with ENOSPC."""
    real = os.fdopen

    class Full:
        def __init__(self, handle):
            self._handle, self._left = handle, limit

        def write(self, data):
            if len(data) > self._left:
                self._handle.write(data[: self._left])
                self._handle.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._left -= len(data)
            return self._handle.write(data)

        def __getattr__(self, name):
            return getattr(self._handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

    monkeypatch.setattr(os, "fdopen", lambda *args, **kwargs: Full(real(*args, **kwargs)))


@pytest.mark.parametrize("existing", [True, False])
def test_disk_full_while_writing_a_table(tmp_path, monkeypatch, existing):
    target = tmp_path / "sub-01_ses-pre_relmat.tsv"
    if existing:
        target.write_text("old\tcontent\n")
    table = pd.DataFrame(np.arange(600.0).reshape(20, 30))
    _disk_fills_after(monkeypatch, 1000)
    with pytest.raises(OSError, match="No space left on device") as info:
        derivatives.write_tsv(target, table)
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == ([target.name] if existing else [])
    if existing:
        assert target.read_text() == "old\tcontent\n"


def test_disk_full_while_saving_a_nifti(tmp_path):
    target = tmp_path / "sub-01_T1w.nii.gz"
    nb.save(nb.Nifti1Image(np.ones((7, 8, 9), np.float32), np.eye(4)), target)
    before = target.read_bytes()

    def save_half(tmp):
        nb.save(nb.Nifti1Image(np.zeros((7, 8, 9), np.float32), np.eye(4)), tmp)
        tmp.write_bytes(tmp.read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    with pytest.raises(OSError, match="No space left on device"):
        derivatives.write_with(target, save_half)
    assert os.listdir(tmp_path) == [target.name] and target.read_bytes() == before


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 64 kB tmpfs (needs root and mount rights: skipped elsewhere)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here; the patched writers above cover disk full")
    try:
        yield mount
    finally:
        gc.collect()  # tracebacks kept by pytest.raises hold the writers' file objects
        subprocess.run(["umount", str(mount)], check=True)


def test_real_full_disk_keeps_the_old_file(tiny_disk):
    target = tiny_disk / "sub-01_ses-pre_relmat.tsv"
    derivatives.write_tsv(target, pd.DataFrame({"a": [1, 2]}))
    before = target.read_bytes()
    big = pd.DataFrame(np.random.default_rng(0).random((300, 40)))  # ~240 kB of text
    with pytest.raises(OSError) as info:
        derivatives.write_tsv(target, big)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as info:
        derivatives.write_with(tiny_disk / "sub-01_T1w.nii",
                               lambda tmp: nb.save(nb.Nifti1Image(big.to_numpy(), np.eye(4)), tmp))
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tiny_disk) == [target.name] and target.read_bytes() == before


def test_disk_full_in_the_derivatives_sink(tmp_path, monkeypatch):
    from workflows.interfaces import io

    source = tmp_path / "result.tsv"
    source.write_text("a\tb\n" + "1\t2\n" * 500)
    out = tmp_path / "out"

    def copy_half(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:300])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(io.shutil, "copyfile", copy_half)
    sink = io.DerivativesSink(in_file=str(source), base_directory=str(out),
                              entities={"subject": "01", "session": "pre"}, suffix="relmat",
                              extension=".tsv", meta_dict={"Description": "x"})
    with pytest.raises(OSError, match="No space left on device"):
        sink.run(cwd=str(tmp_path))
    folder = out / "sub-01" / "ses-pre"
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_temporaries_of_a_killed_run_are_removed(small, tmp_path):
    out = tmp_path / "out"
    orphan = out / "sub-01" / "ses-pre" / ".sub-01_ses-pre_relmat.tsv.k3j2h1g0.tmp"
    orphan.parent.mkdir(parents=True)
    orphan.write_text("half a tab")
    os.utime(orphan, (1_000_000_000, 1_000_000_000))  # SIGKILLed long ago
    assert _run(small, out, "--participant-label", "02", work=tmp_path / "work") == cli.EXIT_OK
    assert not orphan.exists() and not _leftovers(out)
