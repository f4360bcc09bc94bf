"""Model + tracking + connectome end to end on a synthetic three-bundle phantom."""

from __future__ import annotations

import functools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.core.sphere import HemiSphere, disperse_charges
from dipy.sims.voxel import multi_tensor

from pipeline import connectome as C
from pipeline import models as M
from pipeline import tractography as T

SHAPE = (20, 20, 20)
ZOOM = 2.0
#: Planted edges (1-based parcel labels); every other pair of the 6 parcels is absent.
PLANTED = {(1, 2), (3, 4), (5, 6)}


@functools.cache
def scheme(n_dirs: int = 32, n_b0: int = 2, bval: float = 1000.0, seed: int = 0):
    """Single-shell scheme with electrostatically spread directions."""
    rng = np.random.default_rng(seed)
    theta = np.arccos(rng.uniform(-1, 1, n_dirs))
    phi = rng.uniform(0, 2 * np.pi, n_dirs)
    hemi, _ = disperse_charges(HemiSphere(theta=theta, phi=phi), 2000, const=0.05)
    bvecs = np.vstack([np.zeros((n_b0, 3)), hemi.vertices])
    bvals = np.r_[np.zeros(n_b0), np.full(n_dirs, bval)]
    return bvals, bvecs


@functools.cache
def make_phantom(seed: int = 0, snr: float = 30.0) -> dict:
    """20^3 voxels at 2 mm: three straight bundles, each between two labelled GM blobs.

    Bundles 1-2 and 3-4 run along x (z = 9..11), bundle 5-6 along y (z = 3..5), so none
    cross.  WM: single tensor (1.7, 0.2, 0.2) um^2/ms; GM blobs isotropic 0.8; the rest
    CSF (3.0).  Rician noise at SNR 30 on S0 = 100.
    """
    rng = np.random.default_rng(seed)
    bvals, bvecs = scheme()
    gtab = gradient_table(bvals, bvecs=bvecs)
    labels = np.zeros(SHAPE, np.int32)
    wm = np.zeros(SHAPE)
    direction = np.zeros((*SHAPE, 3))
    for y0, a, b in ((5, 1, 2), (14, 3, 4)):
        wm[4:16, y0 - 1 : y0 + 2, 9:12] = 1
        direction[4:16, y0 - 1 : y0 + 2, 9:12] = [1, 0, 0]
        labels[1:4, y0 - 2 : y0 + 3, 8:13] = a
        labels[16:19, y0 - 2 : y0 + 3, 8:13] = b
    wm[9:12, 4:16, 3:6] = 1
    direction[9:12, 4:16, 3:6] = [0, 1, 0]
    labels[8:13, 1:4, 2:7] = 5
    labels[8:13, 16:19, 2:7] = 6
    gm = (labels > 0).astype(float)
    csf = 1.0 - wm - gm

    def signal(evals, angles):
        s, _ = multi_tensor(gtab, np.array([evals]), S0=100, angles=[angles],
                            fractions=[100], snr=None)
        return s

    data = np.zeros((*SHAPE, len(bvals)))
    data[csf > 0.5] = signal([3e-3] * 3, (0, 0))
    data[gm > 0.5] = signal([0.8e-3] * 3, (0, 0))
    for vec, angles in (([1, 0, 0], (90, 0)), ([0, 1, 0], (90, 90))):
        data[(wm > 0.5) & np.all(direction == vec, axis=-1)] = signal([1.7e-3, 2e-4, 2e-4],
                                                                      angles)
    sigma = 100 / snr
    data = np.sqrt((data + rng.normal(0, sigma, data.shape)) ** 2
                   + rng.normal(0, sigma, data.shape) ** 2)
    affine = np.diag([ZOOM, ZOOM, ZOOM, 1.0])
    affine[:3, 3] = -ZOOM * (np.array(SHAPE) - 1) / 2
    return {"data": data, "bvals": bvals, "bvecs": bvecs, "gtab": gtab, "labels": labels,
            "wm": wm, "gm": gm, "csf": csf, "affine": affine, "direction": direction}


@functools.cache
def fitted_phantom() -> tuple[dict, np.ndarray, np.ndarray, M.ModelChoice]:
    p = make_phantom()
    choice = M.choose_model(M.summarize_acquisition(p["bvals"], p["bvecs"]))
    mask = np.ones(SHAPE, bool)
    dti = M.fit_dti(p["data"], p["gtab"], mask)
    fod = M.fit_fod(p["data"], p["gtab"], mask, choice, wm=p["wm"], fa=dti.fa)
    return p, fod.sh, dti.fa, choice


def track_phantom(tmp_tck: Path | None = None, **overrides) -> tuple[C.ConnectomeAccumulator,
                                                                        T.TrackingReport]:
    p, sh, fa, _ = fitted_phantom()
    options = T.TrackingOptions(**{"n_streamlines": 600, "seed": 1, "chunk_size": 250,
                                   "n_threads": 2, **overrides})
    sc = T.make_stopping_criterion(options, p["affine"], wm=p["wm"], gm=p["gm"],
                                   csf=p["csf"], scalar=fa)
    acc = C.ConnectomeAccumulator.from_label_image(p["labels"])
    report = T.run_tracking(
        sh, p["affine"], T.seed_mask_for(options, wm=p["wm"], gm=p["gm"]), sc, options,
        lambda chunk: acc.add_streamlines(chunk, p["labels"], p["affine"], fa=fa),
        tck_path=tmp_tck,
    )
    return acc, report


def _upper(matrix: np.ndarray) -> np.ndarray:
    return matrix[np.triu_indices(len(matrix), 1)]


def _planted_mask(n: int = 6) -> np.ndarray:
    planted = np.zeros((n, n), bool)
    for a, b in PLANTED:
        planted[a - 1, b - 1] = planted[b - 1, a - 1] = True
    return _upper(planted)


@pytest.mark.parametrize("algorithm", ["probabilistic", "deterministic"])
def test_phantom_end_to_end_recovers_planted_edges(algorithm):
    acc, report = track_phantom(algorithm=algorithm)
    assert report.n_streamlines == 600
    count = _upper(acc.matrix("count"))
    planted = _planted_mask()
    # Every planted edge beats every absent one (AUC = 1), by a wide margin.
    assert count[planted].min() > 100
    assert count[~planted].max() < 0.05 * count[planted].min()
    assert acc.qc()["fraction_assigned_two_parcels"] > 0.5
    # Streamlines run blob to blob along 12-voxel bundles: ~24 mm plus the GM entry.
    length = _upper(acc.matrix("mean_length"))[planted]
    assert np.all((length > 22) & (length < 30))
    # FA sampled along planted edges is high (WM ~0.87, GM ~0.07 in this phantom).
    fa = _upper(acc.matrix("mean_fa"))[planted]
    assert np.all(fa > 0.6)


def test_phantom_fa_bundles_vs_grey_matter():
    p, _, fa, choice = fitted_phantom()
    assert choice.model == "csd" and choice.sh_order == 6
    assert fa[p["wm"] > 0.5].mean() > 0.8
    assert fa[p["gm"] > 0.5].mean() < 0.15


def test_same_seed_identical_different_seed_correlated():
    a, _ = track_phantom()
    b, _ = track_phantom(chunk_size=111, n_threads=1)  # chunking and threads do not matter
    for measure in C.MEASURES:
        np.testing.assert_array_equal(a.matrix(measure), b.matrix(measure))
    c, _ = track_phantom(seed=2)
    assert not np.array_equal(a.matrix(), c.matrix())
    # 600 streamlines, 15 edges: the connectome is stable across seeds.
    assert np.corrcoef(_upper(a.matrix()), _upper(c.matrix()))[0, 1] > 0.95


def test_tck_written_in_chunks_matches_streamlines(tmp_path):
    acc, report = track_phantom(tmp_path / "t.tck", n_streamlines=300, chunk_size=70)
    assert report.n_chunks >= 5
    loaded = nib.streamlines.load(tmp_path / "t.tck")
    assert len(loaded.streamlines) == 300 == int(loaded.header["count"])
    p = make_phantom()
    again = C.ConnectomeAccumulator.from_label_image(p["labels"])
    again.add_streamlines(list(loaded.streamlines), p["labels"], p["affine"])
    np.testing.assert_array_equal(again.matrix(), acc.matrix())
    step = np.linalg.norm(np.diff(loaded.streamlines[0], axis=0), axis=1)
    np.testing.assert_allclose(step, 1.0, atol=1e-4)  # half the 2 mm voxel
    assert not list(tmp_path.glob(".*.tmp"))


def test_tissue_stopping_also_recovers_edges():
    for stopping in ("cmc", "act"):
        acc, _ = track_phantom(stopping=stopping, n_streamlines=300)
        count = _upper(acc.matrix("count"))
        assert count[_planted_mask()].min() > 50, stopping
        assert count[~_planted_mask()].max() <= 2, stopping


def test_fa_threshold_from_grey_matter():
    p, _, fa, _ = fitted_phantom()
    threshold = T.gm_fa_threshold(fa, p["gm"])
    gm_fa, wm_fa = fa[p["gm"] > 0.5], fa[p["wm"] > 0.5]
    # the 95th percentile of FA in the GM blobs: above their noise floor, far below WM
    assert threshold == pytest.approx(np.percentile(gm_fa[gm_fa > 0], 95))
    assert np.mean(gm_fa < threshold) == pytest.approx(0.95, abs=0.01)
    assert threshold < 0.2 * wm_fa.min()
    # a threshold under the GM noise floor lets streamlines run through the blobs into the
    # noisy CSF beyond: planted edges lose streamlines, absent ones gain them
    auto, _ = track_phantom(n_streamlines=300)
    low, _ = track_phantom(n_streamlines=300, threshold=0.02)
    planted = _planted_mask()
    assert _upper(auto.matrix())[planted].sum() > 2 * _upper(low.matrix())[planted].sum()
    # clipped to the bounds; empty GM is an error that says what to check
    rng = np.random.default_rng(0)
    gm = np.zeros((7, 8, 9))
    gm[2:5] = 1
    assert T.gm_fa_threshold(rng.uniform(0.5, 0.9, gm.shape), gm) == 0.2
    assert T.gm_fa_threshold(np.full(gm.shape, 1e-3), gm) == 0.02
    with pytest.raises(ValueError, match="grey-matter voxel"):
        T.gm_fa_threshold(np.ones(gm.shape), np.zeros(gm.shape))
    with pytest.raises(ValueError, match="same grid"):
        T.gm_fa_threshold(np.ones((7, 8, 9)), np.ones((9, 8, 7)))


def test_gmwm_interface_seeding():
    p = make_phantom()
    interface = T.gmwm_interface(p["wm"], p["gm"])
    # Bundle end slabs touching the blobs: x = 4 and x = 15 for bundles 1-2 and 3-4 ...
    assert interface[4, 5, 10] and interface[15, 14, 10] and not interface[10, 5, 10]
    # ... and y = 4, 15 for bundle 5-6.  2 x 9 voxels per end, 6 ends.
    assert interface.sum() == 6 * 9
    acc, _ = track_phantom(seeding="gmwmi", n_streamlines=300)
    assert _upper(acc.matrix())[_planted_mask()].min() > 50


def test_fa_threshold_seeding_drops_only_seeds_that_cannot_start():
    p, sh, fa, _ = fitted_phantom()
    # half of the white matter below the threshold
    threshold = float(np.median(fa[p["wm"] > 0.5]))
    options = T.TrackingOptions(n_streamlines=200, seed=1, threshold=threshold, chunk_size=100)
    everywhere = T.seed_mask_for(options, wm=p["wm"], gm=p["gm"])
    useful = T.seed_mask_for(options, wm=p["wm"], gm=p["gm"], fa=fa)
    assert np.array_equal(useful, everywhere & (fa > threshold))
    assert 0 < useful.sum() < everywhere.sum()
    # tissue criteria keep the whole white matter: they do not stop on FA
    act = T.TrackingOptions(stopping="act", threshold=threshold)
    assert np.array_equal(T.seed_mask_for(act, wm=p["wm"], fa=fa), everywhere)
    # a seed that cannot start costs a seed: the same streamlines take fewer seeds
    sc = T.make_stopping_criterion(options, p["affine"], scalar=fa)
    reports = [T.run_tracking(sh, p["affine"], mask, sc, options, lambda chunk: None)
               for mask in (everywhere, useful)]
    assert all(r.n_streamlines == 200 for r in reports)
    assert reports[1].n_seeds < reports[0].n_seeds


def test_options_are_validated():
    with pytest.raises(ValueError, match="algorithm"):
        T.TrackingOptions(algorithm="eudx")
    with pytest.raises(ValueError, match="min_length"):
        T.TrackingOptions(min_length=300)
    with pytest.raises(ValueError, match="empty"):
        T.seed_chunk(np.zeros((3, 3, 3), bool), np.eye(4), 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="wm, gm and csf"):
        T.make_stopping_criterion(T.TrackingOptions(stopping="cmc"), np.eye(4))
    with pytest.raises(ValueError, match="scalar map"):
        T.make_stopping_criterion(T.TrackingOptions(), np.eye(4))
    with pytest.raises(ValueError, match="pass gm"):
        T.make_stopping_criterion(T.TrackingOptions(), np.eye(4), scalar=np.ones((3, 3, 3)))
    with pytest.raises(ValueError, match="FA threshold"):
        T.TrackingOptions(threshold=1.5)
