"""Confound time series of a BOLD run, with fMRIPrep's column names.

Columns (all length T, one row per volume; ``NaN`` where undefined, written ``n/a``):

* ``trans_x, trans_y, trans_z`` (mm), ``rot_x, rot_y, rot_z`` (rad): head motion, see
  :mod:`pipeline.motion` for the convention.
* ``<col>_derivative1`` (backward difference, first row NaN), ``<col>_power2``,
  ``<col>_derivative1_power2`` for motion and tissue signals (Satterthwaite 2013's
  36-parameter expansion).
* ``global_signal``, ``white_matter``, ``csf``: mean signal in the brain, WM and CSF masks.
* ``a_comp_cor_XX`` (combined WM+CSF mask, components explaining 50 % of variance, like
  fMRIPrep), ``w_comp_cor_XX`` and ``c_comp_cor_XX`` (WM and CSF masks separately, a fixed
  5 components each, as Muschelli 2014 / Parkes 2018 / XCP-D's ``acompcor`` use).
  aCompCor (Behzadi 2007): voxel signals are high-passed with a discrete cosine basis
  (128 s cut-off, as fMRIPrep), each voxel is scaled to unit variance and the temporal
  singular vectors of the (time x voxel) matrix are the components.  Masks should be
  eroded (:func:`erode_mask`) so grey-matter signal does not leak in.
* ``framewise_displacement``: Power 2012, first row NaN.
* ``dvars`` (not standardised), ``std_dvars``: Nichols' DVARS as nipype's
  ``ComputeDVARS`` (fMRIPrep); first row NaN.
* ``non_steady_state_outlier_XX``: one-hot column per initial non-steady-state volume.

:func:`describe_confounds` gives the JSON sidecar describing every column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

MOTION_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
TISSUE_COLUMNS = ("global_signal", "white_matter", "csf")
HEAD_RADIUS_MM = 50.0


def _as_voxels(data: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(V, T) float64 matrix of the masked voxels of a 4-D array."""
    arr = np.asarray(data)
    if arr.ndim != 4:
        raise ValueError(f"BOLD data must be 4-D (x, y, z, t), got shape {arr.shape}")
    if mask is None:
        return arr.reshape(-1, arr.shape[3]).astype(np.float64)
    m = np.asarray(mask) > 0
    if m.shape != arr.shape[:3]:
        raise ValueError(f"mask shape {m.shape} differs from the BOLD grid {arr.shape[:3]}")
    if not m.any():
        raise ValueError("mask is empty")
    return arr[m].astype(np.float64)


# --------------------------------------------------------------------------- motion


def framewise_displacement(motion: np.ndarray, radius: float = HEAD_RADIUS_MM) -> np.ndarray:
    """Power (2012) framewise displacement in mm.

    ``FD_t = sum |d trans| + radius * sum |d rot|`` with rotations in radians (arc length
    on a sphere of ``radius`` mm).  The first value is NaN (no previous volume), as fMRIPrep.

    Parameters
    ----------
    motion : ndarray (T, 6)
        ``trans_x, trans_y, trans_z`` (mm), ``rot_x, rot_y, rot_z`` (rad).
    """
    params = np.asarray(motion, dtype=float)
    if params.ndim != 2 or params.shape[1] != 6:
        raise ValueError(f"motion parameters must be (T, 6), got shape {params.shape}")
    diff = np.abs(np.diff(params, axis=0))
    fd = diff[:, :3].sum(axis=1) + radius * diff[:, 3:].sum(axis=1)
    return np.concatenate([[np.nan], fd])


# --------------------------------------------------------------------------- DVARS


def _ar1(x: np.ndarray) -> np.ndarray:
    """Yule-Walker lag-1 autocorrelation of each row (biased autocovariance, as nitime)."""
    x = x - x.mean(axis=1, keepdims=True)
    denom = (x * x).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (x[:, 1:] * x[:, :-1]).sum(axis=1) / denom, 0.0)


def dvars(
    data: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    intensity_normalization: float = 1000.0,
    remove_zerovariance: bool = True,
    variance_tol: float = 1e-7,
) -> tuple[np.ndarray, np.ndarray]:
    """DVARS (Power 2012) and standardised DVARS (Nichols 2013), as nipype/fMRIPrep.

    Data are first scaled so the median of all masked values is
    ``intensity_normalization`` (fMRIPrep's 1000).  ``dvars`` is the root mean square over
    voxels of the temporal difference; ``std_dvars`` divides it by its expected value under
    stationarity, ``mean_v(sqrt(2 (1 - ar1_v)) * sd_v)``, with ``sd_v`` the robust standard
    deviation ``IQR / 1.349`` (percentiles with ``lower`` interpolation, as FSL) and
    ``ar1_v`` the Yule-Walker lag-1 autocorrelation of voxel ``v``.

    Returns
    -------
    dvars, std_dvars : ndarray (T,)
        First value NaN.
    """
    vox = _as_voxels(data, mask)
    if intensity_normalization:
        vox = vox / np.median(vox) * intensity_normalization
    sd = (
        np.percentile(vox, 75, axis=1, method="lower")
        - np.percentile(vox, 25, axis=1, method="lower")
    ) / 1.349
    if remove_zerovariance:
        keep = sd > variance_tol
        vox, sd = vox[keep], sd[keep]
    diff_sd = np.sqrt(2 * (1 - _ar1(vox))) * sd
    d = np.sqrt(np.square(np.diff(vox, axis=1)).mean(axis=0))
    nan = np.array([np.nan])
    return np.concatenate([nan, d]), np.concatenate([nan, d / diff_sd.mean()])


# --------------------------------------------------------------------------- dummies


def non_steady_state_volumes(
    data: np.ndarray, mask: np.ndarray | None = None, *, threshold: float = 3.5,
    max_volumes: int = 50,
) -> int:
    """Number of initial non-steady-state volumes (nipype's ``NonSteadyStateDetector``).

    The global signal of the first ``max_volumes`` volumes is compared with its median by a
    modified z-score ``0.6745 |g - median| / MAD`` (Iglewicz & Hoaglin); the leading run of
    volumes above ``threshold`` counts as non-steady-state.
    """
    arr = np.asarray(data)
    if arr.ndim != 4:
        raise ValueError(f"BOLD data must be 4-D, got shape {arr.shape}")
    head = arr[..., :max_volumes]
    g = head[np.asarray(mask) > 0].mean(axis=0) if mask is not None else head.mean(axis=(0, 1, 2))
    dev = np.abs(g - np.median(g))
    mad = np.median(dev)
    if mad == 0:
        return 0
    score = 0.6745 * dev / mad
    above = score > threshold
    return int(above.size if above.all() else np.argmin(above))


# --------------------------------------------------------------------------- tissue


def erode_mask(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Binary erosion (6-connected) so tissue masks keep clear of partial-volume voxels."""
    m = np.asarray(mask) > 0
    return ndimage.binary_erosion(m, iterations=iterations) if iterations > 0 else m


def tissue_signals(data: np.ndarray, masks: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Mean signal per volume inside each named mask (e.g. ``global_signal``, ``csf``)."""
    return pd.DataFrame({name: _as_voxels(data, m).mean(axis=0) for name, m in masks.items()})


def cosine_basis(n_volumes: int, tr: float, cutoff_s: float = 128.0) -> np.ndarray:
    """Discrete cosine drift regressors (SPM/nilearn) with periods longer than ``cutoff_s``."""
    order = int(np.floor(2 * n_volumes * tr / cutoff_s))
    t = np.arange(n_volumes)
    k = np.arange(1, order + 1)
    return np.sqrt(2.0 / n_volumes) * np.cos(np.pi / n_volumes * (t[:, None] + 0.5) * k)


def compcor(
    data: np.ndarray,
    mask: np.ndarray,
    tr: float,
    n_components: int | float = 5,
    *,
    highpass_s: float | None = 128.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Anatomical CompCor components (Behzadi 2007) from the voxels in ``mask``.

    Parameters
    ----------
    data : ndarray (X, Y, Z, T)
    mask : ndarray (X, Y, Z)
        Usually an eroded WM, CSF or WM+CSF mask.
    tr : float
        Repetition time in seconds (for the cosine high-pass).
    n_components : int or float
        An integer keeps that many components; a float in (0, 1) keeps the fewest
        components whose cumulative explained variance reaches it (fMRIPrep uses 0.5).
    highpass_s : float or None
        Cosine high-pass cut-off in seconds before the decomposition (``None``: only the
        mean is removed).

    Returns
    -------
    components : ndarray (T, k)
        Unit-norm temporal components; the sign is fixed (largest voxel loading positive)
        so the same data always give the same bytes.
    variance_explained : ndarray (k,)
    """
    vox = _as_voxels(data, mask)
    vox = vox[np.isfinite(vox).all(axis=1)]
    n_t = vox.shape[1]
    basis = np.ones((n_t, 1))
    if highpass_s:
        basis = np.column_stack([basis, cosine_basis(n_t, tr, highpass_s)])
    # Voxels as columns: M (T, V); regress the drift basis out of every voxel.
    M = vox.T
    M = M - basis @ np.linalg.lstsq(basis, M, rcond=None)[0]
    std = M.std(axis=0, ddof=1)
    keep = std > 1e-10
    if not keep.any():
        raise ValueError("CompCor mask has no voxel with temporal variance")
    M = M[:, keep] / std[keep]
    u, s, vt = np.linalg.svd(M, full_matrices=False)
    var = s**2 / np.sum(s**2)
    if isinstance(n_components, float) and 0 < n_components < 1:
        k = int(np.searchsorted(np.cumsum(var), n_components) + 1)
    else:
        k = int(n_components)
    k = min(k, u.shape[1])
    comps = u[:, :k].copy()
    # SVD signs are arbitrary: make each component's largest voxel loading positive.
    signs = np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(axis=1)])
    signs[signs == 0] = 1
    return comps * signs, var[:k]


# --------------------------------------------------------------------------- assembly


def expand_confounds(
    table: pd.DataFrame, columns: Sequence[str], *, derivatives: bool = True, powers: bool = True
) -> pd.DataFrame:
    """Add fMRIPrep's ``_derivative1``, ``_power2`` and ``_derivative1_power2`` columns.

    The derivative is the backward difference (first row NaN), as fMRIPrep.
    """
    out = table.copy()
    for col in columns:
        x = table[col].to_numpy(dtype=float)
        if derivatives:
            d = np.concatenate([[np.nan], np.diff(x)])
            out[f"{col}_derivative1"] = d
        if powers:
            out[f"{col}_power2"] = x**2
        if derivatives and powers:
            out[f"{col}_derivative1_power2"] = d**2
    return out


def non_steady_state_columns(n_volumes: int, n_dummy: int) -> pd.DataFrame:
    """One-hot ``non_steady_state_outlier_XX`` columns for the first ``n_dummy`` volumes."""
    eye = np.zeros((n_volumes, n_dummy))
    eye[np.arange(n_dummy), np.arange(n_dummy)] = 1
    return pd.DataFrame(eye, columns=[f"non_steady_state_outlier_{i:02d}" for i in range(n_dummy)])


def build_confounds(
    data: np.ndarray,
    motion: np.ndarray,
    tr: float,
    *,
    brain_mask: np.ndarray,
    wm_mask: np.ndarray,
    csf_mask: np.ndarray,
    n_dummy: int = 0,
    acompcor_variance: float = 0.5,
    tissue_components: int = 5,
    erosion: int = 1,
) -> pd.DataFrame:
    """The full confounds table of a motion-corrected run, in fMRIPrep's column names.

    Parameters
    ----------
    data : ndarray (X, Y, Z, T)
        Motion-corrected BOLD (all volumes, including non-steady-state ones).
    motion : ndarray (T, 6)
        From :func:`pipeline.motion.realign`.
    tr : float
        Repetition time in seconds.
    brain_mask, wm_mask, csf_mask : ndarray (X, Y, Z)
        Masks on the BOLD grid.  WM/CSF masks are eroded ``erosion`` times for the tissue
        signals and CompCor (partial-volume voxels carry grey-matter signal).
    n_dummy : int
        Initial non-steady-state volumes: excluded from CompCor (their rows are n/a there);
        they keep their rows in the table and get one-hot outlier columns.
    acompcor_variance : float
        Variance fraction of the combined-mask ``a_comp_cor`` components.
    tissue_components : int
        Fixed number of ``w_comp_cor`` / ``c_comp_cor`` components.
    """
    arr = np.asarray(data)
    n_t = arr.shape[3]
    motion = np.asarray(motion, dtype=float)
    if motion.shape != (n_t, 6):
        raise ValueError(f"motion must be ({n_t}, 6) for {n_t} volumes, got {motion.shape}")
    if not 0 <= n_dummy < n_t:
        raise ValueError(f"n_dummy={n_dummy} must be in [0, {n_t})")
    wm = erode_mask(wm_mask, erosion) & (np.asarray(brain_mask) > 0)
    csf = erode_mask(csf_mask, erosion) & (np.asarray(brain_mask) > 0)
    for name, m in (("white-matter", wm), ("CSF", csf)):
        if not m.any():
            raise ValueError(f"the eroded {name} mask is empty; check the tissue segmentation")
    table = pd.DataFrame(motion, columns=list(MOTION_COLUMNS))
    signals = tissue_signals(arr, {"global_signal": brain_mask, "white_matter": wm, "csf": csf})
    table = pd.concat([signals, table], axis=1)
    table = expand_confounds(table, [*TISSUE_COLUMNS, *MOTION_COLUMNS])

    steady = arr[..., n_dummy:]
    pad = np.full((n_dummy, 1), np.nan)
    for prefix, mask, k in (
        ("a_comp_cor", wm | csf, acompcor_variance),
        ("w_comp_cor", wm, tissue_components),
        ("c_comp_cor", csf, tissue_components),
    ):
        comps, _ = compcor(steady, mask, tr, k)
        comps = np.vstack([np.repeat(pad, comps.shape[1], axis=1), comps])
        for i in range(comps.shape[1]):
            table[f"{prefix}_{i:02d}"] = comps[:, i]
    table["framewise_displacement"] = framewise_displacement(motion)
    table["dvars"], table["std_dvars"] = dvars(arr, brain_mask)
    if n_dummy:
        table = pd.concat([table, non_steady_state_columns(n_t, n_dummy)], axis=1)
    return table


_DESCRIPTIONS = {
    "trans_x": ("Translation along x (left-right)", "mm"),
    "trans_y": ("Translation along y (posterior-anterior)", "mm"),
    "trans_z": ("Translation along z (inferior-superior)", "mm"),
    "rot_x": ("Rotation about x (pitch)", "rad"),
    "rot_y": ("Rotation about y (roll)", "rad"),
    "rot_z": ("Rotation about z (yaw)", "rad"),
    "global_signal": ("Mean BOLD signal in the brain mask", "arbitrary"),
    "white_matter": ("Mean BOLD signal in the eroded white-matter mask", "arbitrary"),
    "csf": ("Mean BOLD signal in the eroded CSF mask", "arbitrary"),
    "framewise_displacement": (
        "Framewise displacement (Power 2012): sum of absolute backward differences of the "
        "translations and of the rotations as arcs on a 50 mm sphere; first volume n/a",
        "mm",
    ),
    "dvars": ("DVARS: RMS over brain voxels of the temporal difference, data scaled to a "
              "median of 1000; first volume n/a", "arbitrary"),
    "std_dvars": ("Standardised DVARS (Nichols 2013): DVARS over its expected value under "
                  "stationarity (robust SD and AR(1) per voxel); first volume n/a", "ratio"),
}
_COMPCOR = {
    "a_comp_cor": "combined eroded WM+CSF mask, components explaining 50% of variance",
    "w_comp_cor": "eroded white-matter mask, fixed number of components",
    "c_comp_cor": "eroded CSF mask, fixed number of components",
}


def describe_confounds(columns: Sequence[str]) -> dict[str, dict[str, Any]]:
    """JSON sidecar content describing every confound column (``Description``, ``Units``)."""
    out: dict[str, dict[str, Any]] = {}
    for col in columns:
        base, suffix = col, ""
        for tail in ("_derivative1_power2", "_derivative1", "_power2"):
            if col.endswith(tail):
                base, suffix = col[: -len(tail)], tail
                break
        if base in _DESCRIPTIONS:
            text, units = _DESCRIPTIONS[base]
            if suffix == "_derivative1":
                text = f"Backward temporal difference of {base} (first volume n/a)"
            elif suffix == "_power2":
                text, units = f"Square of {base}", f"({units})^2"
            elif suffix == "_derivative1_power2":
                text, units = f"Square of the backward difference of {base}", f"({units})^2"
            out[col] = {"Description": text, "Units": units}
        elif col[:10] in _COMPCOR:
            out[col] = {
                "Description": f"Anatomical CompCor component {col[-2:]} (Behzadi 2007): "
                f"{_COMPCOR[col[:10]]}; cosine high-pass 128 s, voxels variance-normalised; "
                "n/a for non-steady-state volumes",
                "Method": "aCompCor",
                "Units": "arbitrary",
            }
        elif col.startswith("non_steady_state_outlier_"):
            out[col] = {
                "Description": f"One-hot indicator of non-steady-state volume {col[-2:]} "
                "(initial global-signal outlier, modified z-score > 3.5)",
                "Units": "indicator",
            }
        else:
            out[col] = {"Description": "User or unknown confound", "Units": "arbitrary"}
    return out


def tsnr(data: np.ndarray, mask: np.ndarray) -> float:
    """Median over ``mask`` voxels of the temporal SNR ``mean / std`` (ddof=0)."""
    vox = _as_voxels(data, mask)
    sd = vox.std(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(sd > 0, vox.mean(axis=1) / sd, np.nan)
    return float(np.nanmedian(snr))
