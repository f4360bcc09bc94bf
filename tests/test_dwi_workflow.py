"""The diffusion workflow: tracking + connectome interface on a planted synthetic tract,
graph building and option checks, QSIPrep inputs, and one ds-ect session end to end."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from pipeline import tractography
from pipeline.bids import DwiRun, Session
from workflows.anat import AtlasFiles
from workflows.dwi import INPUT_FIELDS, find_qsiprep_dwi, init_dwi_wf
from workflows.interfaces.dwi import TrackConnectomes, map_points, track_session

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the ds-ect tests reuse bench/bench_dwi.py's helpers
    sys.path.insert(0, str(ROOT))
ECT = ROOT / "bids_examples" / "ds-ect"
SHIFT = np.array([0.0, 20.0, -4.0])  # DWI world -> T1w world translation of the toy tract


def _fibre_sh(direction: np.ndarray, sh_order: int = 6) -> np.ndarray:
    """SH coefficients (DIPY descoteaux07) of a sharp single-fibre FOD along ``direction``."""
    from dipy.data import default_sphere
    from dipy.reconst.shm import sf_to_sh

    cos = default_sphere.vertices @ (direction / np.linalg.norm(direction))
    return sf_to_sh(np.exp(-20 * (1 - cos**2)), default_sphere, sh_order_max=sh_order)


@pytest.fixture
def tract(tmp_path):
    """A straight WM tract along x (DWI grid, 2 mm) ending in GM at both ends.

    Planted truth on the T1w grid (shifted by :data:`SHIFT`): parcel 3 covers the left end,
    parcel 7 the right end, parcel 5 lies off the tract; only 3-7 is connected.
    """
    shape = (24, 9, 10)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-20.0, -6.0, -7.0]
    sh = np.broadcast_to(_fibre_sh(np.array([1.0, 0.0, 0.0])), (*shape, 28)).copy()
    gm = np.zeros(shape, np.float32)
    gm[:3], gm[-3:] = 1, 1
    # two CSF voxels around the tract: streamlines that drift out are rejected before
    # they sample FA near the image border (where interpolation falls to 0)
    csf = np.ones(shape, np.float32)
    csf[:, 2:-2, 2:-2] = 0
    gm *= 1 - csf
    wm = 1 - gm - csf
    fa = np.full(shape, 0.7, np.float32)
    files = {}
    for name, data in {"fod": sh, "fa": fa, "gm": gm, "wm": wm, "csf": csf}.items():
        files[name] = str(tmp_path / f"{name}.nii.gz")
        nb.save(nb.Nifti1Image(data.astype(np.float32), affine), files[name])
    # labels on a T1w grid of a different size, in T1w world (= DWI world + SHIFT)
    t1_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    t1_affine[:3, 3] = affine[:3, 3] + SHIFT - 2.0
    labels = np.zeros((27, 11, 10), np.int16)
    labels[:5], labels[-6:] = 3, 7  # the GM ends of the tract, and beyond
    labels[8:12, 0, 0] = 5
    files["labels"] = str(tmp_path / "labels.nii.gz")
    nb.save(nb.Nifti1Image(labels, t1_affine), files["labels"])
    table = pd.DataFrame({"index": [3, 5, 7], "name": ["left", "off", "right"],
                          "network": ["a", "b", "a"]})
    files["table"] = str(tmp_path / "atlas.tsv")
    table.to_csv(files["table"], sep="\t", index=False)
    matrix = np.eye(4)
    matrix[:3, 3] = SHIFT
    files["matrix"] = str(tmp_path / "dwi_to_t1w.txt")
    np.savetxt(files["matrix"], matrix)
    return files


def _track(files, matrix=None, **options):
    opts = tractography.TrackingOptions(n_streamlines=300, seed=options.pop("seed", 3),
                                        n_threads=1, chunk_size=128, **options)
    table = pd.read_csv(files["table"], sep="\t")
    accs, report = track_session(
        fod=nb.load(files["fod"]), fa=nb.load(files["fa"]),
        tissues={t: nb.load(files[t]) for t in ("gm", "wm", "csf")},
        atlases=[("toy", nb.load(files["labels"]), table)],
        dwi_to_t1w=np.loadtxt(files["matrix"]) if matrix is None else matrix, options=opts,
    )
    return accs["toy"], report


def test_planted_tract_is_the_only_edge(tract):
    acc, report = _track(tract)
    count = acc.matrix("count")
    assert report.n_streamlines == 300
    # 3-7 (matrix indices 0, 2) carries every streamline that reached two parcels
    assert count[0, 2] == count[2, 0] == acc.n_two_parcels
    assert acc.n_two_parcels >= 0.8 * 300  # measured 257: a few drift out of the thin tract
    assert count[0, 1] == count[1, 2] == 0
    # FA sampled along the streamlines on the DWI grid: the planted constant
    assert acc.matrix("mean_fa")[0, 2] == pytest.approx(0.7, abs=1e-6)
    # the tract spans the GM-to-GM length: 24 voxels * 2 mm minus the stopping margin
    assert 30 < acc.matrix("mean_length")[0, 2] <= 48


def test_end_points_go_through_the_dwi_to_t1w_map(tract):
    # without the translation the ends miss the (shifted) parcels by 20 mm: no edge
    acc, _ = _track(tract, matrix=np.eye(4))
    assert acc.n_two_parcels == acc.n_one_parcel == 0
    points = np.array([[1.0, 2.0, 3.0]])
    matrix = np.loadtxt(tract["matrix"])
    assert np.allclose(map_points(points, matrix), points + SHIFT)


def test_same_seed_same_connectome_other_seed_differs(tract):
    first, _ = _track(tract, seed=11)
    again, _ = _track(tract, seed=11)
    other, _ = _track(tract, seed=12)
    for measure in ("count", "mean_length"):
        assert np.array_equal(first.matrix(measure), again.matrix(measure), equal_nan=True)
    assert not np.array_equal(first.matrix("mean_length"), other.matrix("mean_length"),
                              equal_nan=True)


def test_track_interface_writes_relmats_and_sidecars(tract, tmp_path):
    node = TrackConnectomes(
        fod=tract["fod"], fa=tract["fa"], gm=tract["gm"], wm=tract["wm"], csf=tract["csf"],
        atlas_native=[tract["labels"]], atlas_names=["toy"], atlas_tables=[tract["table"]],
        dwi_to_t1w=tract["matrix"], n_streamlines=200, seed=5, save_tractogram=True,
        model={"model": "csd", "reason": "planted", "sh_order": 6},
    )
    result = node.run(cwd=str(tmp_path))
    out = result.outputs
    names = [Path(f).name for f in out.out_files]
    assert names == [f"atlas-toy_stat-{s}_relmat.tsv" for s in
                     ("streamlinecount", "volumenormalizedcount", "meanlength", "meanfa")]
    count = pd.read_csv(out.out_files[0], sep="\t", index_col="Node")
    assert list(count.index) == ["left", "off", "right"]
    assert count.loc["left", "right"] == out.qc[0]["n_assigned_two_parcels"] >= 150
    meta = out.sidecars[0]
    assert meta["StreamlineCount"] == 200 and meta["RandomSeed"] == 5
    assert meta["FibreModel"] == "csd" and meta["FibreModelReason"] == "planted"
    assert meta["StoppingCriterion"] == "cmc" and meta["TrackingAlgorithm"] == "probabilistic"
    # the TCK holds the same streamlines, in T1w world: its first point sits on the tract
    header = Path(out.tractogram).read_bytes()[:200].decode(errors="ignore")
    assert "count: 0000000200" in header


def _session(tmp_path, n_runs=1):
    runs = []
    for i in range(n_runs):
        stem = tmp_path / f"sub-01_ses-pre_run-{i + 1}_dwi"
        for ext in (".nii.gz", ".bval", ".bvec"):  # the interfaces check the files exist
            Path(f"{stem}{ext}").touch()
        runs.append(DwiRun(Path(f"{stem}.nii.gz"), Path(f"{stem}.bval"), Path(f"{stem}.bvec"),
                           {}, {}))
    return Session("01", "pre", "pre", 1, None, (), (), tuple(runs)), runs


def test_graph_has_the_stages_and_resources(tmp_path):
    session, runs = _session(tmp_path, 2)
    atlases = [AtlasFiles("A", tmp_path / "a.nii.gz", tmp_path / "a.tsv"),
               AtlasFiles("B", tmp_path / "b.nii.gz", tmp_path / "b.tsv")]
    for atlas in atlases:
        atlas.table.touch()
    wf = init_dwi_wf(session=session, dwi_runs=runs, atlases=atlases, output_dir=tmp_path,
                     n_streamlines=1000, omp_nthreads=2, save_tractogram=True)
    names = set(wf.list_node_names())
    assert {"preproc_run_1", "preproc_run_2", "concat_runs", "register_dwi_t1w", "fit_models",
            "track_connectomes", "dwi_qc", "detect_outliers"} <= names
    assert sum(n.startswith("ds_") and "relmat" in n for n in names) == 8
    assert any("streamlines_tck" in n for n in names)
    assert wf.get_node("track_connectomes").n_procs == 2
    assert set(wf.get_node("inputnode").inputs.copyable_trait_names()) >= set(INPUT_FIELDS)
    merge = wf.get_node("merge_streamlinecount")  # outputnode list: one relmat per atlas
    assert merge.interface._numinputs == 2
    assert {"streamlinecount", "volumenormalizedcount", "fa", "qc"} <= set(
        wf.get_node("outputnode").inputs.copyable_trait_names())
    desc = wf.__desc__
    for key in ("@veraart2016", "@kellner2016", "@girard2014", "@mrtrix3", "@dipy"):
        assert key in desc


@pytest.mark.parametrize("option, value, message", [
    ("tracking", "eudx", "--tracking"),
    ("seeding", "everywhere", "--seeding"),
    ("fod_model", "dsi", "--fod-model"),
    ("stopping", "fod", "--stopping"),
    ("n_streamlines", 0, "--streamlines"),
])
def test_bad_options_fail_at_build_time(tmp_path, option, value, message):
    session, runs = _session(tmp_path)
    atlases = [AtlasFiles("A", tmp_path / "a.nii.gz", tmp_path / "a.tsv")]
    with pytest.raises(ValueError, match=message):
        init_dwi_wf(session=session, dwi_runs=runs, atlases=atlases, output_dir=tmp_path,
                    **{option: value})


def test_qsiprep_files_are_found_or_the_folder_is_named(tmp_path):
    session, _ = _session(tmp_path)
    folder = tmp_path / "qsiprep" / "sub-01" / "ses-pre" / "dwi"
    with pytest.raises(FileNotFoundError, match=str(folder)):
        find_qsiprep_dwi(tmp_path / "qsiprep", session)
    folder.mkdir(parents=True)
    stem = folder / "sub-01_ses-pre_acq-multi_space-T1w_desc-preproc_dwi"
    for ext in (".nii.gz", ".bval", ".bvec"):
        Path(f"{stem}{ext}").write_text("x")
    (folder / "sub-01_ses-pre_acq-multi_space-T1w_desc-brain_mask.nii.gz").write_text("x")
    (folder / "sub-01_ses-pre_acq-multi_desc-confounds_timeseries.tsv").write_text("x")
    found = find_qsiprep_dwi(tmp_path / "qsiprep", session)
    assert found["in_file"] == f"{stem}.nii.gz" and found["bvec"] == f"{stem}.bvec"
    assert found["mask"].endswith("desc-brain_mask.nii.gz")
    assert found["confounds"].endswith("desc-confounds_timeseries.tsv")


# --------------------------------------------------------------------------- ds-ect


@pytest.fixture(scope="module")
def ect_session(tmp_path_factory):
    """pat01 preECT through the raw path (sloppy), anatomy from the ground truth."""
    from bench.bench_dwi import run_session

    work = tmp_path_factory.mktemp("dwi_ect")
    start = time.perf_counter()
    wf_dir = run_session(ECT, "pat01", "preECT", work, n_streamlines=20_000, sloppy=True,
                         seed=42)
    return work, wf_dir, time.perf_counter() - start


def _gt(name: str) -> Path:
    return (ECT / "derivatives" / "groundtruth" / "sub-pat01" / "ses-preECT" / "dwi"
            / f"sub-pat01_ses-preECT_{name}")


@pytest.mark.integration
def test_ect_session_recovers_planted_bundles(ect_session):
    from bench.bench_dwi import fa_contrast, planted_auc

    work, wf_dir, seconds = ect_session
    out = work / "out" / "sub-pat01" / "ses-preECT" / "dwi"
    stem = "sub-pat01_ses-preECT"
    relmat = out / f"{stem}_space-T1w_atlas-Seitzman300_stat-streamlinecount_relmat.tsv"
    truth = _gt("atlas-Seitzman300_desc-planted_stat-bundlecount_relmat.tsv")
    auc, n_planted, n_hit = planted_auc(relmat, truth)
    # measured 0.56-0.60 (CMC, WM seeds, 20k streamlines): far from the 0.9 target, because
    # WM outside the planted tubes is isotropic here and CMC lets streamlines wander in it
    assert n_planted == 40
    assert auc > 0.52 and n_hit >= 3
    # an FA-threshold stop ends streamlines where the tubes end: measured 0.82 at 20k
    from bench.bench_dwi import retrack

    fa_stop = retrack(wf_dir, work, work / "anat_pat01_preECT", stopping="threshold",
                      n_streamlines=20_000, seed=42)
    auc_fa, _, n_hit_fa = planted_auc(fa_stop, truth)
    assert auc_fa > 0.75 and n_hit_fa > n_hit
    fa_bundles, fa_gm = fa_contrast(out / f"{stem}_space-dwi_model-dti_param-fa_dwimap.nii.gz",
                                    _gt("space-dwi_desc-bundles_mask.nii.gz"),
                                    wf_dir / "register_dwi_t1w" / "gm_dwi.nii.gz")
    assert fa_bundles > 0.3 and fa_gm < 0.05  # measured 0.36 and 0.013
    meta = json.loads(relmat.with_suffix(".json").read_text())
    assert meta["StreamlineCount"] == 20_000 and meta["RandomSeed"] == 42
    assert meta["FibreModel"] == "csd" and "32 directions" in meta["FibreModelReason"]
    qc = pd.read_csv(out / f"{stem}_space-T1w_desc-qc_dwi.tsv", sep="\t")
    assert qc.loc[0, "n_volumes"] == 34 and qc.loc[0, "n_streamlines"] == 20_000
    assert 0 < qc.loc[0, "mean_fd"] < qc.loc[0, "max_fd"] < 3
    assert qc.loc[0, "registration_translation_mm"] < 3  # DWI and T1w share the scanner space
    assert 0.05 < qc.loc[0, "fraction_assigned_two_parcels"] < 1
    print(f"ds-ect pat01 preECT: AUC {auc:.3f} ({n_hit}/{n_planted} planted edges hit), "
          f"FA-threshold stop {auc_fa:.3f} ({n_hit_fa}), "
          f"FA {fa_bundles:.3f} vs {fa_gm:.3f}, workflow {seconds:.0f} s")


@pytest.mark.integration
def test_ect_tracking_is_reproducible(ect_session):
    from bench.bench_dwi import retrack

    work, wf_dir, _ = ect_session
    anat = work / "anat_pat01_preECT"
    same = retrack(wf_dir, work, anat, n_streamlines=20_000, seed=42)
    out = work / "out" / "sub-pat01" / "ses-preECT" / "dwi"
    original = (out / "sub-pat01_ses-preECT_space-T1w_atlas-Seitzman300_stat-"
                "streamlinecount_relmat.tsv")
    assert same.read_bytes() == original.read_bytes()
    other = retrack(wf_dir, work, anat, n_streamlines=20_000, seed=7)
    a = pd.read_csv(same, sep="\t", index_col="Node").to_numpy()
    b = pd.read_csv(other, sep="\t", index_col="Node").to_numpy()
    upper = np.triu_indices(len(a), 1)
    assert not np.array_equal(a, b)
    r = np.corrcoef(a[upper], b[upper])[0, 1]
    print(f"seed 42 vs 7 at 20k streamlines: r = {r:.3f}")
    assert r > 0.5


@pytest.mark.integration
def test_ect_session_from_qsiprep_outputs(tmp_path):
    """The QSIPrep path: the series is taken as it is (no preprocessing node runs)."""
    from bench.bench_dwi import atlas_files, planted_auc
    from pipeline.simulate.qsiprep import groundtruth_anatomy, qsiprep_layout

    qsiprep = tmp_path / "qsiprep"
    image = qsiprep_layout(ECT, "pat01", "preECT", qsiprep)
    anat = groundtruth_anatomy(ECT, "pat01", "preECT", tmp_path / "anat")
    session = Session("pat01", "preECT", "pre", 1, None, (), (), ())
    wf = init_dwi_wf(session=session, dwi_runs=[], atlases=[atlas_files(tmp_path)],
                     output_dir=tmp_path / "out", n_streamlines=5_000, sloppy=True,
                     qsiprep_dir=qsiprep)
    wf.base_dir = str(tmp_path / "wk")
    for field in ("t1w_preproc", "brain_mask", "gm", "wm", "csf"):
        setattr(wf.inputs.inputnode, field, str(getattr(anat, field)))
    wf.inputs.inputnode.atlas_native = [str(anat.atlas_native)]
    assert not any(n.startswith("preproc_") for n in wf.list_node_names())
    wf.run(plugin="Linear")
    assert (tmp_path / "wk" / wf.name / "qsiprep_inputs" / "dwi_b0.nii.gz").exists()
    out = tmp_path / "out" / "sub-pat01" / "ses-preECT" / "dwi"
    qc = pd.read_csv(out / "sub-pat01_ses-preECT_space-T1w_desc-qc_dwi.tsv", sep="\t")
    assert qc.loc[0, "n_volumes"] == nb.load(image).shape[3] == 34
    assert qc.loc[0, "mean_fd"] == 0  # QSIPrep gave no confounds: no motion is claimed
    auc, _, _ = planted_auc(
        out / "sub-pat01_ses-preECT_space-T1w_atlas-Seitzman300_stat-streamlinecount_relmat.tsv",
        _gt("atlas-Seitzman300_desc-planted_stat-bundlecount_relmat.tsv"))
    assert auc > 0.5
