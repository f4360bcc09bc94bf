"""Rigid realignment recovers planted motion of an analytic blob image; sign conventions."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import motion

SHAPE = (30, 36, 27)  # 3 mm voxels: 90 x 108 x 81 mm
VOX = 3.0


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(5)


@pytest.fixture
def affine() -> np.ndarray:
    aff = np.diag([VOX, VOX, VOX, 1.0])
    aff[:3, 3] = -np.array(SHAPE) * VOX / 2 + [4.0, -6.0, 2.0]  # origin off-centre on purpose
    return aff


class Blobs:
    """A head-like analytic image: sum of anisotropic Gaussians, evaluated exactly anywhere."""

    def __init__(self, rng):
        self.centres = rng.uniform(-30, 30, (14, 3))
        self.sigmas = rng.uniform(5, 11, (14, 3))
        self.amps = rng.uniform(0.5, 1.5, 14) * 100

    def __call__(self, world: np.ndarray) -> np.ndarray:
        out = np.zeros(len(world))
        for c, s, a in zip(self.centres, self.sigmas, self.amps, strict=True):
            out += a * np.exp(-0.5 * (((world - c) / s) ** 2).sum(axis=1))
        return out


def world_grid(affine):
    ijk = np.indices(SHAPE).reshape(3, -1).T
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def moved_series(blobs, affine, params, rng, noise=0.5):
    """volume_t(x) = image(M_t x), sampled exactly (no interpolation in the ground truth)."""
    x = world_grid(affine)
    vols = []
    for p in params:
        M = motion.rigid_matrix(p)
        vols.append(blobs(x @ M[:3, :3].T + M[:3, 3]).reshape(SHAPE))
    data = np.stack(vols, axis=-1)
    return data + rng.normal(0, noise, data.shape)


def test_recovers_planted_motion(rng, affine):
    n_t = 10
    params = np.zeros((n_t, 6))
    params[1:, :3] = rng.uniform(-2, 2, (n_t - 1, 3))
    params[1:, 3:] = np.deg2rad(rng.uniform(-2, 2, (n_t - 1, 3)))
    data = moved_series(Blobs(rng), affine, params, rng)
    data[..., 4] *= 1.05  # a globally brighter volume does not bias the fit
    result = motion.realign(data, affine, reference=0)
    err = result.params - params
    trans_rms = np.sqrt(np.mean(err[:, :3] ** 2))
    rot_rms = np.rad2deg(np.sqrt(np.mean(err[:, 3:] ** 2)))
    assert trans_rms < 0.1 and rot_rms < 0.1
    # realigned volumes match the reference inside the field of view
    ref = data[..., 0]
    inner = (slice(6, -6),) * 3
    for t in range(1, n_t):
        vol = result.realigned[..., t][inner] / (1.05 if t == 4 else 1.0)
        resid = vol - ref[inner]
        before = data[..., t][inner] / (1.05 if t == 4 else 1.0) - ref[inner]
        assert np.sqrt(np.mean(resid**2)) < 0.2 * np.sqrt(np.mean(before**2))


def test_sign_convention(rng, affine):
    """+trans_x: the head appears shifted towards -x; +rot_z turns +x towards +y."""
    blobs = Blobs(rng)
    # one compact blob at the field-of-view centre, so its centre of mass is exact
    blobs.centres, blobs.amps = np.array([[4.0, -6.0, 2.0]]), [1.0]
    blobs.sigmas = np.array([[6.0, 9.0, 12.0]])
    shift = np.array([2.0, 0, 0, 0, 0, 0])
    data = moved_series(blobs, affine, [np.zeros(6), shift], rng, noise=0.0)
    com = []
    for t in range(2):
        w = data[..., t].reshape(-1)
        com.append((world_grid(affine) * w[:, None]).sum(0) / w.sum())
    assert com[1][0] - com[0][0] == pytest.approx(-2.0, abs=0.05)
    est = motion.realign(data, affine, resample=False).params[1]
    np.testing.assert_allclose(est, shift, atol=0.02)
    R = motion.rigid_matrix([0, 0, 0, 0, 0, np.deg2rad(10)])[:3, :3]
    assert R @ np.array([1.0, 0, 0]) == pytest.approx([np.cos(0.1745), np.sin(0.1745), 0],
                                                      abs=1e-3)


def test_matches_simulator_convention(rng):
    space = pytest.importorskip("pipeline.simulate.space")
    p = np.array([1.0, -0.5, 0.3, 0.02, -0.01, 0.03])
    np.testing.assert_allclose(motion.rigid_matrix(p), space.rigid_matrix(p), atol=1e-14)
    np.testing.assert_allclose(motion.params_from_matrix(motion.rigid_matrix(p)), p, atol=1e-12)


def test_bad_reference(affine):
    with pytest.raises(ValueError, match="reference volume"):
        motion.realign(np.zeros((*SHAPE, 3)), affine, reference=5)
