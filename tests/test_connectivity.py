"""FC estimators against nilearn's ConnectivityMeasure (1e-8), Fisher z, NaN parcels, tables."""

from __future__ import annotations

import numpy as np
import pytest
from nilearn.connectome import ConnectivityMeasure
from sklearn.covariance import EmpiricalCovariance

from pipeline import connectivity as fc

TOL = 1e-8


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


@pytest.fixture
def series(rng) -> np.ndarray:
    """120 volumes, 9 correlated parcels with unequal means and scales."""
    mix = rng.normal(size=(9, 9))
    return rng.normal(size=(120, 9)) @ mix * rng.uniform(0.5, 3, 9) + rng.uniform(-5, 5, 9)


def nilearn(ts: np.ndarray, kind: str, **kw) -> np.ndarray:
    return ConnectivityMeasure(kind=kind, **kw).fit_transform([ts])[0]


def test_pearson_matches_numpy_and_nilearn_empirical(series):
    ours = fc.connectivity(series, "pearson")
    np.testing.assert_allclose(ours, np.corrcoef(series.T), atol=TOL)
    ref = nilearn(series, "correlation", cov_estimator=EmpiricalCovariance())
    np.testing.assert_allclose(ours, ref, atol=TOL)


def test_ledoit_wolf_matches_nilearn_default(series):
    ours = fc.connectivity(series, "ledoit_wolf")
    np.testing.assert_allclose(ours, nilearn(series, "correlation"), atol=TOL)
    # shrinkage pulls off-diagonal values towards 0, so it differs from plain Pearson
    assert np.abs(ours - fc.connectivity(series, "pearson")).max() > 1e-3


def test_partial_matches_nilearn(series):
    np.testing.assert_allclose(
        fc.connectivity(series, "partial"), nilearn(series, "partial correlation"), atol=TOL
    )
    ref = nilearn(series, "partial correlation", cov_estimator=EmpiricalCovariance())
    np.testing.assert_allclose(fc.partial_correlation(series, shrinkage=None), ref, atol=TOL)


def test_partial_correlation_planted_chain(rng):
    """x -> y -> z: x and z are correlated but conditionally independent given y."""
    x = rng.normal(size=5000)
    y = x + rng.normal(size=5000)
    z = y + rng.normal(size=5000)
    ts = np.column_stack([x, y, z])
    partial = fc.partial_correlation(ts, shrinkage=None)
    assert abs(partial[0, 2]) < 0.05
    assert fc.pearson_correlation(ts)[0, 2] > 0.5
    # analytic partial correlation of x and y given z: 1/sqrt(2) * ... check via regression
    rx = x - np.polyval(np.polyfit(z, x, 1), z)
    ry = y - np.polyval(np.polyfit(z, y, 1), z)
    np.testing.assert_allclose(partial[0, 1], np.corrcoef(rx, ry)[0, 1], atol=1e-10)


def test_singular_empirical_partial_is_a_clear_error(rng):
    with pytest.raises(ValueError, match="singular"):
        fc.partial_correlation(rng.normal(size=(5, 8)), shrinkage=None)
    assert np.isfinite(fc.partial_correlation(rng.normal(size=(5, 8)))).all()


@pytest.mark.parametrize("kind", fc.KINDS)
def test_nan_parcels_stay_nan(series, kind):
    ts = series.copy()
    ts[:, [2, 6]] = np.nan
    out = fc.connectivity(ts, kind)
    keep = [0, 1, 3, 4, 5, 7, 8]
    assert np.isnan(out[[2, 6]]).all() and np.isnan(out[:, [2, 6]]).all()
    np.testing.assert_allclose(out[np.ix_(keep, keep)], fc.connectivity(series[:, keep], kind),
                               atol=1e-12)
    assert np.isfinite(out[np.ix_(keep, keep)]).all()


def test_scattered_nan_is_an_error(series):
    ts = series.copy()
    ts[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fc.connectivity(ts)


def test_fisher_z(series):
    r = fc.connectivity(series, "pearson")
    z = fc.connectivity(series, "pearson", z=True)
    assert np.isnan(np.diag(z)).all()
    off = ~np.eye(9, dtype=bool)
    np.testing.assert_allclose(z[off], 0.5 * np.log((1 + r[off]) / (1 - r[off])), atol=1e-12)
    dup = np.column_stack([series[:, 0], series[:, 0], series[:, 1]])
    assert np.isfinite(fc.fisher_z(fc.pearson_correlation(dup))[0, 1])


def test_tables_and_sidecar(series):
    names = [f"p{i}" for i in range(9)]
    ts_table = fc.timeseries_table(series, names)
    assert list(ts_table.columns) == names and ts_table.shape == (120, 9)
    rel = fc.relmat_table(fc.connectivity(series), names)
    assert list(rel.columns) == ["Node", *names]
    assert rel["Node"].tolist() == names
    np.testing.assert_allclose(rel[names].to_numpy(), np.corrcoef(series.T), atol=TOL)
    side = fc.relmat_sidecar("pearson", z=True, node_files=["atlas.nii.gz"], strategy="36P",
                             n_volumes=100, n_censored=20, dropped_parcels=["p3"])
    assert side["ValidDiagonal"] is False and side["Directed"] is False
    assert side["StorageFormat"] == "Full" and side["DroppedParcels"] == ["p3"]
    with pytest.raises(ValueError, match="unknown"):
        fc.connectivity(series, "tangent")
