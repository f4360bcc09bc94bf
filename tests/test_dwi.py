"""DWI preprocessing against planted ground truth: motion, dropouts, run scaling."""

from __future__ import annotations

import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.sims.voxel import single_tensor
from scipy import ndimage
from scipy.spatial.transform import Rotation

from pipeline import dwi as D


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(3)


def _head(rng, shape=(24, 26, 22)):
    """Ellipsoid 'head' with smooth texture (b=0) and a smooth diffusivity map."""
    grid = np.indices(shape).astype(float)
    c = (np.array(shape) - 1) / 2
    r = np.sqrt(sum(((g - ci) / (0.4 * s)) ** 2 for g, ci, s in zip(grid, c, shape, strict=True)))
    head = (r < 1).astype(float)
    b0 = head * (100 + 400 * ndimage.gaussian_filter(rng.normal(size=shape), 2.0))
    diff = head * np.clip(0.7 + 3 * ndimage.gaussian_filter(rng.normal(size=shape), 2.0), 0.2, 1.5)
    return head, b0, diff, c


@pytest.mark.parametrize(
    ("shape", "samples"),
    [((24, 26, 22), None), ((48, 52, 44), 25_000)],
    ids=["dense-metric", "sampled-metric"],
)
def test_motion_correction_recovers_planted_motion_and_rotates_bvecs(rng, shape, samples):
    head, b0, diff, centre = _head(rng, shape)
    zoom = 48.0 / shape[0]  # same field of view at both sizes
    affine = np.diag([zoom, zoom, zoom, 1.0])
    affine[:3, 3] = -zoom * centre
    n_dw = 4
    bvals = np.r_[0, 0, np.full(n_dw, 1000.0)]
    bvecs = np.vstack([np.zeros((2, 3)), Rotation.random(n_dw, random_state=1).apply([1, 0, 0])])
    truth, volumes = [], []
    for v, b in enumerate(bvals):
        base = b0 * np.exp(-b * 1e-3 * diff)
        motion = np.eye(4)
        if v > 0:  # the first b=0 defines the reference frame
            motion[:3, :3] = Rotation.from_euler(
                "xyz", rng.uniform(-6, 6, 3), degrees=True
            ).as_matrix()
            motion[:3, 3] = rng.uniform(-2, 2, 3)
        # The head moved by `motion`: acquired(y) = base(motion^-1 y), y in world mm.
        vox = np.linalg.inv(affine) @ np.linalg.inv(motion) @ affine
        volumes.append(ndimage.affine_transform(base, vox[:3, :3], vox[:3, 3], order=3))
        truth.append(motion)
    data = np.stack(volumes, axis=-1)

    result = D.motion_correct(data, affine, bvals, bvecs, samples=samples)

    for v in range(len(bvals)):
        delta = D.rotation_part(result.affines[v]) @ truth[v][:3, :3].T
        angle = np.degrees(np.arccos(np.clip((np.trace(delta) - 1) / 2, -1, 1)))
        assert angle < 1.5, (v, angle)
        np.testing.assert_allclose(result.affines[v][:3, 3], truth[v][:3, 3], atol=0.3)
    # Gradient g fixed in the scanner is R^T g in the head frame; R g would be wrong.
    right = np.array([m[:3, :3].T @ g for m, g in zip(truth, bvecs, strict=True)])[2:]
    wrong = np.array([m[:3, :3] @ g for m, g in zip(truth, bvecs, strict=True)])[2:]

    def angles(a, b):
        return np.degrees(np.arccos(np.clip(np.abs(np.sum(a * b, axis=1)), 0, 1)))

    got = result.bvecs[2:]
    assert np.all(angles(got, right) < 1.5)
    assert np.all(angles(got, wrong) > 2 * angles(got, right))
    np.testing.assert_array_equal(result.bvecs[:2], 0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-12)
    assert result.parameters.shape == (6, 7)
    assert result.parameters.loc[0, "framewise_displacement"] == 0
    # Correction aligns the images: residual to the b=0 reference drops a lot.
    err_before = np.abs(data[..., 1] - data[..., 0])[head > 0].mean()
    err_after = np.abs(result.data[..., 1] - data[..., 0])[head > 0].mean()
    assert err_after < 0.7 * err_before


def test_rotate_bvecs_convention():
    rot = Rotation.from_euler("z", 90, degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rot
    out = D.rotate_bvecs(np.array([[1.0, 0, 0]]), [affine])
    np.testing.assert_allclose(out, [[0.0, -1.0, 0.0]], atol=1e-12)  # R^T e_x


def _tensor_dwi(rng, shape=(7, 8, 9), snr=None):
    bvecs = np.vstack([np.zeros((2, 3)), Rotation.random(30, random_state=2).apply([0, 0, 1])])
    bvals = np.r_[0, 0, np.full(30, 1000.0)]
    gtab = gradient_table(bvals, bvecs=bvecs)
    sig = single_tensor(gtab, S0=100, evals=np.array([1.5e-3, 0.4e-3, 0.4e-3]), snr=snr)
    data = np.broadcast_to(sig, (*shape, len(bvals))).copy()
    data *= 1 + 0.05 * rng.standard_normal(shape)[..., None]  # spatially varying S0
    return data, gtab


def test_detect_outliers_finds_planted_dropouts(rng):
    data, gtab = _tensor_dwi(rng)
    data += rng.normal(0, 1.0, data.shape)
    planted = {(5, 3), (20, 6)}
    for v, s in planted:
        data[:, :, s, v] *= 0.5
    mask = np.ones(data.shape[:3], bool)
    table, summary = D.detect_outliers(data, gtab, mask)
    found = set(map(tuple, table.loc[table["outlier"], ["volume", "slice"]].to_numpy().tolist()))
    assert found == planted
    assert summary["n_outlier_slices"] == 2
    assert summary["outlier_volumes"] == [5, 20]  # 1 of 9 slices > 10%
    assert len(table) == 30 * 9


def test_concatenate_runs_matches_b0_intensity(rng):
    data, gtab = _tensor_dwi(rng)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    runs = [
        (data, affine, gtab.bvals, gtab.bvecs),
        (data * 1.7, affine, gtab.bvals, gtab.bvecs.T),  # FSL-style (3, N) bvecs
    ]
    out = D.concatenate_runs(runs)
    assert out.data.shape == (*data.shape[:3], 2 * data.shape[3])
    np.testing.assert_allclose(out.scale, [1.0, 1 / 1.7], rtol=1e-6)
    np.testing.assert_allclose(out.data[..., 32:], out.data[..., :32], rtol=1e-5)
    np.testing.assert_array_equal(out.run_index, np.repeat([0, 1], 32))
    np.testing.assert_allclose(out.bvecs[32:], gtab.bvecs)
    shifted = affine.copy()
    shifted[0, 3] = 1.0
    with pytest.raises(ValueError, match="not on the grid of run 1"):
        D.concatenate_runs([runs[0], (data, shifted, gtab.bvals, gtab.bvecs)])
    with pytest.raises(ValueError, match="b-values"):
        D.concatenate_runs([(data, affine, gtab.bvals[:-1], gtab.bvecs[:-1])])


def test_brain_mask_recovers_ellipsoid(rng):
    head, b0, _, _ = _head(rng)
    data = np.stack([b0 + rng.normal(0, 5, b0.shape)] * 2 + [0.3 * b0], axis=-1)
    mask = D.brain_mask(data, np.array([0, 0, 1000.0]))
    dice = 2 * (mask & (head > 0)).sum() / (mask.sum() + (head > 0).sum())
    assert dice > 0.9


def test_denoise_mppca_reduces_noise(rng):
    clean, gtab = _tensor_dwi(rng, shape=(12, 12, 12))
    noisy = clean + rng.normal(0, 5.0, clean.shape)
    den, info = D.denoise(noisy, gtab.bvals, method="mppca")
    rmse_before = np.sqrt(np.mean((noisy - clean) ** 2))
    rmse_after = np.sqrt(np.mean((den - clean) ** 2))
    assert rmse_after < 0.6 * rmse_before
    assert info["median_sigma"] == pytest.approx(5.0, rel=0.25)
    same, _ = D.denoise(noisy, gtab.bvals, method="mppca")
    np.testing.assert_array_equal(same, den)


def test_mppca_denoise_matches_dipy(rng):
    """The batched estimator is DIPY's MP-PCA (same patches, threshold and weights)."""
    from dipy.denoise.localpca import mppca

    clean, _ = _tensor_dwi(rng, shape=(10, 9, 8))
    noisy = (clean + rng.normal(0, 5.0, clean.shape)).astype(np.float64)
    mask = np.zeros(noisy.shape[:3], bool)
    mask[2:8, 2:7, 2:6] = True
    mask[4, 4, 2] = False  # a hole: its voxel is written by neighbours' patches only
    expected, expected_sigma = mppca(noisy, mask=mask, patch_radius=2, return_sigma=True,
                                     suppress_warning=True)

    found, sigma = D.mppca_denoise(noisy, mask, patch_radius=2, batch=37)

    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-5, atol=1e-5)
    assert (found[~mask] == 0).all()


def test_mp_noise_variance_matches_dipy_classifier(rng):
    from dipy.denoise.localpca import _pca_classifier

    for n_samples, dim in ((125, 70), (27, 40), (125, 10)):
        for _ in range(20):
            x = rng.normal(size=(n_samples, dim)) @ np.diag(rng.uniform(0.5, 3, dim))
            x[:, :3] *= rng.uniform(1, 20)
            x -= x.mean(0)
            eigenvalues = np.linalg.eigvalsh(x.T @ x / n_samples)
            expected, _ = _pca_classifier(eigenvalues, n_samples)
            found = D._mp_noise_variance(eigenvalues[None], n_samples)[0]
            assert found == pytest.approx(expected, rel=1e-10)


def test_unring_removes_gibbs_oscillation():
    # A box profile sampled from its 32 lowest frequencies rings (truncated k-space, as in
    # a real acquisition); after unringing the plateau is flat again.
    fine, n = 512, 32
    x = (np.arange(fine) + 0.5) / fine
    box = np.where((x > 0.3) & (x < 0.7), 100.0, 0.0)
    k = np.fft.fft(box) / fine
    profile = np.real(np.fft.ifft(np.concatenate([k[: n // 2], k[-n // 2 :]]))) * n
    data = np.broadcast_to(profile[None, :, None, None], (n, n, 2, 2)).copy()
    out = D.unring(data, slice_axis=2)
    plateau = slice(12, 20)
    assert np.ptp(profile[plateau]) > 3.5  # the input really rings (+-2 %)
    assert np.ptp(out[0, plateau, 0, 0]) < 0.2 * np.ptp(profile[plateau])
    np.testing.assert_allclose(out[:, :, 1, 1], out[:, :, 0, 0], atol=1e-4)
