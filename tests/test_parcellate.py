"""Parcel means against a direct per-parcel loop and nilearn; coverage and the NaN policy."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest

from pipeline import parcellate


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.fixture
def case(rng):
    shape = (7, 8, 9)
    data = rng.normal(100, 10, (*shape, 30)).astype(np.float32)
    labels = rng.integers(0, 6, shape)  # 0 = background, parcels 1..5
    labels[labels == 5] = 9  # non-consecutive label value
    mask = np.ones(shape, bool)
    mask[:, :, 0] = False
    return data, labels, mask


def direct_mean(data, labels, valid, value):
    sel = (labels == value) & valid
    return data[sel].astype(np.float64).mean(axis=0)


def test_means_equal_direct_loop(case):
    data, labels, mask = case
    res = parcellate.parcel_timeseries(data, labels, mask)
    assert res.labels.tolist() == [1, 2, 3, 4, 9]
    for j, value in enumerate(res.labels):
        np.testing.assert_allclose(res.timeseries[:, j], direct_mean(data, labels, mask, value),
                                   rtol=1e-10)
        total = (labels == value).sum()
        assert res.coverage[j] == pytest.approx(((labels == value) & mask).sum() / total)
    assert res.dropped == []


def test_fortran_order_image_input_and_nilearn(case):
    from nilearn.maskers import NiftiLabelsMasker

    data, labels, mask = case
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    img = nb.Nifti1Image(np.asfortranarray(data), aff)
    lab_img = nb.Nifti1Image(labels.astype(np.int16), aff)
    mask_img = nb.Nifti1Image(mask.astype(np.uint8), aff)
    res = parcellate.parcel_timeseries(img, lab_img, mask_img)
    ref = NiftiLabelsMasker(lab_img, mask_img=mask_img, standardize=None).fit_transform(img)
    np.testing.assert_allclose(res.timeseries, ref, rtol=1e-5)
    with pytest.raises(ValueError, match="affine"):
        parcellate.parcel_timeseries(img, nb.Nifti1Image(labels.astype(np.int16), np.eye(4)))


def test_coverage_threshold_and_invalid_voxels(case):
    data, labels, mask = case
    data = data.copy()
    p2 = np.argwhere(labels == 2)
    # 70 % of parcel 2 loses signal (zero time series or NaN): coverage 0.3 -> dropped
    n_bad = round(0.7 * len(p2))
    for i, (x, y, z) in enumerate(p2[:n_bad]):
        data[x, y, z] = np.nan if i % 2 else 0.0
    # one voxel of parcel 3 is bad: parcel kept, mean over the remaining voxels
    x3, y3, z3 = np.argwhere((labels == 3) & mask)[0]
    data[x3, y3, z3] = 0.0
    res = parcellate.parcel_timeseries(data, labels, None, label_values=[1, 2, 3, 4, 9, 12])
    assert res.dropped == [2, 12]  # 12 is absent from the image
    assert np.isnan(res.timeseries[:, [1, 5]]).all()
    assert res.coverage[1] == pytest.approx((len(p2) - n_bad) / len(p2))
    assert res.coverage[5] == 0.0
    valid = np.isfinite(data).all(-1) & (data != 0).any(-1)
    np.testing.assert_allclose(res.timeseries[:, 2], direct_mean(data, labels, valid, 3),
                               rtol=1e-10)
    table = parcellate.coverage_table(res, list("abcdef"))
    assert table.columns.tolist() == ["Node", "coverage"]
    # a lower threshold keeps parcel 2
    res2 = parcellate.parcel_timeseries(data, labels, None, min_coverage=0.2)
    assert 2 not in res2.dropped


def test_grid_mismatch_is_clear(case):
    data, labels, _ = case
    with pytest.raises(ValueError, match="resample the atlas"):
        parcellate.parcel_timeseries(data, labels[:-1])
