"""Functional-connectome workflow: unit checks of its parts and a run on bids_examples/ds-ect.

The integration tests take the anatomical inputs from the simulator's ground truth (true
brain mask, template tissue maps pulled into T1w through the true MNI -> T1w map, and the
true T1w -> MNI coordinate map as ``to_mni``), so they test the functional maths only.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from pipeline import motion, registration
from pipeline.bids import BoldRun, Session
from pipeline.registration import itk_affine_text
from workflows.anat import AtlasFiles
from workflows.func import init_func_wf, run_entities
from workflows.interfaces.func import find_fmriprep_run, slice_time_correct

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "bids_examples" / "ds-ect"
SUB, SES = "pat01", "preECT"
STEM = f"sub-{SUB}_ses-{SES}"
ATLAS = "Seitzman300"

#: The strategy the workflow is measured with (see workflows.func.RECOMMENDED_STRATEGY).
STRATEGY_8P = """\
name: 8P
description: Six motion parameters plus the mean white-matter and CSF signals.
confounds: [trans_x, trans_y, trans_z, rot_x, rot_y, rot_z, white_matter, csf]
"""


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def _run(path: Path) -> BoldRun:
    meta = json.loads(Path(str(path).replace(".nii.gz", ".json")).read_text())
    return BoldRun(path, meta, {"subject": SUB, "session": SES, "task": "rest"})


def _session(run: BoldRun) -> Session:
    return Session(SUB, SES, "pre", 1, None, (), (run,), ())


# --------------------------------------------------------------------------- unit


def test_itk_affine_text_round_trips_through_ants(tmp_path):
    lps = motion.rigid_matrix([1.5, -2.0, 3.0, 0.1, -0.05, 0.02])
    path = tmp_path / "x_xfm.txt"
    path.write_text(itk_affine_text(lps))
    assert np.abs(registration.ants_file_to_affine(path) - lps).max() < 1e-6


def test_slice_time_correct_recovers_reference_time():
    tr, n_t, nz = 2.0, 60, 7
    timing = np.arange(nz) * tr / nz
    t = np.arange(n_t) * tr
    freq = 0.03  # Hz, well below Nyquist (0.25 Hz)
    data = np.empty((3, 4, nz, n_t), np.float32)
    for k in range(nz):  # slice k samples the same sinusoid at t + timing[k]
        data[:, :, k] = 100 + 10 * np.sin(2 * np.pi * freq * (t + timing[k]))
    out = slice_time_correct(data, timing, tr, axis=2)
    ref = np.mean([timing.min(), timing.max()])
    want = 100 + 10 * np.sin(2 * np.pi * freq * (t + ref))
    inner = slice(3, -3)  # spline end effects
    for k in range(nz):
        assert np.abs(out[0, 0, k, inner] - want[inner]).max() < 0.05, k
    with pytest.raises(ValueError, match="SliceTiming has 3 entries for 7 slices"):
        slice_time_correct(data, timing[:3], tr)


def test_find_fmriprep_run_prefers_asym_and_names_what_is_missing(tmp_path):
    raw = tmp_path / "raw" / "sub-01_ses-a_task-rest_run-2_bold.nii.gz"
    func = tmp_path / "fmriprep" / "sub-01" / "ses-a" / "func"
    func.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="--output-spaces MNI152NLin2009aSym"):
        find_fmriprep_run(tmp_path / "fmriprep", raw)
    stem = "sub-01_ses-a_task-rest_run-2"
    (func / f"{stem}_space-MNI152NLin2009cAsym_res-2_desc-preproc_bold.nii.gz").touch()
    with pytest.raises(FileNotFoundError, match="confounds missing"):
        find_fmriprep_run(tmp_path / "fmriprep", raw)
    (func / f"{stem}_desc-confounds_timeseries.tsv").touch()
    found = find_fmriprep_run(tmp_path / "fmriprep", raw)
    assert found["space"] == "MNI152NLin2009cAsym" and "mask" not in found
    (func / f"{stem}_space-MNI152NLin2009aSym_desc-preproc_bold.nii.gz").touch()
    (func / f"{stem}_space-MNI152NLin2009aSym_desc-brain_mask.nii.gz").touch()
    found = find_fmriprep_run(tmp_path / "fmriprep", raw)
    assert found["space"] == "MNI152NLin2009aSym"
    assert found["mask"].endswith("space-MNI152NLin2009aSym_desc-brain_mask.nii.gz")
    assert run_entities(raw) == {"task": "rest", "run": "2"}


def test_init_func_wf_graph_and_errors(tmp_path):
    bold = tmp_path / "sub-pat01_ses-preECT_task-rest_bold.nii.gz"
    nb.save(nb.Nifti1Image(np.zeros((2, 2, 2, 3), np.float32), np.eye(4)), bold)
    bold.with_name(bold.name.replace(".nii.gz", ".json")).write_text('{"RepetitionTime": 2}')
    run = _run(bold)
    atlas = AtlasFiles("Test", tmp_path / "a.nii.gz", tmp_path / "a.tsv")
    atlas.image.touch()
    atlas.table.touch()
    kwargs = dict(session=_session(run), bold_runs=[run], atlases=[atlas],
                  output_dir=tmp_path / "out", strategy="36P", fd_threshold=0.3,
                  min_minutes=4.0, omp_nthreads=1, sloppy=True, seed=1)
    wf = init_func_wf(estimators=["pearson", "partial"], **kwargs)
    names = set(wf.list_node_names())
    assert {"inputnode", "realign_run_1", "coreg_run_1", "to_mni_run_1", "confounds_run_1",
            "parcels_Test_run_1", "connectivity_Test"} <= names
    assert any("partialcorrelation_relmat" in n for n in names)
    assert "0.3 mm" in wf.__desc__ and "[@ants]" in wf.__desc__
    with pytest.raises(ValueError, match="--fc-estimators"):
        init_func_wf(estimators=["spearman"], **kwargs)
    with pytest.raises(ValueError, match="neither a built-in"):
        init_func_wf(estimators=["pearson"], **{**kwargs, "strategy": "nope"})
    with pytest.raises(ValueError, match="no BOLD run"):
        init_func_wf(estimators=["pearson"], **{**kwargs, "bold_runs": []})


# --------------------------------------------------------------------------- integration


def _atlas(root: Path) -> AtlasFiles:
    from pipeline.atlas import build_default_atlas, write_atlas

    atlas = build_default_atlas()
    image = write_atlas(atlas, root)
    return AtlasFiles(atlas.name, image, image.parent / f"atlas-{atlas.name}_dseg.tsv")


def _run_workflow(tmp: Path, name: str, strategy: Path, fmriprep_dir: Path | None = None):
    from pipeline.simulate.qsiprep import groundtruth_anatomy

    run = _run(DATASET / f"sub-{SUB}" / f"ses-{SES}" / "func" / f"{STEM}_task-rest_bold.nii.gz")
    out = tmp / name / "out"
    wf = init_func_wf(
        session=_session(run), bold_runs=[run], atlases=[_atlas(tmp)], output_dir=out,
        strategy=str(strategy), fd_threshold=None, min_minutes=4.0,
        estimators=["pearson", "ledoit_wolf"], omp_nthreads=1, sloppy=True, seed=42,
        fmriprep_dir=fmriprep_dir,
    )
    wf.base_dir = str(tmp / name / "work")
    anat = groundtruth_anatomy(DATASET, SUB, SES, tmp / "anat")
    gt = DATASET / "derivatives" / "groundtruth" / f"sub-{SUB}" / f"ses-{SES}" / "anat"
    for field in ("t1w_preproc", "brain_mask", "wm", "csf"):
        setattr(wf.inputs.inputnode, field, str(getattr(anat, field)))
    wf.inputs.inputnode.to_mni = str(
        gt / f"{STEM}_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.nii.gz")
    wf.run(plugin="Linear")
    return out / f"sub-{SUB}" / f"ses-{SES}" / "func"


def _upper(table: pd.DataFrame) -> np.ndarray:
    return table.to_numpy(float)[np.triu_indices(len(table), 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The raw path and the fMRIPrep path on one session (about 1-2 min in all)."""
    from pipeline.simulate.fmriprep import write_fmriprep_run

    tmp = tmp_path_factory.mktemp("func")
    strategy = tmp / "8P.yml"
    strategy.write_text(STRATEGY_8P)
    raw = _run_workflow(tmp, "raw", strategy)
    write_fmriprep_run(DATASET, SUB, SES, tmp / "fmriprep")
    prep = _run_workflow(tmp, "fmriprep", strategy, fmriprep_dir=tmp / "fmriprep")
    return raw, prep


def _relmat(func: Path, stat: str = "pearsoncorrelation") -> pd.DataFrame:
    name = f"{STEM}_task-rest_space-MNI152NLin2009aSym_atlas-{ATLAS}_stat-{stat}_relmat.tsv"
    return pd.read_csv(func / name, sep="\t", index_col="Node")


def _planted(kind: str = "relmat") -> pd.DataFrame:
    gt = DATASET / "derivatives" / "groundtruth" / f"sub-{SUB}" / f"ses-{SES}" / "func"
    if kind == "outliers":
        return pd.read_csv(gt / f"{STEM}_task-rest_desc-planted_outliers.tsv", sep="\t")
    return pd.read_csv(gt / f"{STEM}_task-rest_atlas-{ATLAS}_desc-planted_stat-"
                       "pearsoncorrelation_relmat.tsv", sep="\t", index_col="Node")


@pytest.mark.integration
def test_raw_path_recovers_planted_fc_and_censors_spikes(runs):
    func, _ = runs
    rel = _relmat(func)
    planted = _planted().loc[rel.index, rel.columns]
    assert np.isfinite(rel.to_numpy()).all()  # no parcel lost at 5 mm
    r = np.corrcoef(_upper(rel), _upper(planted))[0, 1]
    assert r >= 0.85, r  # measured 0.896 (9 sessions: 0.852-0.907)
    assert np.allclose(np.diag(rel), 1.0)

    truth = _planted("outliers")
    prefix = f"{STEM}_task-rest_space-MNI152NLin2009aSym_atlas-{ATLAS}"
    outliers = pd.read_csv(func / f"{prefix}_outliers.tsv", sep="\t")
    assert (outliers["non_steady_state"] == truth["non_steady_state"]).all()
    spikes = truth["spike"].to_numpy() == 1
    assert outliers["censored"].to_numpy()[spikes].mean() >= 0.9
    # estimated FD follows the planted FD (spikes: 1.5-3 mm jerks)
    fd = outliers["framewise_displacement"].to_numpy()[1:]
    assert np.corrcoef(fd, truth["framewise_displacement"].to_numpy()[1:])[0, 1] > 0.9

    qc = pd.read_csv(func / f"{prefix}_desc-qc_bold.tsv", sep="\t").iloc[0]
    n_kept = 122 - int(qc["n_censored"])
    assert qc["n_dummy"] == 4 and qc["n_volumes"] == 122 and qc["qc_pass"] == 1
    assert np.isclose(qc["remaining_minutes"], n_kept * 2.2 / 60)
    ts = pd.read_csv(func / f"{prefix}_stat-mean_timeseries.tsv", sep="\t")
    assert ts.shape == (n_kept, 300)

    meta = json.loads((func / f"{prefix}_stat-pearsoncorrelation_relmat.json").read_text())
    assert meta["RelationshipMeasure"] == "Pearson correlation"
    assert meta["NumberOfVolumesCensored"] == qc["n_censored"]
    assert meta["DenoisingStrategy"] == "8P" and meta["QCPass"] is True
    assert meta["NodeFiles"][0].startswith(f"atlas-{ATLAS}/")
    z = pd.read_csv(func / f"{prefix}_desc-fisherz_stat-pearsoncorrelation_relmat.tsv",
                    sep="\t", index_col="Node")
    off = ~np.eye(len(rel), dtype=bool)
    np.testing.assert_allclose(np.tanh(z.to_numpy()[off]), rel.to_numpy()[off], atol=1e-9)
    conf = func / f"{STEM}_task-rest_desc-confounds_timeseries"
    columns = pd.read_csv(f"{conf}.tsv", sep="\t", nrows=1).columns
    described = json.loads(Path(f"{conf}.json").read_text())
    assert set(columns) == set(described)
    xfm = registration.ants_file_to_affine(
        func / f"{STEM}_task-rest_from-boldref_to-T1w_mode-image_desc-coreg_xfm.txt")
    # BOLD and T1w share the scanner frame in the simulator: coregistration ~ identity
    assert np.abs(xfm[:3, 3]).max() < 1.0 and np.abs(xfm[:3, :3] - np.eye(3)).max() < 0.02
    lw = _relmat(func, "ledoitwolfcorrelation")
    assert np.corrcoef(_upper(lw), _upper(planted))[0, 1] >= 0.85


@pytest.mark.integration
def test_fmriprep_path_agrees_with_raw_path(runs):
    raw, prep = runs
    a, b = _relmat(raw), _relmat(prep)
    planted = _planted().loc[a.index, a.columns]
    r_prep = np.corrcoef(_upper(b), _upper(planted))[0, 1]
    assert r_prep >= 0.85, r_prep
    # same maths after preprocessing; differences come from estimated vs true motion and
    # coregistration only.  Measured (bench/bench_func.py, 9 sessions): r 0.946-0.991, mean
    # |diff| 0.021-0.054; this session 0.979 and 0.035
    assert np.corrcoef(_upper(a), _upper(b))[0, 1] >= 0.93
    assert np.abs(_upper(a) - _upper(b)).mean() <= 0.06
    meta = json.loads((prep / f"{STEM}_task-rest_space-MNI152NLin2009aSym_atlas-{ATLAS}_"
                       "stat-pearsoncorrelation_relmat.json").read_text())
    assert meta["Space"] == "MNI152NLin2009aSym"
    assert not list(prep.glob("*desc-confounds_timeseries.tsv"))  # taken, not re-written


def test_denoise_connectivity_joins_runs_like_the_library(rng, tmp_path):
    from pipeline import connectivity, denoise
    from pipeline.confounds import expand_confounds, framewise_displacement
    from workflows.interfaces.func import DenoiseConnectivity

    names = [f"p{i}" for i in range(5)]
    ts_files, conf_files, runs = [], [], []
    strategy = denoise.load_strategy("24P")
    for i, n_t in enumerate((70, 83)):
        scale = np.array([0.02, 0.02, 0.02, 3e-4, 3e-4, 3e-4])  # FD ~0.1 mm
        params = np.cumsum(rng.normal(size=(n_t, 6)) * scale, axis=0)
        conf = pd.DataFrame(params, columns=list(motion.MOTION_COLUMNS))
        conf = expand_confounds(conf, list(motion.MOTION_COLUMNS))
        fd = framewise_displacement(params)
        fd[20 + i] = 1.2  # one censored volume (plus its short neighbourhood) per run
        conf["framewise_displacement"] = fd
        conf["non_steady_state_outlier_00"] = (np.arange(n_t) == 0).astype(int)
        data = rng.normal(size=(n_t, 5)) + 100
        data[:, 3] = np.nan if i == 1 else data[:, 3]  # parcel p3 lost in run 2
        ts_files.append(tmp_path / f"ts{i}.tsv")
        conf_files.append(tmp_path / f"conf{i}.tsv")
        pd.DataFrame(data, columns=names).to_csv(ts_files[-1], sep="\t", index=False,
                                                 na_rep="n/a")
        conf.to_csv(conf_files[-1], sep="\t", index=False, na_rep="n/a")
        runs.append(denoise.denoise_run(data, conf, 2.0, strategy))
    node = DenoiseConnectivity(
        timeseries=[str(f) for f in ts_files], confounds=[str(f) for f in conf_files],
        repetition_times=[2.0, 2.0], strategy="24P", min_minutes=4.0,
        estimators=["pearson", "partial"], atlas="T", tsnr=[50.0, 60.0],
    )
    res = node.run(cwd=str(tmp_path)).outputs
    for r in runs:
        r.data[:, 3] = np.nan
    want = denoise.concatenate_runs(runs)
    got = pd.read_csv(res.timeseries, sep="\t", na_values="n/a").to_numpy()
    assert got.shape == want.data.shape == (153 - 2 - want.n_censored, 5)
    assert np.allclose(got, want.data, equal_nan=True, atol=1e-8)
    rel = pd.read_csv(res.pearson, sep="\t", index_col="Node").to_numpy()
    assert np.allclose(rel, connectivity.connectivity(want.data, "pearson"), equal_nan=True,
                       atol=1e-8)
    assert np.isnan(rel[3]).all() and res.pearson_meta["DroppedParcels"] == ["p3"]
    qc = pd.read_csv(res.qc, sep="\t").iloc[0]
    assert qc["n_runs"] == 2 and qc["n_dummy"] == 2 and qc["n_censored"] == want.n_censored
    assert np.isclose(qc["tsnr_median"], 55.0)
    # 153 volumes - 2 dummies - censored ones at TR 2 s: over 4 min, so the session passes
    assert qc["qc_pass"] == 1 and np.isclose(qc["remaining_minutes"],
                                             (151 - want.n_censored) * 2 / 60)
    out = pd.read_csv(res.outliers, sep="\t")
    assert list(out["run"].value_counts().sort_index()) == [70, 83]
    assert out["censored"].sum() == want.n_censored
    fail = DenoiseConnectivity(
        timeseries=[str(ts_files[0])], confounds=[str(conf_files[0])], repetition_times=[2.0],
        strategy="24P", min_minutes=4.0, atlas="T",
    ).run(cwd=str(tmp_path)).outputs
    assert "under the minimum of 4 min" in fail.pearson_meta["QCReason"]
    assert pd.read_csv(fail.qc, sep="\t")["qc_pass"].iloc[0] == 0
