"""Model choice table, DTI against closed-form values, response and FOD peaks."""

from __future__ import annotations

import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.data import default_sphere
from dipy.direction import peak_directions
from dipy.reconst.shm import sh_to_sf
from dipy.sims.voxel import single_tensor
from scipy.spatial.transform import Rotation
from test_tractography import fitted_phantom, scheme

from pipeline import models as M


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(5)


def _acq(n_dirs: int, shells=(1000.0,), n_b0: int = 2) -> M.Acquisition:
    bvals, bvecs = [np.zeros(n_b0)], [np.zeros((n_b0, 3))]
    for b in shells:
        sb, sv = scheme(n_dirs, 0, b)
        bvals.append(sb)
        bvecs.append(sv)
    return M.summarize_acquisition(np.concatenate(bvals), np.vstack(bvecs))


def test_summarize_acquisition_counts_shells_and_directions():
    bvals, bvecs = scheme(30, 3, 1000.0)
    # Repeat 5 directions with the opposite sign and b = 1005: still the same 30 directions.
    extra = -bvecs[3:8]
    acq = M.summarize_acquisition(np.r_[bvals, np.full(5, 1005.0), 2000, 2000],
                                  np.vstack([bvecs, extra, [[1, 0, 0], [0, 1, 0]]]))
    assert acq == M.Acquisition(n_b0=3, shells=(1000.0, 2000.0), directions=(30, 2))


@pytest.mark.parametrize(
    ("n_dirs", "model", "order"),
    [(64, "csd", 8), (45, "csd", 8), (44, "csd", 6), (28, "csd", 6), (27, "csd", 4),
     (15, "csd", 4), (14, "csa", 2), (6, "csa", 2)],
)
def test_choice_table_single_shell(n_dirs, model, order):
    choice = M.choose_model(_acq(n_dirs))
    assert (choice.model, choice.sh_order) == (model, order)
    assert str(n_dirs) in choice.reason
    assert not choice.overridden


def test_choice_multi_shell():
    acq = _acq(30, shells=(1000.0, 2000.0))
    without_maps = M.choose_model(acq)
    assert without_maps.model == "csd" and "no tissue maps" in without_maps.reason
    with_maps = M.choose_model(acq, tissue_maps=True)
    have_cvxpy = __import__("importlib").util.find_spec("cvxpy") is not None
    if have_cvxpy:
        assert with_maps.model == "msmt_csd"
    else:
        assert with_maps.model == "csd" and "cvxpy" in with_maps.reason
    no_b0 = M.choose_model(_acq(30, shells=(1000.0, 2000.0), n_b0=0), tissue_maps=True)
    assert no_b0.model == "csd"
    assert with_maps.as_dict()["acquisition"]["shells"] == (1000.0, 2000.0)


def test_choice_override_and_errors():
    forced = M.choose_model(_acq(64), override="csa", sh_order=4)
    assert (forced.model, forced.sh_order, forced.overridden) == ("csa", 4, True)
    with pytest.raises(ValueError, match="at least 6"):
        M.choose_model(_acq(5))
    with pytest.raises(ValueError, match="csd needs"):
        M.choose_model(_acq(10), override="csd")
    with pytest.raises(ValueError, match="SH order 8"):
        M.choose_model(_acq(30), sh_order=8)
    with pytest.raises(ValueError, match="unknown model"):
        M.choose_model(_acq(30), override="dki")


def _fa_md(evals):
    l1, l2, l3 = evals
    md = (l1 + l2 + l3) / 3
    fa = np.sqrt(0.5 * ((l1 - l2) ** 2 + (l2 - l3) ** 2 + (l3 - l1) ** 2)
                 / (l1**2 + l2**2 + l3**2))
    return fa, md


def test_dti_matches_closed_form(rng):
    bvals, bvecs = scheme(30, 2, 1000.0)
    gtab = gradient_table(bvals, bvecs=bvecs)
    shape = (7, 8, 9)
    evals = np.array([[1.7e-3, 0.3e-3, 0.2e-3], [0.8e-3, 0.8e-3, 0.8e-3], [1.2e-3, 0.9e-3, 0.3e-3]])
    which = rng.integers(0, 3, shape)
    rotations = Rotation.random(int(np.prod(shape)), random_state=4).as_matrix()
    data = np.zeros((*shape, len(bvals)))
    for idx, (i, j, k) in enumerate(np.ndindex(shape)):
        data[i, j, k] = single_tensor(gtab, S0=100, evals=evals[which[i, j, k]],
                                      evecs=rotations[idx])
    dti = M.fit_dti(data, gtab)
    expected = np.array([_fa_md(e) for e in evals])
    np.testing.assert_allclose(dti.fa, expected[which, 0], atol=1e-6)
    np.testing.assert_allclose(dti.md, expected[which, 1], rtol=1e-6)
    # Principal direction = first column of each planted rotation (up to sign).
    v1 = dti.evecs[..., :, 0].reshape(-1, 3)
    aniso = (which != 1).ravel()
    dots = np.abs(np.sum(v1 * rotations[:, :, 0], axis=1))
    np.testing.assert_allclose(dots[aniso], 1.0, atol=1e-6)


def test_response_and_csd_peaks_on_phantom():
    p, sh, _, choice = fitted_phantom()
    mask = np.ones(p["wm"].shape, bool)
    response, info = M.estimate_response(p["data"], p["gtab"], mask & (p["wm"] > 0.5))
    evals, s0 = response
    # Planted WM tensor (1.7, 0.2, 0.2) um^2/ms, S0 = 100; Rician noise biases a little.
    np.testing.assert_allclose(evals, [1.7e-3, 2e-4, 2e-4], rtol=0.1, atol=3e-5)
    assert s0 == pytest.approx(100, rel=0.03)
    assert info["n_voxels"] == int((p["wm"] > 0.5).sum())  # all WM voxels have FA > 0.7
    # CSD peak in each bundle voxel points along the bundle.
    wm_idx = np.argwhere(p["wm"] > 0.5)
    odf = sh_to_sf(sh[tuple(wm_idx.T)], default_sphere, sh_order_max=choice.sh_order)
    angles = []
    for i, f in enumerate(odf):
        dirs, _, _ = peak_directions(f, default_sphere, relative_peak_threshold=0.5,
                                     min_separation_angle=25)
        true = p["direction"][tuple(wm_idx[i])]
        angles.append(np.degrees(np.arccos(min(1.0, abs(dirs[0] @ true)))))
    assert np.median(angles) < 6
    assert np.percentile(angles, 95) < 15


def test_fallback_response_when_few_high_fa_voxels(rng):
    p, _, fa, _ = fitted_phantom()
    grey = p["gm"] > 0.5  # FA ~0.07: nothing passes 0.7, so the top-FA voxels are used
    _, info = M.estimate_response(p["data"], p["gtab"], grey, fa=fa, top_voxels=50)
    assert info["n_voxels"] == 50
    assert info["fa_threshold"] < 0.7
