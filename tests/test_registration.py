"""Tests for pipeline.registration: conversions, transforms, ANTs registration."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from pipeline.atlas import build_default_atlas
from pipeline.registration import (
    REGISTRATION_SETTINGS,
    Transform,
    affine_to_ants_file,
    apply_transform,
    from_ants,
    get_settings,
    jacobian_determinant,
    register,
    to_ants,
    transform_affine,
)
from pipeline.templates import load_template

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(42)


def _rigid(angles_deg, shift, scale=1.0) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix() * scale
    out[:3, 3] = shift
    return out


def _resample(img: nb.Nifti1Image, shape, affine, point_map, order=1) -> np.ndarray:
    """out(x) = img(point_map(x)) for the RAS centres x of the grid (shape, affine)."""
    xyz = nb.affines.apply_affine(affine, np.indices(shape).reshape(3, -1).T)
    ijk = nb.affines.apply_affine(np.linalg.inv(img.affine), point_map(xyz))
    data = np.asarray(img.dataobj, dtype=np.float64)
    return ndimage.map_coordinates(data, ijk.T, order=order, mode="constant").reshape(shape)


def _smooth_warp(xyz: np.ndarray, amplitude: float = 2.5) -> np.ndarray:
    """A smooth, invertible displacement field (mm) made of a few long sinusoids."""
    out = np.zeros_like(xyz)
    out[:, 0] = amplitude * np.sin(xyz[:, 1] / 25.0)
    out[:, 1] = amplitude * np.sin(xyz[:, 2] / 30.0 + 0.5)
    out[:, 2] = amplitude * np.cos(xyz[:, 0] / 28.0)
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


# --------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, 1, 1), (-1, -1, 1), (1, -1, -1)])
def test_ants_round_trip_keeps_oblique_flipped_affine_and_data(rng, flips):
    affine = np.eye(4)
    rot = Rotation.from_euler("xyz", [12, -7, 25], degrees=True).as_matrix()
    affine[:3, :3] = rot @ np.diag(np.array([2.0, 3.0, 2.5]) * flips)
    affine[:3, 3] = [12.5, -30.0, 7.25]
    data = rng.normal(size=(7, 8, 9)).astype(np.float32)
    img = nb.Nifti1Image(data, affine)

    aimg = to_ants(img)
    back = from_ants(aimg)

    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(back.get_fdata(), data)
    # ITK geometry is the LPS version of the same world: spacing and origin match
    np.testing.assert_allclose(aimg.spacing, [2.0, 3.0, 2.5], rtol=1e-6)
    np.testing.assert_allclose(aimg.origin, (LPS @ affine)[:3, 3], atol=1e-5)
    # voxel (1, 2, 3) lands on the same physical point in both libraries
    lps_point = aimg.origin + np.asarray(aimg.direction) @ (np.asarray(aimg.spacing) * [1, 2, 3])
    ras_point = nb.affines.apply_affine(affine, [1, 2, 3])
    np.testing.assert_allclose(lps_point * [-1, -1, 1], ras_point, atol=1e-4)


def test_to_ants_rejects_shear():
    affine = np.eye(4)
    affine[0, 1] = 0.5
    with pytest.raises(ValueError, match="shear"):
        to_ants(nb.Nifti1Image(np.zeros((7, 8, 9), np.float32), affine))


def test_unknown_settings_named():
    with pytest.raises(ValueError, match="sloppy"):
        get_settings("fast")
    assert set(REGISTRATION_SETTINGS) == {"default", "sloppy"}


def test_affine_files_apply_and_chain_like_matrices(rng, tmp_path):
    """Transform.then / inverted reproduce resampling by matrix products."""
    data = ndimage.gaussian_filter(rng.normal(size=(20, 22, 18)), 2).astype(np.float32)
    img = nb.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) @ _shift(-19, -21, -17))
    ab = _rigid([5, 0, -3], [2, -1, 0])  # RAS point maps target -> source
    bc = _rigid([0, 4, 2], [-1, 0, 1.5])
    t_ab = _file_transform(ab, tmp_path / "ab.mat")
    t_bc = _file_transform(bc, tmp_path / "bc.mat")

    chained = apply_transform(img, t_ab.then(t_bc), img)
    # point in C -> bc -> point in B -> ab -> point in A
    expected = _resample(img, img.shape, img.affine, lambda x: _apply(ab, _apply(bc, x)))
    inner = (slice(4, -4),) * 3
    np.testing.assert_allclose(chained.get_fdata()[inner], expected[inner], atol=1e-3)

    back = apply_transform(chained, t_ab.then(t_bc).inverted(), img)
    roundtrip = _resample(img, img.shape, img.affine, lambda x: x)
    assert np.corrcoef(back.get_fdata()[inner].ravel(), roundtrip[inner].ravel())[0, 1] > 0.97
    np.testing.assert_allclose(transform_affine(t_ab.then(t_bc)), LPS @ ab @ bc @ LPS,
                               atol=1e-6)


def _shift(*v) -> np.ndarray:
    out = np.eye(4)
    out[:3, 3] = v
    return out


def _apply(matrix, xyz):
    return nb.affines.apply_affine(matrix, xyz)


def _file_transform(ras_matrix: np.ndarray, path) -> Transform:
    file = affine_to_ants_file(LPS @ ras_matrix @ LPS, path)
    return Transform(((file, False),), ((file, True),))


# --------------------------------------------------------------------------- registration


@pytest.fixture(scope="module")
def warped_subject():
    """The 3 mm MNI template seen through a known affine and smooth warp."""
    template = load_template(3)
    truth = _rigid([6, -4, 5], [4, -3, 2], 1.04)

    def point_map(xyz):  # native -> template
        moved = nb.affines.apply_affine(truth, xyz)
        return moved + _smooth_warp(moved)

    shape, affine = (58, 70, 56), np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-85.5, -124.0, -64.0]
    native = nb.Nifti1Image(
        _resample(template.t1w, shape, affine, point_map).astype(np.float32), affine)
    return template, truth, point_map, native


def test_affine_registration_recovers_planted_matrix(warped_subject, tmp_path):
    template, truth, _, _ = warped_subject
    native_aff = np.diag([3.0, 3.0, 3.0, 1.0])
    native_aff[:3, 3] = [-85.5, -124.0, -64.0]
    shape = (58, 70, 56)
    native = nb.Nifti1Image(_resample(template.t1w, shape, native_aff,
                                      lambda x: _apply(truth, x)).astype(np.float32), native_aff)
    tx, _ = register(native, template.t1w, stages=("rigid", "affine"), settings="sloppy",
                     work_dir=tmp_path)
    found = LPS @ transform_affine(tx) @ LPS
    np.testing.assert_allclose(found[:3, :3], truth[:3, :3], atol=0.03)
    np.testing.assert_allclose(found[:3, 3], truth[:3, 3], atol=1.0)


def test_syn_registration_recovers_labels_and_jacobian(warped_subject, tmp_path):
    template, truth, point_map, native = warped_subject
    atlas = build_default_atlas(3)
    tx, warped = register(native, template.t1w, settings="sloppy", work_dir=tmp_path)
    assert np.corrcoef(warped.get_fdata().ravel(), native.get_fdata().ravel())[0, 1] > 0.95

    labels = apply_transform(atlas.image, tx, native, interpolation="nearestNeighbor")
    true_labels = _resample(atlas.image, native.shape, native.affine, point_map, order=0)
    table = atlas.table
    groups = table.groupby(["anatomy", "hemisphere"])["index"].apply(list)
    dices = {}
    for key, idx in groups.items():
        truth_mask = np.isin(true_labels, idx)
        if truth_mask.sum() * 27 < 10_000:  # large parcels only (>= 10 cm3)
            continue
        dices[key] = _dice(np.isin(labels.get_fdata(), idx), truth_mask)
    assert len(dices) >= 4
    assert min(dices.values()) >= 0.8, dices

    # brain-wide mean Jacobian = det of the planted affine (the sinusoidal warp averages ~1)
    jac = jacobian_determinant(tx, native, tmp_path).get_fdata()
    brain = _resample(template.brain_mask, native.shape, native.affine, point_map) > 0.5
    assert jac[brain].mean() == pytest.approx(np.linalg.det(truth[:3, :3]), rel=0.02)


def test_registration_is_deterministic(warped_subject, tmp_path):
    template, _, _, native = warped_subject
    small = nb.Nifti1Image(native.get_fdata()[::2, ::2, ::2].astype(np.float32),
                           native.affine @ np.diag([2, 2, 2, 1.0]))
    outputs = []
    for run in range(2):
        tx, warped = register(small, template.t1w, stages=("rigid", "affine", "syn"),
                              settings="sloppy", work_dir=tmp_path / str(run), n_threads=1)
        field = np.asarray(nb.load(tx.forward[0][0]).dataobj)
        outputs.append((transform_affine(Transform(tx.forward[1:], tx.inverse[:1])),
                        field, warped.get_fdata()))
    for first, second in zip(*outputs, strict=True):
        np.testing.assert_array_equal(first, second)
