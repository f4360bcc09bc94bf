"""One-shot BOLD resampling: coordinate maps and composed motion + coregistration."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest
from scipy import ndimage

from pipeline import motion, resample
from pipeline.registration import Transform, affine_to_ants_file


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def _blobs(rng, shape):
    vol = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    return (vol - vol.min()) * 100.0


def test_output_resolution():
    assert resample.output_resolution((5.0, 5.0, 5.0, 2.2)) == 5.0
    assert resample.output_resolution((1.5, 1.5, 1.5)) == 2.0
    assert resample.output_resolution((3.0, 3.0, 3.6, 1.0)) == 3.6


def test_template_grid_keeps_origin_and_extent():
    ref = nb.Nifti1Image(np.zeros((91, 109, 91), np.float32), np.diag([2.0, 2, 2, 1]))
    shape, aff = resample.template_grid(ref, 2.0)
    assert shape == (91, 109, 91) and np.allclose(aff, ref.affine)
    shape, aff = resample.template_grid(ref, 5.0)
    assert shape == (37, 44, 37)  # 180 / 5 + 1, 216 / 5 -> 43 + 1
    assert np.allclose(np.diag(aff)[:3], 5.0) and np.allclose(aff[:3, 3], 0)


def test_coordinates_from_transform_match_affine(tmp_path):
    # an ITK point map (target -> source, LPS): small rotation + shift
    lps = motion.rigid_matrix([3.0, -2.0, 1.5, 0.05, -0.02, 0.1])
    path = affine_to_ants_file(lps, tmp_path / "x.mat")
    tx = Transform(((path, False),), ((path, True),), "T1w", "MNI")
    shape, aff = (7, 8, 9), np.array([[-3.0, 0, 0, 10], [0, 3, 0, -12], [0, 0, 3, -9],
                                       [0, 0, 0, 1]])
    coords = resample.coordinates_from_transform(tx, shape, aff, tmp_path / "work")
    expected = resample.grid_points(shape, aff) @ resample.ras_point_map(lps)[:3, :3].T \
        + resample.ras_point_map(lps)[:3, 3]
    assert coords.shape == (7, 8, 9, 3)
    assert np.abs(coords - expected).max() < 1e-3


def test_coordinates_from_map_reproduces_linear_map():
    coarse = np.diag([8.0, 8, 8, 1])
    coarse[:3, 3] = [-20, -24, -16]
    shape_c = (6, 7, 6)
    mat = motion.rigid_matrix([1.0, 2.0, -3.0, 0.1, 0.0, -0.05])
    pts = resample.grid_points(shape_c, coarse)
    values = pts @ mat[:3, :3].T + mat[:3, 3]
    cmap = nb.Nifti1Image(values.astype(np.float32), coarse)
    fine = np.diag([3.0, 3, 3, 1])
    fine[:3, 3] = [-12, -15, -9]
    got = resample.coordinates_from_map(cmap, (7, 8, 9), fine)
    want = resample.grid_points((7, 8, 9), fine) @ mat[:3, :3].T + mat[:3, 3]
    assert np.abs(got - want).max() < 1e-4  # linear interpolation of a linear map is exact


def test_resample_bold_undoes_motion_and_coregistration(rng, tmp_path):
    shape = (20, 22, 18)
    aff = np.array([[-3.0, 0, 0, 28], [0, 3, 0, -30], [0, 0, 3, -25], [0, 0, 0, 1]])
    ref = _blobs(rng, shape)
    params = np.array([[0, 0, 0, 0, 0, 0], [1.2, -0.8, 0.5, 0.02, -0.01, 0.015],
                       [-0.6, 0.9, -1.1, -0.015, 0.02, 0.0]])
    vols = np.stack([motion.move_volume(ref, aff, p, order=3) for p in params], axis=-1)
    bold = nb.Nifti1Image(vols.astype(np.float32), aff)
    bold.header.set_zooms((3.0, 3.0, 3.0, 2.0))
    # T1w world = BOLD world shifted by 2 mm in y: a T1w point p sits at p + (0, 2, 0) in BOLD
    coreg = np.eye(4)
    coreg[1, 3] = 2.0
    out_aff = aff.copy()
    coords = resample.grid_points(shape, out_aff) - np.array([0, 2.0, 0])
    out = resample.resample_bold(bold, tmp_path / "out.nii", coords, out_aff, motion=params,
                                 t1w_to_bold=coreg, order=3)
    img = nb.load(out)
    assert img.shape == (*shape, 3)
    assert np.isclose(img.header.get_zooms()[3], 2.0)
    data = np.asarray(img.dataobj)
    inner = (slice(4, -4),) * 3
    for t in range(3):
        err = np.abs(data[..., t][inner] - ref[inner])
        # sub-voxel error from the two cubic interpolations of a smooth field
        assert err.mean() < 0.02 * ref[inner].std(), t
    # deterministic: same input, same bytes
    out2 = resample.resample_bold(bold, tmp_path / "out2.nii", coords, out_aff, motion=params,
                                  t1w_to_bold=coreg)
    assert out.read_bytes() == out2.read_bytes()


def test_resample_bold_where_and_blocks_change_nothing_inside(rng, tmp_path):
    shape = (12, 13, 11)
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    vols = np.stack([_blobs(rng, shape) + t for t in range(7)], axis=-1).astype(np.float32)
    path = tmp_path / "bold.nii.gz"  # gzipped: read in blocks through one handle
    nb.save(nb.Nifti1Image(vols, aff), path)
    bold = nb.load(path, keep_file_open=True)
    coords = resample.grid_points(shape, aff) + np.array([0.7, -0.4, 0.3])
    params = np.tile([0.3, -0.2, 0.1, 0.01, 0.0, -0.01], (7, 1))
    full = resample.resample_bold(bold, tmp_path / "full.nii", coords, aff, motion=params)
    where = np.zeros(shape, bool)
    where[3:9, 2:10, 4:8] = True
    part = resample.resample_bold(bold, tmp_path / "part.nii", coords, aff, motion=params,
                                  where=resample.with_margin(where, 1), block=3)
    a, b = np.asarray(nb.load(full).dataobj), np.asarray(nb.load(part).dataobj)
    margin = resample.with_margin(where, 1)
    assert np.array_equal(a[margin], b[margin])
    assert not b[~margin].any() and a[~margin].any()
    with pytest.raises(ValueError, match="output grid"):
        resample.resample_bold(bold, tmp_path / "bad.nii", coords, aff, where=where[:-1])


def test_resample_labels_nearest():
    lab = np.zeros((10, 10, 10), np.int16)
    lab[2:6, 2:6, 2:6] = 7
    img = nb.Nifti1Image(lab, np.eye(4))
    out = resample.resample_labels(img, (5, 5, 5), np.diag([2.0, 2, 2, 1]))
    data = np.asarray(out.dataobj)
    assert data.dtype == np.int16 and set(np.unique(data)) == {0, 7}
    assert data[1, 1, 1] == 7 and data[3, 3, 3] == 0
