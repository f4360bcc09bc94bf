"""Confounds: FD by hand, DVARS by its published formula, dummy scans, CompCor, table names."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline import confounds as cf


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(3)


def test_framewise_displacement_by_hand():
    motion = np.zeros((3, 6))
    motion[1] = [0.1, -0.2, 0.0, 0.01, 0.0, -0.002]
    motion[2] = [0.1, 0.3, 0.05, 0.01, 0.004, -0.002]
    fd = cf.framewise_displacement(motion)
    assert np.isnan(fd[0])
    assert fd[1] == pytest.approx(0.1 + 0.2 + 50 * (0.01 + 0.002))
    assert fd[2] == pytest.approx(0.5 + 0.05 + 50 * 0.004)


def test_dvars_against_direct_formula(rng):
    data = rng.normal(500, 20, (4, 5, 3, 12))
    data[..., 6] += 40  # a spike volume
    mask = np.ones((4, 5, 3), bool)
    mask[0] = False
    d, sd = cf.dvars(data, mask)
    # direct, loop-based implementation of Power's DVARS and Nichols' standardisation
    vox = data[mask] / np.median(data[mask]) * 1000
    exp_d = [np.sqrt(np.mean((vox[:, t] - vox[:, t - 1]) ** 2)) for t in range(1, 12)]
    expected_sd_diff = []
    for v in vox:
        s = np.sort(v)
        n = len(v)
        q75, q25 = s[int(np.floor(0.75 * (n - 1)))], s[int(np.floor(0.25 * (n - 1)))]
        c = v - v.mean()
        ar1 = np.sum(c[1:] * c[:-1]) / np.sum(c * c)
        expected_sd_diff.append(np.sqrt(2 * (1 - ar1)) * (q75 - q25) / 1.349)
    assert np.isnan(d[0]) and np.isnan(sd[0])
    np.testing.assert_allclose(d[1:], exp_d, rtol=1e-12)
    np.testing.assert_allclose(sd[1:], np.array(exp_d) / np.mean(expected_sd_diff), rtol=1e-12)
    assert np.argmax(d[1:]) in (5, 6)  # around the spike


def test_non_steady_state_detection(rng):
    clean = rng.normal(300, 5, (7, 8, 9, 60))
    assert cf.non_steady_state_volumes(clean) == 0
    bright = clean.copy()
    bright[..., :3] *= np.array([1.6, 1.3, 1.15])
    assert cf.non_steady_state_volumes(bright) == 3
    mask = np.zeros((7, 8, 9), bool)
    mask[2:5, 2:6, 2:7] = True
    assert cf.non_steady_state_volumes(bright, mask) == 3


def test_compcor_recovers_planted_noise(rng):
    n_t = 120
    shape = (7, 8, 9)
    noise = np.column_stack([np.sin(np.linspace(0, 17, n_t)), rng.normal(size=n_t)])
    loadings = rng.normal(size=(*shape, 2)) * 5
    data = 100 + loadings @ noise.T + rng.normal(0, 0.3, (*shape, n_t))
    mask = np.ones(shape, bool)
    comps, var = cf.compcor(data, mask, tr=2.0, n_components=5, highpass_s=None)
    assert comps.shape == (n_t, 5) and np.all(np.diff(var) <= 0)
    # the planted 2-D noise subspace is spanned by the first 2 components
    beta = np.linalg.lstsq(comps[:, :2], noise - noise.mean(0), rcond=None)[0]
    resid = noise - noise.mean(0) - comps[:, :2] @ beta
    assert np.all(resid.var(0) / noise.var(0) < 0.01)
    again, _ = cf.compcor(data, mask, tr=2.0, n_components=5, highpass_s=None)
    assert np.array_equal(comps, again)  # deterministic, signs fixed
    _, var_half = cf.compcor(data, mask, tr=2.0, n_components=0.5)
    assert np.cumsum(var_half)[-1] >= 0.5 and (len(var_half) == 1 or var_half[:-1].sum() < 0.5)


def test_build_confounds_names_and_values(rng):
    shape, n_t = (7, 8, 9), 40
    data = rng.normal(400, 4, (*shape, n_t))
    brain = np.ones(shape, bool)
    wm = np.zeros(shape, bool)
    wm[1:6, 1:4, 1:8] = True
    csf = np.zeros(shape, bool)
    csf[1:6, 4:7, 1:8] = True
    motion = rng.normal(0, 0.1, (n_t, 6))
    table = cf.build_confounds(data, motion, 2.0, brain_mask=brain, wm_mask=wm, csf_mask=csf,
                               n_dummy=2)
    for col in ("trans_x", "rot_z_derivative1_power2", "global_signal", "csf_power2",
                "white_matter_derivative1", "a_comp_cor_00", "w_comp_cor_04", "c_comp_cor_04",
                "framewise_displacement", "dvars", "std_dvars",
                "non_steady_state_outlier_00", "non_steady_state_outlier_01"):
        assert col in table.columns, col
    assert len(table) == n_t
    np.testing.assert_allclose(table["global_signal"], data.mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(table["csf"], data[cf.erode_mask(csf)].mean(0))
    np.testing.assert_allclose(table["trans_x_derivative1"][1:], np.diff(motion[:, 0]))
    assert table["a_comp_cor_00"][:2].isna().all() and table["a_comp_cor_00"][2:].notna().all()
    desc = cf.describe_confounds(table.columns)
    assert set(desc) == set(table.columns)
    assert desc["framewise_displacement"]["Units"] == "mm"
    assert "User" not in str(desc)


def test_expand_confounds():
    t = pd.DataFrame({"a": [1.0, 3.0, 2.0]})
    out = cf.expand_confounds(t, ["a"])
    np.testing.assert_array_equal(out["a_derivative1"], [np.nan, 2.0, -1.0])
    np.testing.assert_array_equal(out["a_power2"], [1.0, 9.0, 4.0])
    np.testing.assert_array_equal(out["a_derivative1_power2"], [np.nan, 4.0, 1.0])


def test_tsnr():
    data = np.zeros((2, 2, 1, 4))
    data[..., :] = [10.0, 12.0, 10.0, 12.0]  # mean 11, std 1
    assert cf.tsnr(data, np.ones((2, 2, 1), bool)) == pytest.approx(11.0)
