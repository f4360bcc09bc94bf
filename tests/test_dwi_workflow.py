"""The diffusion workflow: tracking + connectome interface on a planted synthetic tract,
graph building and option checks, QSIPrep inputs, and a ds-ect session end to end."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from pipeline import registration, tractography
from pipeline.bids import DwiRun, Session
from pipeline.derivatives import build_path
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
    # the toy tract is built for tissue stopping (GM ends, CSF around, constant FA)
    options = {"seed": 3, "stopping": "cmc", **options}
    opts = tractography.TrackingOptions(n_streamlines=300, n_threads=1, chunk_size=128,
                                        **options)
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
        model={"model": "csd", "reason": "planted", "sh_order": 6}, stopping="cmc",
        assignment_radius=2.0,
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
    assert meta["EndpointAssignment"].startswith("radial search 2 mm") and "FAThreshold" not in meta
    # the TCK holds the same streamlines, in T1w world: its first point sits on the tract
    header = Path(out.tractogram).read_bytes()[:200].decode(errors="ignore")
    assert "count: 0000000200" in header


def _session(tmp_path, n_runs=1):
    runs = []
    for i in range(n_runs):
        stem = tmp_path / f"sub-01_ses-pre_run-{i + 1}_dwi"
        for ext in (".bval", ".bvec"):  # the interfaces check the files exist
            Path(f"{stem}{ext}").touch()
        # a real header: the scheduler's memory estimate is read from it
        nb.save(nb.Nifti1Image(np.zeros((10, 10, 10, 5), np.int16), np.eye(4)),
                f"{stem}.nii.gz")
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
    # reserved memory grows with the run's size (fitted to the realistic subject's peaks)
    assert wf.get_node("preproc_run_1").mem_gb == pytest.approx(0.8 + 10 * 5000 * 4 / 1e9)
    assert set(wf.get_node("inputnode").inputs.copyable_trait_names()) >= set(INPUT_FIELDS)
    merge = wf.get_node("merge_streamlinecount")  # outputnode list: one relmat per atlas
    assert merge.interface._numinputs == 2
    assert {"streamlinecount", "volumenormalizedcount", "fa", "qc"} <= set(
        wf.get_node("outputnode").inputs.copyable_trait_names())
    desc = wf.__desc__
    for key in ("@veraart2016", "@kellner2016", "@mrtrix3", "@dipy"):
        assert key in desc
    # the default stops on FA, from the grey-matter level, and assigns ends within 4 mm
    assert "FA below that of grey matter" in desc and "4 mm radial search" in desc
    track = wf.get_node("track_connectomes").inputs
    assert track.stopping == "threshold" and track.fa_threshold is None
    cmc = init_dwi_wf(session=session, dwi_runs=runs, atlases=atlases, output_dir=tmp_path,
                      stopping="cmc", fa_threshold=0.2, assignment_radius=2.0)
    assert "@girard2014" in cmc.__desc__ and "2 mm radial search" in cmc.__desc__
    assert cmc.get_node("track_connectomes").inputs.assignment_radius == 2.0
    # the space-dwi mask names its grid: the FA map this workflow writes (a validator rule)
    sinks = {n: wf.get_node(n).inputs for n in names if n.startswith("ds_")}
    mask = next(i for i in sinks.values() if i.suffix == "mask")
    fa = next(i for i in sinks.values() if i.entities.get("param") == "fa")
    fa_path = build_path(fa.entities, fa.suffix, fa.extension, fa.datatype).as_posix()
    assert mask.meta_dict["SpatialReference"] == f"bids::{fa_path}"


@pytest.mark.parametrize("option, value, message", [
    ("tracking", "eudx", "--tracking"),
    ("seeding", "everywhere", "--seeding"),
    ("fod_model", "dsi", "--fod-model"),
    ("stopping", "fod", "--stopping"),
    ("n_streamlines", 0, "--streamlines"),
    ("fa_threshold", 1.5, "FA threshold"),
    ("assignment_radius", 0.0, "assignment radius"),
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
#
# One full-size session goes through the QSIPrep path on its MP-PCA-denoised series (what
# QSIPrep hands over), so the AUC is measured on the whole brain without paying for motion
# correction; the raw BIDS path (denoising, motion correction, concatenation) runs on a
# cropped copy of the same series.  Together 51-57 s on two otherwise idle cores.

#: Streamlines of the full-size run: on this path pat01 preECT gave AUC 0.895 / 0.907 /
#: 0.919 / 0.932 at 10k / 20k / 30k / 40k (bench/bench_dwi_auc.py: the raw path on all
#: nine sessions at 50k, 0.943-0.982).
ECT_STREAMLINES = 40_000
STEM = "sub-pat01_ses-preECT"


def _gt(name: str) -> Path:
    return ECT / "derivatives" / "groundtruth" / "sub-pat01" / "ses-preECT" / "dwi" / (
        f"{STEM}_{name}")


def _run(wf, anat, base: Path) -> None:
    wf.base_dir = str(base)
    for field in ("t1w_preproc", "brain_mask", "gm", "wm", "csf"):
        setattr(wf.inputs.inputnode, field, str(getattr(anat, field)))
    wf.inputs.inputnode.atlas_native = [str(anat.atlas_native)]
    wf.run(plugin="Linear")


@pytest.fixture(scope="module")
def ect_qsiprep(tmp_path_factory):
    """pat01 preECT, MP-PCA-denoised, in QSIPrep's layout, through the workflow (sloppy)."""
    from bench.bench_dwi import atlas_files
    from pipeline import dwi
    from pipeline.simulate.qsiprep import groundtruth_anatomy, qsiprep_layout

    work = tmp_path_factory.mktemp("dwi_ect")
    start = time.perf_counter()
    image = qsiprep_layout(ECT, "pat01", "preECT", work / "qsiprep")
    img = nb.load(image)
    bvals = np.loadtxt(str(image).replace(".nii.gz", ".bval"))
    data = np.asarray(img.dataobj, np.float32)
    denoised, _ = dwi.denoise(data, bvals, mask=dwi.brain_mask(data, bvals))
    nb.save(nb.Nifti1Image(denoised, img.affine), image)
    anat = groundtruth_anatomy(ECT, "pat01", "preECT", work / "anat_pat01_preECT")
    session = Session("pat01", "preECT", "pre", 1, None, (), (), ())
    wf = init_dwi_wf(session=session, dwi_runs=[], atlases=[atlas_files(work)],
                     output_dir=work / "out", n_streamlines=ECT_STREAMLINES, sloppy=True,
                     qsiprep_dir=work / "qsiprep", omp_nthreads=2, seed=42,
                     name="dwi_pat01_preECT_wf")
    assert not any(n.startswith("preproc_") for n in wf.list_node_names())
    _run(wf, anat, work / "wk")
    return work, work / "wk" / wf.name, time.perf_counter() - start


@pytest.mark.integration
def test_ect_session_recovers_planted_bundles(ect_qsiprep):
    from bench.bench_dwi import fa_contrast, planted_auc

    work, wf_dir, seconds = ect_qsiprep
    out = work / "out" / "sub-pat01" / "ses-preECT" / "dwi"
    relmat = out / f"{STEM}_space-T1w_atlas-Seitzman300_stat-streamlinecount_relmat.tsv"
    auc, n_planted, n_hit = planted_auc(
        relmat, _gt("atlas-Seitzman300_desc-planted_stat-bundlecount_relmat.tsv"))
    # measured 0.932 (35 of 40 planted edges hit); CMC stopping gave 0.64-0.70 on ds-ect
    assert n_planted == 40
    assert auc >= 0.9 and n_hit >= 33
    fa_map = out / f"{STEM}_space-dwi_model-dti_param-fa_dwimap.nii.gz"
    gm_dwi = wf_dir / "register_dwi_t1w" / "gm_dwi.nii.gz"
    fa_bundles, fa_gm = fa_contrast(fa_map, _gt("space-dwi_desc-bundles_mask.nii.gz"), gm_dwi)
    assert fa_bundles > 0.4 and fa_gm < 0.03  # measured 0.52 and 0.011
    meta = json.loads(relmat.with_suffix(".json").read_text())
    assert meta["StreamlineCount"] == ECT_STREAMLINES and meta["RandomSeed"] == 42
    assert meta["FibreModel"] == "csd" and "32 directions" in meta["FibreModelReason"]
    assert meta["StoppingCriterion"] == "threshold"
    assert meta["EndpointAssignment"].startswith("radial search 4 mm")
    # the FA threshold is the grey-matter level of this session's FA (0.057 measured)
    expected = tractography.gm_fa_threshold(np.asarray(nb.load(fa_map).dataobj),
                                            np.asarray(nb.load(gm_dwi).dataobj))
    assert meta["FAThreshold"] == pytest.approx(expected) and 0.04 < expected < 0.08
    qc = pd.read_csv(out / f"{STEM}_space-T1w_desc-qc_dwi.tsv", sep="\t")
    assert qc.loc[0, "n_volumes"] == 34 and qc.loc[0, "n_streamlines"] == ECT_STREAMLINES
    assert qc.loc[0, "mean_fd"] == 0  # QSIPrep gave no confounds: no motion is claimed
    assert qc.loc[0, "registration_translation_mm"] < 3  # DWI and T1w share the scanner space
    assert 0.05 < qc.loc[0, "fraction_assigned_two_parcels"] < 1
    assert (wf_dir / "qsiprep_inputs" / "dwi_b0.nii.gz").exists()
    print(f"ds-ect pat01 preECT (QSIPrep path, {ECT_STREAMLINES} streamlines): AUC {auc:.3f} "
          f"({n_hit}/{n_planted} planted edges hit), FA threshold {expected:.3f}, "
          f"FA {fa_bundles:.3f} vs {fa_gm:.3f}, {seconds:.0f} s")


@pytest.mark.integration
def test_ect_tracking_is_reproducible(ect_qsiprep):
    from bench.bench_dwi import retrack

    work, wf_dir, _ = ect_qsiprep
    same = retrack(wf_dir, work, work / "anat_pat01_preECT", n_streamlines=ECT_STREAMLINES,
                   seed=42, num_threads=2, chunk_size=15_000)  # other chunks: same streamlines
    original = (work / "out" / "sub-pat01" / "ses-preECT" / "dwi"
                / f"{STEM}_space-T1w_atlas-Seitzman300_stat-streamlinecount_relmat.tsv")
    assert same.read_bytes() == original.read_bytes()


@pytest.mark.integration
def test_ect_raw_path_on_a_cropped_series(tmp_path):
    """Denoising, motion correction and concatenation run on a crop of the series: a box
    around the brain centre and 18 of the 34 volumes (both b=0s, 16 directions)."""
    from bench.bench_dwi import atlas_files
    from pipeline.simulate.qsiprep import groundtruth_anatomy
    from workflows.interfaces.dwi import read_gradients, write_gradients

    raw = ECT / "sub-pat01" / "ses-preECT" / "dwi" / f"{STEM}_dwi"
    folder = tmp_path / "sub-pat01" / "ses-preECT" / "dwi"
    folder.mkdir(parents=True)
    volumes = np.r_[0:9, 17:26]  # b=0 at 0 and 17
    crop = nb.load(f"{raw}.nii.gz").slicer[10:34, 12:40, 14:28]  # keeps its world position
    nb.save(nb.Nifti1Image(np.asarray(crop.dataobj)[..., volumes], crop.affine),
            folder / f"{STEM}_dwi.nii.gz")
    bvals, bvecs = read_gradients(f"{raw}.bval", f"{raw}.bvec")
    write_gradients(bvals[volumes], bvecs[volumes], str(folder), f"{STEM}_dwi")
    stem = folder / f"{STEM}_dwi"
    run = DwiRun(Path(f"{stem}.nii.gz"), Path(f"{stem}.bval"), Path(f"{stem}.bvec"), {}, {})
    session = Session("pat01", "preECT", "pre", 1, None, (), (), (run,))
    anat = groundtruth_anatomy(ECT, "pat01", "preECT", tmp_path / "anat")
    wf = init_dwi_wf(session=session, dwi_runs=[run], atlases=[atlas_files(tmp_path)],
                     output_dir=tmp_path / "out", n_streamlines=2_000, sloppy=True)
    _run(wf, anat, tmp_path / "wk")
    out = tmp_path / "out" / "sub-pat01" / "ses-preECT" / "dwi"
    motion = pd.read_csv(out / f"{STEM}_desc-motion_timeseries.tsv", sep="\t")
    assert len(motion) == 18 and motion.loc[0, "framewise_displacement"] == 0
    # the planted drift is at most 0.5 mm and 0.5 degrees
    assert motion[["trans_x", "trans_y", "trans_z"]].abs().to_numpy().max() < 1.0
    assert motion[["rot_x", "rot_y", "rot_z"]].abs().to_numpy().max() < 1.0
    qc = pd.read_csv(out / f"{STEM}_space-T1w_desc-qc_dwi.tsv", sep="\t")
    assert qc.loc[0, "n_runs"] == 1 and qc.loc[0, "n_volumes"] == 18
    assert 0 < qc.loc[0, "mean_fd"] < qc.loc[0, "max_fd"] < 1.5
    assert qc.loc[0, "registration_translation_mm"] < 3
    assert qc.loc[0, "n_streamlines"] == 2_000
    preproc = nb.load(tmp_path / "wk" / wf.name / "preproc_run_1" / "dwi_preproc.nii.gz")
    assert preproc.shape == (*crop.shape[:3], 18) and np.allclose(preproc.affine, crop.affine)
    meta = json.loads((out / f"{STEM}_space-dwi_model-dti_param-fa_dwimap.json").read_text())
    assert meta["FibreModel"] == "csd" and "16 directions" in meta["FibreModelReason"]
    for stat in ("streamlinecount", "volumenormalizedcount", "meanlength", "meanfa"):
        assert (out / f"{STEM}_space-T1w_atlas-Seitzman300_stat-{stat}_relmat.tsv").exists()
    # the b=0 -> T1w transform is self-contained ITK text (no work-directory paths), the
    # same rigid map the end points went through
    xfm = out / f"{STEM}_from-dwi_to-T1w_mode-image_desc-coreg_xfm.txt"
    assert "Transform: AffineTransform_double_3_3" in xfm.read_text()
    assert not list(out.glob("*_xfm.json"))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    used = np.loadtxt(tmp_path / "wk" / wf.name / "register_dwi_t1w" / "dwi_to_t1w.txt")
    written = np.linalg.inv(lps @ registration.ants_file_to_affine(xfm) @ lps)
    assert np.abs(written - used).max() < 1e-6
