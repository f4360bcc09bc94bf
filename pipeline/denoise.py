"""Denoising of BOLD (voxel or parcel) time series, following XCP-D's order of operations.

For one run, :func:`denoise_run` does:

1. drop the initial non-steady-state volumes;
2. censoring mask: volumes with framewise displacement above ``fd_threshold`` (default
   0.5 mm) are censored, and so are uncensored stretches shorter than ``min_segment``
   (default 5) volumes between/next to censored ones (Power 2014);
3. confound regression: the design is ``[1, linear trend, confounds]``; the betas are fit on
   the *uncensored* volumes only, residuals are computed for all volumes (XCP-D);
4. interpolation of censored volumes from the uncensored residuals with a cubic spline
   (``scipy.interpolate.CubicSpline``, not-a-knot ends, as XCP-D >= 0.7); censored
   volumes before the first / after the last kept volume take the nearest kept value;
5. band-pass filter: Butterworth (``scipy.signal.butter``, default order 2 at each cut-off,
   0.01-0.08 Hz), run forwards and backwards (``filtfilt``: zero phase, effective order
   doubled) with constant padding of length ``T - 1`` like XCP-D;
6. censored volumes are dropped.

Steps 3-5 are linear in the data, and nothing from censored volumes reaches the kept
ones, so the output does not depend on what the censored volumes contain.  Because they
are linear, denoising parcel means equals parcel means of denoised voxels, so the
workflow can denoise the small ``(T, parcels)`` array.

Strategies are YAML files (``pipeline/data/denoise/<name>.yml`` or a user path), see
:func:`load_strategy` for the keys.  Several runs of a session are denoised separately and
joined with :func:`concatenate_runs`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy import signal
from scipy.interpolate import CubicSpline

STRATEGY_KEYS = {"name", "description", "confounds", "censoring", "filter", "methods", "citation"}
CENSORING_KEYS = {"fd_threshold", "min_segment"}
FILTER_KEYS = {"low_hz", "high_hz", "order"}
DEFAULT_MIN_MINUTES = 4.0


class StrategyError(ValueError):
    """A denoising strategy file is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Strategy:
    """A denoising strategy.

    Attributes
    ----------
    name : str
    confounds : tuple of str
        Confound column names; entries with ``*``/``?`` are shell-style patterns
        (``a_comp_cor_*``) matched against the confounds table.
    fd_threshold : float or None
        Censor volumes with FD above this (mm); ``None`` disables censoring.
    min_segment : int
        Shortest uncensored stretch kept.
    low_hz, high_hz : float or None
        Band-pass edges; ``None`` disables that side.
    filter_order : int
        Butterworth order at each edge (before ``filtfilt`` doubles it).
    description, methods, citation : str
        Text for reports; ``methods`` may use ``{fd_threshold}``, ``{min_segment}``,
        ``{low_hz}``, ``{high_hz}``, ``{filter_order}`` placeholders.
    """

    name: str
    confounds: tuple[str, ...]
    fd_threshold: float | None = 0.5
    min_segment: int = 5
    low_hz: float | None = 0.01
    high_hz: float | None = 0.08
    filter_order: int = 2
    description: str = ""
    methods: str = ""
    citation: str = ""
    source: str = field(default="", compare=False)

    def methods_text(self) -> str:
        """The methods paragraph with this strategy's parameters filled in."""
        return self.methods.format(
            fd_threshold=self.fd_threshold, min_segment=self.min_segment, low_hz=self.low_hz,
            high_hz=self.high_hz, filter_order=self.filter_order,
        ).strip()


def builtin_strategies() -> list[str]:
    """Names of the strategies shipped in ``pipeline/data/denoise``."""
    folder = resources.files("pipeline") / "data" / "denoise"
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".yml"))


def _bad(source: str, key: str, why: str) -> StrategyError:
    return StrategyError(f"denoising strategy {source}: key '{key}' {why}")


def _number(source: str, key: str, value: Any, *, allow_none: bool, minimum: float = 0) -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise _bad(source, key, f"must be a number >= {minimum}"
                   + (" or null" if allow_none else "") + f", got {value!r}")
    return value


def parse_strategy(content: dict[str, Any], source: str) -> Strategy:
    """Validate a strategy mapping (from YAML) and build a :class:`Strategy`."""
    if not isinstance(content, dict):
        raise StrategyError(f"denoising strategy {source}: expected a mapping of keys, got "
                            f"{type(content).__name__}")
    unknown = set(content) - STRATEGY_KEYS
    if unknown:
        allowed = sorted(STRATEGY_KEYS)
        raise _bad(source, sorted(unknown)[0], f"is not known; allowed keys: {allowed}")
    for required in ("name", "confounds"):
        if required not in content:
            raise _bad(source, required, "is required")
    confounds = content["confounds"]
    if not isinstance(confounds, list) or not all(isinstance(c, str) for c in confounds):
        raise _bad(source, "confounds", "must be a list of column names (may be empty: [])")
    kwargs: dict[str, Any] = {}
    cens = content.get("censoring") or {}
    if not isinstance(cens, dict):
        raise _bad(source, "censoring", "must be a mapping (fd_threshold, min_segment) or null")
    for key in set(cens) - CENSORING_KEYS:
        raise _bad(source, f"censoring.{key}", f"is not known; allowed: {sorted(CENSORING_KEYS)}")
    if "censoring" in content and not content["censoring"]:
        kwargs["fd_threshold"] = None
    if "fd_threshold" in cens:
        kwargs["fd_threshold"] = _number(source, "censoring.fd_threshold", cens["fd_threshold"],
                                         allow_none=True)
    if "min_segment" in cens:
        value = cens["min_segment"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _bad(source, "censoring.min_segment", f"must be an integer >= 1, got {value!r}")
        kwargs["min_segment"] = value
    filt = content.get("filter") or {}
    if not isinstance(filt, dict):
        raise _bad(source, "filter", "must be a mapping (low_hz, high_hz, order) or null")
    for key in set(filt) - FILTER_KEYS:
        raise _bad(source, f"filter.{key}", f"is not known; allowed: {sorted(FILTER_KEYS)}")
    if "filter" in content and not content["filter"]:
        kwargs["low_hz"] = kwargs["high_hz"] = None
    for key, attr in (("low_hz", "low_hz"), ("high_hz", "high_hz")):
        if key in filt:
            kwargs[attr] = _number(source, f"filter.{key}", filt[key], allow_none=True)
    if "order" in filt:
        value = filt["order"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
            raise _bad(source, "filter.order", f"must be an integer in 1..8, got {value!r}")
        kwargs["filter_order"] = value
    low, high = kwargs.get("low_hz", 0.01), kwargs.get("high_hz", 0.08)
    if low is not None and high is not None and low >= high:
        raise _bad(source, "filter.low_hz", f"({low}) must be below filter.high_hz ({high})")
    for key in ("name", "description", "methods", "citation"):
        if key in content and not isinstance(content[key], str):
            raise _bad(source, key, "must be text")
    return Strategy(
        name=content["name"], confounds=tuple(confounds),
        description=content.get("description", ""), methods=content.get("methods", ""),
        citation=content.get("citation", ""), source=source, **kwargs,
    )


def load_strategy(name_or_path: str | Path) -> Strategy:
    """Load a built-in strategy by name (``36P``) or a user YAML file by path.

    Keys: ``name`` (required), ``confounds`` (required list), ``censoring``
    (``fd_threshold``, ``min_segment``; ``null`` disables), ``filter`` (``low_hz``,
    ``high_hz``, ``order``; ``null`` disables), ``description``, ``methods``, ``citation``.
    """
    text = str(name_or_path)
    if text in builtin_strategies():
        ref = resources.files("pipeline") / "data" / "denoise" / f"{text}.yml"
        content, source = yaml.safe_load(ref.read_text()), f"'{text}' (built-in)"
    else:
        path = Path(text)
        if not path.is_file():
            raise StrategyError(
                f"denoising strategy {text!r} is neither a built-in ({builtin_strategies()}) "
                "nor an existing YAML file"
            )
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise StrategyError(f"denoising strategy {path}: not valid YAML ({err})") from err
        source = str(path)
    return parse_strategy(content, source)


def select_confounds(strategy: Strategy, confounds: pd.DataFrame) -> list[str]:
    """Resolve the strategy's columns (and patterns) against a confounds table.

    Raises
    ------
    StrategyError
        Naming the columns that are missing from the table.
    """
    chosen: list[str] = []
    missing = []
    for entry in strategy.confounds:
        if any(ch in entry for ch in "*?["):
            hits = fnmatch.filter(list(confounds.columns), entry)
            if not hits:
                missing.append(entry)
            chosen += [h for h in hits if h not in chosen]
        elif entry in confounds.columns:
            if entry not in chosen:
                chosen.append(entry)
        else:
            missing.append(entry)
    if missing:
        raise StrategyError(
            f"denoising strategy {strategy.source or strategy.name}: confounds {missing} are not "
            "in the confounds table; check the column names (fMRIPrep naming)"
        )
    return chosen


# --------------------------------------------------------------------------- the steps


def censor_mask(fd: np.ndarray, threshold: float | None = 0.5, min_segment: int = 5) -> np.ndarray:
    """Boolean mask of volumes to *keep* (True) from framewise displacement.

    ``NaN`` FD (the first volume) is kept.  After thresholding, every run of kept volumes
    shorter than ``min_segment`` is censored too, unless nothing was censored at all.
    """
    fd = np.asarray(fd, dtype=float)
    keep = np.ones(fd.shape, bool) if threshold is None else ~(np.nan_to_num(fd) > threshold)
    if keep.all() or min_segment <= 1:
        return keep
    edges = np.diff(np.r_[0, keep.astype(int), 0])
    for start, stop in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
        if stop - start < min_segment:
            keep[start:stop] = False
    return keep


def regress_confounds(
    data: np.ndarray, confounds: np.ndarray | None, keep: np.ndarray | None = None
) -> np.ndarray:
    """Residuals of ``data`` (T, N) after ``[1, linear trend, confounds]`` fit on kept rows."""
    y = np.asarray(data, dtype=float)
    n_t = y.shape[0]
    trend = np.linspace(-1, 1, n_t)
    parts = [np.ones((n_t, 1)), trend[:, None]]
    if confounds is not None and np.size(confounds):
        parts.append(np.asarray(confounds, dtype=float).reshape(n_t, -1))
    X = np.hstack(parts)
    if not np.isfinite(X).all():
        raise ValueError("confound matrix has NaN/inf; fill or drop those rows first")
    keep = np.ones(n_t, bool) if keep is None else np.asarray(keep, bool)
    if keep.sum() <= X.shape[1]:
        raise ValueError(
            f"only {int(keep.sum())} uncensored volumes for {X.shape[1]} regressors; "
            "the run is too short or too censored for this strategy"
        )
    beta = np.linalg.lstsq(X[keep], y[keep], rcond=None)[0]
    return y - X @ beta


def interpolate_censored(data: np.ndarray, keep: np.ndarray, tr: float = 1.0) -> np.ndarray:
    """Fill censored rows of ``data`` (T, N) by cubic spline through the kept rows.

    Rows before the first / after the last kept one take the nearest kept value.
    """
    y = np.array(data, dtype=float)
    keep = np.asarray(keep, bool)
    if keep.all():
        return y
    if keep.sum() < 2:
        raise ValueError("need at least 2 uncensored volumes to interpolate")
    t = np.arange(y.shape[0]) * tr
    kept_t = t[keep]
    spline = CubicSpline(kept_t, y[keep], axis=0)
    inner = ~keep & (t > kept_t[0]) & (t < kept_t[-1])
    y[inner] = spline(t[inner])
    first, last = np.flatnonzero(keep)[[0, -1]]
    y[:first] = y[first]
    y[last + 1:] = y[last]
    return y


def butterworth_filter(
    data: np.ndarray, tr: float, low_hz: float | None = 0.01, high_hz: float | None = 0.08,
    order: int = 2,
) -> np.ndarray:
    """Zero-phase Butterworth band-pass (or high/low-pass) along axis 0, as XCP-D.

    ``low_hz`` is the high-pass edge, ``high_hz`` the low-pass edge; either may be
    ``None``.  Uses ``filtfilt`` with constant padding of length ``T - 1``.
    """
    y = np.asarray(data, dtype=float)
    nyquist = 0.5 / tr
    if high_hz is not None and high_hz >= nyquist:
        high_hz = None  # nothing to remove above Nyquist at this TR
    if low_hz is None and high_hz is None:
        return y.copy()
    if low_hz is not None and low_hz >= nyquist:
        raise ValueError(f"high-pass edge {low_hz} Hz is above Nyquist ({nyquist} Hz, TR={tr} s)")
    if low_hz is not None and high_hz is not None:
        b, a = signal.butter(order, [low_hz, high_hz], btype="bandpass", fs=1 / tr)
    elif low_hz is not None:
        b, a = signal.butter(order, low_hz, btype="highpass", fs=1 / tr)
    else:
        b, a = signal.butter(order, high_hz, btype="lowpass", fs=1 / tr)
    return signal.filtfilt(b, a, y, axis=0, padtype="constant", padlen=y.shape[0] - 1)


@dataclass
class DenoisedRun:
    """Result of :func:`denoise_run`.

    Attributes
    ----------
    data : ndarray (T_kept, N)
        Denoised, censored time series (NaN columns stay NaN).
    keep : ndarray (T - n_dummy,) of bool
        Which post-dummy volumes were kept.
    n_dummy : int
        Non-steady-state volumes dropped first.
    tr : float
    fd : ndarray (T - n_dummy,)
        Framewise displacement of the post-dummy volumes (for QC).
    confounds_used : list of str
    """

    data: np.ndarray
    keep: np.ndarray
    n_dummy: int
    tr: float
    fd: np.ndarray
    confounds_used: list[str]

    @property
    def n_censored(self) -> int:
        return int((~self.keep).sum())


def _dummy_count(confounds: pd.DataFrame) -> int:
    cols = [c for c in confounds.columns if c.startswith("non_steady_state_outlier")]
    if not cols:
        return 0
    flagged = confounds[cols].fillna(0).to_numpy().any(axis=1)
    return int(np.argmin(flagged)) if not flagged.all() else len(flagged)


def denoise_run(
    data: np.ndarray,
    confounds: pd.DataFrame,
    tr: float,
    strategy: Strategy,
    *,
    n_dummy: int | None = None,
) -> DenoisedRun:
    """Denoise one run (see the module docstring for the steps).

    Parameters
    ----------
    data : ndarray (T, N)
        Parcel (or voxel) time series of all volumes, including non-steady-state ones.
    confounds : DataFrame (T rows)
        fMRIPrep-style confounds (:func:`pipeline.confounds.build_confounds`); it needs
        ``framewise_displacement`` when the strategy censors.
    tr : float
        Repetition time in seconds.
    strategy : Strategy
    n_dummy : int, optional
        Initial volumes to drop; default: from the ``non_steady_state_outlier_XX`` columns.
    """
    y = np.asarray(data, dtype=float)
    if y.ndim == 1:
        y = y[:, None]
    if y.shape[0] != len(confounds):
        raise ValueError(f"data has {y.shape[0]} volumes but the confounds table {len(confounds)}")
    n_dummy = _dummy_count(confounds) if n_dummy is None else int(n_dummy)
    y = y[n_dummy:]
    table = confounds.iloc[n_dummy:].reset_index(drop=True)
    if "framewise_displacement" in table:
        fd = table["framewise_displacement"].to_numpy(float)
    elif strategy.fd_threshold is None:
        fd = np.full(len(table), np.nan)
    else:
        raise StrategyError(
            f"strategy {strategy.name} censors on FD but the confounds table has no "
            "'framewise_displacement' column"
        )
    keep = censor_mask(fd, strategy.fd_threshold, strategy.min_segment)
    columns = select_confounds(strategy, table)
    # n/a in first-row derivatives and FD mean "no previous volume": no change, so 0.
    X = table[columns].fillna(0.0).to_numpy(float)
    out = np.full_like(y, np.nan)
    valid = ~np.isnan(y).all(axis=0)
    if not np.isfinite(y[:, valid]).all():
        raise ValueError("time series contain NaN/inf outside all-NaN (dropped) columns")
    resid = regress_confounds(y[:, valid], X, keep)
    resid = interpolate_censored(resid, keep, tr)
    out[:, valid] = butterworth_filter(
        resid, tr, strategy.low_hz, strategy.high_hz, strategy.filter_order
    )
    return DenoisedRun(data=out[keep], keep=keep, n_dummy=n_dummy, tr=tr, fd=fd,
                       confounds_used=columns)


def concatenate_runs(runs: Sequence[DenoisedRun]) -> DenoisedRun:
    """Join separately denoised runs of a session (kept volumes in run order).

    Each run is already centred by its own regression and filtering, so the kept volumes
    are stacked as they are.  All runs must have the same TR and number of columns.
    """
    if not runs:
        raise ValueError("no runs to concatenate")
    trs = {r.tr for r in runs}
    if len(trs) > 1:
        raise ValueError(f"runs have different repetition times {sorted(trs)}; cannot join")
    widths = {r.data.shape[1] for r in runs}
    if len(widths) > 1:
        raise ValueError(f"runs have different numbers of parcels {sorted(widths)}")
    used = sorted({c for r in runs for c in r.confounds_used})
    return DenoisedRun(
        data=np.vstack([r.data for r in runs]),
        keep=np.concatenate([r.keep for r in runs]),
        n_dummy=sum(r.n_dummy for r in runs),
        tr=runs[0].tr,
        fd=np.concatenate([r.fd for r in runs]),
        confounds_used=used,
    )


# --------------------------------------------------------------------------- QC


def qc_summary(run: DenoisedRun, tsnr: float | None = None) -> dict[str, float | int | None]:
    """Motion and censoring QC of a (possibly concatenated) denoised run.

    ``mean_fd``/``max_fd`` are over post-dummy volumes (n/a first values ignored);
    ``remaining_minutes`` is kept volumes x TR.
    """
    fd = run.fd[np.isfinite(run.fd)]
    n = run.keep.size
    return {
        "mean_fd": float(fd.mean()) if fd.size else None,
        "max_fd": float(fd.max()) if fd.size else None,
        "n_volumes": int(n),
        "n_dummy": int(run.n_dummy),
        "n_censored": run.n_censored,
        "percent_censored": float(100.0 * run.n_censored / n) if n else 0.0,
        "remaining_minutes": float(run.keep.sum() * run.tr / 60.0),
        "tsnr_median": None if tsnr is None else float(tsnr),
    }


def check_min_minutes(
    remaining_minutes: float, min_minutes: float = DEFAULT_MIN_MINUTES
) -> tuple[bool, str | None]:
    """Flag a session with too little data left after censoring.

    Returns ``(ok, reason)``; ``reason`` is ``None`` when ok.
    """
    if remaining_minutes >= min_minutes:
        return True, None
    return False, (
        f"only {remaining_minutes:.2f} min of uncensored data remain, under the minimum of "
        f"{min_minutes:g} min (--min-minutes)"
    )
