"""Functional-connectivity estimators and their XCP-D-style (BEP017) tables.

Estimators (``kind``) on a ``(time, parcels)`` array:

``pearson`` (default)
    Plain Pearson correlation (``numpy.corrcoef``).  Equals nilearn's
    ``ConnectivityMeasure(kind="correlation", cov_estimator=EmpiricalCovariance())``.
``ledoit_wolf``
    Ledoit-Wolf shrunk covariance of the z-scored series (``ddof=1``), turned into a
    correlation.  Equals nilearn's default ``ConnectivityMeasure(kind="correlation")``
    (which uses ``sklearn.covariance.LedoitWolf``).
``partial``
    Partial correlation ``-P_ij / sqrt(P_ii P_jj)`` from the precision ``P``.  By default
    the precision inverts the Ledoit-Wolf covariance of the *raw* (not standardised)
    series, exactly as nilearn's ``ConnectivityMeasure(kind="partial correlation")``
    does; the shrinkage keeps it defined when parcels outnumber volumes.
    ``shrinkage=None`` inverts the empirical covariance instead.

Conventions
-----------
* A parcel whose column is all NaN (poor coverage, see :mod:`pipeline.parcellate`) is
  left out of the estimate and comes back as a NaN row and column; NaN anywhere else is
  an error.  A constant (zero-variance) parcel is treated the same way as NaN.
* The diagonal of correlation matrices is 1 (as XCP-D writes it).  The Fisher-z version
  (:func:`fisher_z`) has a NaN diagonal (``arctanh(1)`` is infinite) and the sidecar then
  says ``ValidDiagonal: false``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.covariance import LedoitWolf

KINDS = ("pearson", "partial", "ledoit_wolf")

#: ``stat-`` entity label and BEP017 ``RelationshipMeasure`` of each estimator.
STAT_LABELS = {
    "pearson": "pearsoncorrelation",
    "partial": "partialcorrelation",
    "ledoit_wolf": "ledoitwolfcorrelation",
}
MEASURES = {
    "pearson": "Pearson correlation",
    "partial": "partial correlation (precision of the Ledoit-Wolf covariance)",
    "ledoit_wolf": "Pearson correlation of the Ledoit-Wolf shrunk covariance",
}

# |r| is clipped just below 1 before arctanh so duplicated parcels give a large finite z.
_Z_CLIP = 1 - 1e-12


def _split_valid(timeseries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ts = np.asarray(timeseries, dtype=float)
    if ts.ndim != 2:
        raise ValueError(f"time series must be 2-D (time, parcels), got shape {ts.shape}")
    all_nan = np.isnan(ts).all(axis=0)
    rest = ts[:, ~all_nan]
    if not np.isfinite(rest).all():
        raise ValueError(
            "time series has NaN/inf inside parcels that otherwise have data; only whole "
            "NaN columns (dropped parcels) are allowed"
        )
    constant = np.zeros(ts.shape[1], bool)
    constant[~all_nan] = rest.std(axis=0) < np.finfo(float).eps * (1 + np.abs(rest).max(0))
    valid = ~all_nan & ~constant
    if ts.shape[0] < 2:
        raise ValueError(f"need at least 2 time points for connectivity, got {ts.shape[0]}")
    return ts[:, valid], valid


def _embed(sub: np.ndarray, valid: np.ndarray) -> np.ndarray:
    n = valid.size
    out = np.full((n, n), np.nan)
    out[np.ix_(valid, valid)] = sub
    return out


def _cov_to_corr(cov: np.ndarray) -> np.ndarray:
    d = 1.0 / np.sqrt(np.diag(cov))
    corr = cov * d[:, None] * d[None, :]
    np.fill_diagonal(corr, 1.0)
    return corr


def pearson_correlation(timeseries: np.ndarray) -> np.ndarray:
    """Pearson correlation matrix ``(P, P)`` of a ``(T, P)`` array; NaN parcels stay NaN."""
    ts, valid = _split_valid(timeseries)
    corr = np.corrcoef(ts, rowvar=False) if ts.shape[1] else np.empty((0, 0))
    corr = np.atleast_2d(corr)
    np.fill_diagonal(corr, 1.0)
    return _embed(corr, valid)


def ledoit_wolf_correlation(timeseries: np.ndarray) -> np.ndarray:
    """Correlation from the Ledoit-Wolf covariance of z-scored series (nilearn's default)."""
    ts, valid = _split_valid(timeseries)
    z = ts - ts.mean(axis=0)
    z /= z.std(axis=0, ddof=1)
    cov = LedoitWolf(store_precision=False).fit(z).covariance_
    return _embed(_cov_to_corr(cov), valid)


def partial_correlation(
    timeseries: np.ndarray, shrinkage: str | None = "ledoit_wolf"
) -> np.ndarray:
    """Partial correlation matrix; see the module notes for ``shrinkage``.

    Raises
    ------
    ValueError
        With ``shrinkage=None`` when the empirical covariance is singular (fewer volumes
        than parcels): use the default Ledoit-Wolf shrinkage then.
    """
    ts, valid = _split_valid(timeseries)
    if shrinkage == "ledoit_wolf":
        cov = LedoitWolf(store_precision=False).fit(ts).covariance_
    elif shrinkage is None:
        centred = ts - ts.mean(axis=0)
        cov = centred.T @ centred / ts.shape[0]
        if np.linalg.matrix_rank(cov) < cov.shape[0]:
            raise ValueError(
                f"empirical covariance of {ts.shape[1]} parcels from {ts.shape[0]} volumes is "
                "singular; use shrinkage='ledoit_wolf'"
            )
    else:
        raise ValueError(f"shrinkage must be 'ledoit_wolf' or None, got {shrinkage!r}")
    partial = -_cov_to_corr(np.linalg.inv(cov))
    np.fill_diagonal(partial, 1.0)
    return _embed(partial, valid)


def fisher_z(matrix: np.ndarray) -> np.ndarray:
    """``arctanh`` of a correlation matrix with a NaN diagonal (see module notes)."""
    r = np.array(matrix, dtype=float)
    z = np.arctanh(np.clip(r, -_Z_CLIP, _Z_CLIP))
    z[np.isnan(r)] = np.nan
    np.fill_diagonal(z, np.nan)
    return z


def connectivity(timeseries: np.ndarray, kind: str = "pearson", *, z: bool = False) -> np.ndarray:
    """Connectivity matrix of ``(T, P)`` parcel time series by estimator name.

    Parameters
    ----------
    timeseries : ndarray (T, P)
        Denoised, censored parcel time series; all-NaN columns are dropped parcels.
    kind : {"pearson", "partial", "ledoit_wolf"}
    z : bool
        Return the Fisher z transform (diagonal NaN).
    """
    if kind == "pearson":
        out = pearson_correlation(timeseries)
    elif kind == "partial":
        out = partial_correlation(timeseries)
    elif kind == "ledoit_wolf":
        out = ledoit_wolf_correlation(timeseries)
    else:
        raise ValueError(f"unknown connectivity estimator {kind!r}; choose from {KINDS}")
    return fisher_z(out) if z else out


# --------------------------------------------------------------------------- output tables


def timeseries_table(timeseries: np.ndarray, names: Sequence[str]) -> pd.DataFrame:
    """``stat-mean_timeseries.tsv`` content: one column per parcel, one row per kept volume."""
    ts = np.asarray(timeseries, dtype=float)
    if ts.ndim != 2 or ts.shape[1] != len(names):
        raise ValueError(f"time series shape {ts.shape} does not match {len(names)} parcel names")
    return pd.DataFrame(ts, columns=[str(n) for n in names])


def relmat_table(matrix: np.ndarray, names: Sequence[str]) -> pd.DataFrame:
    """``relmat.tsv`` content, as XCP-D writes it.

    XCP-D (``TSVConnect``) writes the square matrix with a header of parcel names *and* a
    first ``Node`` column holding the row names (``index_label="Node"``); this table has
    that ``Node`` column so files are interchangeable with XCP-D's.
    """
    m = np.asarray(matrix, dtype=float)
    if m.shape != (len(names), len(names)):
        raise ValueError(f"matrix shape {m.shape} does not match {len(names)} parcel names")
    table = pd.DataFrame(m, columns=[str(n) for n in names])
    table.insert(0, "Node", [str(n) for n in names])
    return table


def relmat_sidecar(
    kind: str,
    *,
    z: bool = False,
    node_files: Sequence[str] = (),
    strategy: str | None = None,
    n_volumes: int | None = None,
    n_censored: int | None = None,
    dropped_parcels: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """BEP017 JSON sidecar of a relationship matrix.

    Parameters
    ----------
    kind : str
        Estimator name (see :data:`KINDS`).
    z : bool
        Whether the matrix is Fisher-z transformed (then the diagonal is not valid).
    node_files : sequence of str
        BIDS URIs / relative paths of the atlas ``dseg`` image and table.
    strategy, n_volumes, n_censored, dropped_parcels
        Denoising strategy name, volumes used, volumes censored, parcels set to NaN.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown connectivity estimator {kind!r}; choose from {KINDS}")
    measure = MEASURES[kind] + (", Fisher z-transformed (arctanh)" if z else "")
    sidecar: dict[str, Any] = {
        "RelationshipMeasure": measure,
        "Weighted": True,
        "Directed": False,
        "ValidDiagonal": not z,
        "StorageFormat": "Full",
        "NodeFiles": list(node_files),
        "DenoisingStrategy": strategy,
        "NumberOfVolumesUsed": n_volumes,
        "NumberOfVolumesCensored": n_censored,
        "DroppedParcels": [str(p) for p in dropped_parcels],
    }
    if extra:
        sidecar.update(extra)
    return sidecar
