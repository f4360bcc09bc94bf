"""Subject-level trajectories across ECT sessions: changes, retention, maintenance classes.

Input is a *long table* of per-session metrics, one row per subject x session x metric
(:data:`LONG_COLUMNS`; the metric key is :data:`KEY_COLUMNS`, as in the tidy tables of
:mod:`pipeline.metrics` and :mod:`pipeline.coupling` plus ``modality`` and ``atlas``).
An ``se`` column carries each value's within-session standard error (measurement noise:
block bootstrap or split-half of the time series for FC, streamline resampling for SC);
:func:`bootstrap_fc_se`, :func:`split_half_fc_se` and :func:`resample_se` compute them.

Definitions (``pre``, ``post``, ``m`` the values at the pre-ECT, post-ECT and a maintenance
session; SEs of different sessions are independent):

* acute change ``a = post - pre``; maintenance change ``d = m - post`` (one row per
  maintenance session, ``is_last`` marks the last one); ``Var(a) = se_pre^2 + se_post^2``,
  ``Var(d) = se_m^2 + se_post^2``, ``Cov(a, d) = -se_post^2`` (the shared post value).
* retention ``(m - pre) / a``: 1 = the acute change is kept, 0 = back at pre-ECT.  It is
  NaN when the acute change is not distinguishable from zero, i.e. ``|a| <= atol`` or
  ``|a| < z * SE(a)`` with ``z = Phi^-1(confidence)`` (1.645 by default), because a
  ratio over a noise-sized denominator is meaningless.
* maintenance class, from the ratio ``R = D / A`` of the *true* changes, whose posterior
  under a flat prior is ``(A, D) ~ N((a, d), Sigma)`` (the Gaussian sampling model above):
  regression toward pre-ECT if ``R < -fraction``, continued remodelling if ``R > fraction``,
  stabilisation otherwise (``fraction`` = 0.25 by default: a quarter of the acute change).
  The class probabilities are these three posterior probabilities, computed exactly
  (bivariate normal orthants through Owen's T function, no sampling), so they sum to 1 and
  are deterministic.  The call (``rule="map"``, default): the most probable class, which
  misclassifies least; ``class_confident`` marks calls whose probability is at least
  ``confidence`` (0.95).  ``rule="confident"`` is the conservative call: regression
  (continued remodelling) only when its probability is at least ``confidence``,
  stabilisation otherwise (so stabilisation also means "not shown to move").
  ``no_acute_change`` when ``|a| <= atol`` or ``|a| < z * SE(a)``, ``z = Phi^-1(confidence)``
  (1.645; the direction of "toward pre" is then unknown).  A missing SE counts as 0 (a
  point classification with 0/1 probabilities); ``se_missing`` says so.
* normalisation index (:func:`normalisation_index`): ``(value - control mean) / control SD``
  per metric, the control mean over all control sessions and the control SD pooled over
  control sessions (see the function).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri, owens_t

from pipeline import metrics

ROLES = ("pre", "post", "maintenance")
CLASSES = ("regression", "stabilisation", "continued_remodelling")
#: Maintenance-class decision rules of :func:`classify_maintenance`.
CLASS_RULES = ("map", "confident")
NO_ACUTE_CHANGE = "no_acute_change"
#: Columns that identify one metric (across sessions and subjects).
KEY_COLUMNS = ("modality", "atlas", "metric", "scope", "network", "network_b", "node")
#: Columns of the long table; only ``subject, session, role, metric, value`` are required.
LONG_COLUMNS = (
    "subject", "session", "role", "order", "time", "group", *KEY_COLUMNS, "value", "se",
    "qc_flag",
)
_REQUIRED = ("subject", "session", "role", "metric", "value")
_ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}
_FLAG_TRUE = {"1", "true", "yes", "y", "flagged", "fail", "failed", "exclude"}
_FLAG_FALSE = {"", "0", "false", "no", "n", "n/a", "nan", "none", "pass", "ok"}


class LongitudinalInputError(ValueError):
    """The long metric table is unusable; the message names it and says what to do."""


# --------------------------------------------------------------------------- input


def _flags(values: pd.Series, source: str) -> pd.Series:
    if values.dtype == bool:
        return values
    if pd.api.types.is_numeric_dtype(values):
        return values.fillna(0).astype(float) != 0
    text = values.astype(str).str.strip().str.lower()
    bad = sorted(set(text) - _FLAG_TRUE - _FLAG_FALSE)
    if bad:
        raise LongitudinalInputError(
            f"{source}: qc_flag values {bad[:5]} are not understood; use 1/0 (or yes/no)."
        )
    return text.isin(_FLAG_TRUE)


def days_since_first(acq_time: pd.Series, subject: pd.Series) -> pd.Series:
    """Days since each subject's first session, from ISO ``acq_time`` strings (NaN if unknown)."""
    stamps = pd.to_datetime(acq_time, errors="coerce", format="ISO8601")
    first = stamps.groupby(subject).transform("min")
    return (stamps - first).dt.total_seconds() / 86400.0


def prepare_long_table(table: pd.DataFrame, source: str = "metric table") -> pd.DataFrame:
    """Check a long metric table and fill the optional columns.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per subject x session x metric; columns :data:`LONG_COLUMNS`, of which
        ``subject, session, role, metric, value`` are required.  Missing key columns become
        "", a missing ``se`` NaN, a missing ``qc_flag`` False, a missing ``time`` is derived
        from ``acq_time`` when present (days since the subject's first session), a missing
        ``order`` from role then time.
    source : str
        Named in error messages (e.g. the file the table came from).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`LONG_COLUMNS` (plus any others given), ``qc_flag`` boolean, sorted by
        subject, order and metric key.

    Raises
    ------
    LongitudinalInputError
        Missing columns, unknown roles, duplicated rows or a subject with two pre-ECT (or
        two post-ECT) sessions.
    """
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise LongitudinalInputError(
            f"{source}: missing column(s) {missing}; the long metric table needs "
            f"{list(_REQUIRED)} (optional: {[c for c in LONG_COLUMNS if c not in _REQUIRED]})."
        )
    out = table.copy()
    for column in ("subject", "session", "role"):
        out[column] = out[column].astype(str)
    for column in (*KEY_COLUMNS, "group"):
        out[column] = out[column].fillna("").astype(str) if column in out else ""
    out["role"] = out["role"].str.lower()
    unknown = sorted(set(out["role"]) - set(ROLES))
    if unknown:
        raise LongitudinalInputError(
            f"{source}: unknown role(s) {unknown}; roles must be among {list(ROLES)} "
            "(set them with --session-roles or the ect_phase column of sessions.tsv)."
        )
    out["value"] = pd.to_numeric(out["value"], errors="coerce")
    out["se"] = pd.to_numeric(out["se"], errors="coerce") if "se" in out else np.nan
    if (out["se"] < 0).any():
        raise LongitudinalInputError(f"{source}: negative standard errors in column 'se'.")
    out["qc_flag"] = _flags(out["qc_flag"], source) if "qc_flag" in out else False
    if "time" not in out:
        out["time"] = (days_since_first(out["acq_time"], out["subject"])
                       if "acq_time" in out else np.nan)
    out["time"] = pd.to_numeric(out["time"], errors="coerce")
    if "order" not in out:
        sessions = out[["subject", "session", "role", "time"]].drop_duplicates(["subject",
                                                                               "session"])
        sessions = sessions.assign(rank=sessions["role"].map(_ROLE_RANK))
        sessions = sessions.sort_values(["subject", "rank", "time", "session"])
        sessions["order"] = sessions.groupby("subject").cumcount() + 1
        out = out.merge(sessions[["subject", "session", "order"]], on=["subject", "session"])
    dup = out.duplicated(["subject", "session", *KEY_COLUMNS])
    if dup.any():
        row = out.loc[dup].iloc[0]
        raise LongitudinalInputError(
            f"{source}: {int(dup.sum())} duplicated rows, e.g. sub-{row['subject']} "
            f"ses-{row['session']} metric {row['metric']!r}; each subject x session x metric "
            "key must appear once."
        )
    roles = out[["subject", "session", "role"]].drop_duplicates()
    twice = roles[roles["role"] != "maintenance"].duplicated(["subject", "role"], keep=False)
    if twice.any():
        bad = roles[roles["role"] != "maintenance"][twice].iloc[0]
        raise LongitudinalInputError(
            f"{source}: sub-{bad['subject']} has more than one {bad['role']!r} session; only "
            "maintenance may repeat. Fix the session roles."
        )
    columns = [*LONG_COLUMNS, *[c for c in out.columns if c not in LONG_COLUMNS]]
    return out[columns].sort_values(["subject", "order", *KEY_COLUMNS],
                                    ignore_index=True)


# --------------------------------------------------------------------------- trajectories

_SUBJECT_KEY = ["subject", *KEY_COLUMNS]


def _at_role(long: pd.DataFrame, role: str, suffix: str) -> pd.DataFrame:
    part = long.loc[long["role"] == role, [*_SUBJECT_KEY, "session", "value", "se", "qc_flag"]]
    return part.rename(columns={c: f"{c}_{suffix}" for c in ("session", "value", "se",
                                                             "qc_flag")})


def trajectory_table(long: pd.DataFrame) -> pd.DataFrame:
    """Every metric at every session with its role, time and change from pre/post-ECT.

    Parameters
    ----------
    long : pandas.DataFrame
        A table accepted by :func:`prepare_long_table` (prepared here).

    Returns
    -------
    pandas.DataFrame
        One row per subject x metric x session; columns :data:`TRAJECTORY_SIDECAR`.
    """
    long = prepare_long_table(long)
    out = long.merge(_at_role(long, "pre", "pre")[[*_SUBJECT_KEY, "value_pre"]],
                     on=_SUBJECT_KEY, how="left")
    out = out.merge(_at_role(long, "post", "post")[[*_SUBJECT_KEY, "value_post"]],
                    on=_SUBJECT_KEY, how="left")
    out["change_from_pre"] = out["value"] - out.pop("value_pre")
    out["change_from_post"] = out["value"] - out.pop("value_post")
    return out[list(TRAJECTORY_SIDECAR)]


def _phi2(h: np.ndarray, k: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Standard bivariate normal CDF ``P(X < h, Y < k)`` with correlation ``rho`` (Owen 1956)."""
    h, k, rho = np.broadcast_arrays(*(np.asarray(x, float) for x in (h, k, rho)))
    out = np.empty(h.shape)
    hi, lo = rho >= 1 - 1e-12, rho <= -1 + 1e-12
    out[hi] = ndtr(np.minimum(h[hi], k[hi]))
    out[lo] = np.maximum(0.0, ndtr(h[lo]) + ndtr(k[lo]) - 1.0)
    mid = ~(hi | lo)
    # equal tiny values for exact zeros keep the formula on its continuous branch
    hm = np.where(h[mid] == 0, 1e-150, h[mid])
    km = np.where(k[mid] == 0, 1e-150, k[mid])
    r = rho[mid]
    s = np.sqrt(1 - r * r)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        beta = np.where(hm * km > 0, 0.0, 0.5)
        out[mid] = (0.5 * ndtr(hm) + 0.5 * ndtr(km) - owens_t(hm, (km - r * hm) / (hm * s))
                    - owens_t(km, (hm - r * km) / (km * s)) - beta)
    return np.clip(out, 0.0, 1.0)


def _positive_orthant(mx, my, vx, vy, cxy) -> np.ndarray:
    """``P(X > 0, Y > 0)`` for a bivariate normal; zero variances are handled exactly."""
    mx, my, vx, vy, cxy = np.broadcast_arrays(*(np.asarray(x, float)
                                                for x in (mx, my, vx, vy, cxy)))
    sx, sy = np.sqrt(vx), np.sqrt(vy)
    with np.errstate(divide="ignore", invalid="ignore"):
        px = np.where(sx > 0, ndtr(mx / sx), (mx > 0).astype(float))
        py = np.where(sy > 0, ndtr(my / sy), (my > 0).astype(float))
        both = (sx > 0) & (sy > 0)
        rho = np.clip(np.where(both, cxy / (sx * sy), 0.0), -1, 1)
        joint = _phi2(np.where(both, mx / sx, 0), np.where(both, my / sy, 0), rho)
    return np.where(both, joint, px * py)


def _prob_ratio_below(c: float, a, d, va, vd, cad) -> np.ndarray:
    """``P(D / A < c)`` for ``(A, D) ~ N((a, d), [[va, cad], [cad, vd]])``."""
    mw, vw, cwa = d - c * a, vd + c * c * va - 2 * c * cad, cad - c * va
    # D - cA < 0 with A > 0, or D - cA > 0 with A < 0
    return (_positive_orthant(-mw, a, vw, va, -cwa) + _positive_orthant(mw, -a, vw, va, -cwa))


def classify_maintenance(
    acute: np.ndarray,
    maintenance_change: np.ndarray,
    var_acute: np.ndarray | float = 0.0,
    var_maintenance: np.ndarray | float = 0.0,
    cov: np.ndarray | float = 0.0,
    *,
    fraction: float = 0.25,
    confidence: float = 0.95,
    atol: float = 1e-12,
    rule: str = "map",
) -> pd.DataFrame:
    """Maintenance class and class probabilities from the acute and maintenance changes.

    Decision rule (see the module docstring): with ``R = D / A`` the true ratio of the
    maintenance to the acute change and ``(A, D) ~ N((a, d), Sigma)``,
    ``p_regression = P(R < -fraction)``, ``p_continued_remodelling = P(R > fraction)``,
    ``p_stabilisation`` the rest.  The class is the most probable one (``rule="map"``) or,
    with ``rule="confident"``, regression or continued remodelling when its probability is
    ``>= confidence`` and stabilisation otherwise; ``no_acute_change`` (probabilities still
    given) when ``|a| <= atol`` or ``|a| < z SE(a)``, ``z = Phi^-1(confidence)``.

    Parameters
    ----------
    acute, maintenance_change : array_like
        Observed ``a = post - pre`` and ``d = maintenance - post``.
    var_acute, var_maintenance, cov : array_like
        Sampling variances of ``a`` and ``d`` and their covariance (``-se_post^2`` when
        the sessions' errors are independent).  NaN counts as 0.
    fraction : float, default=0.25
        Share of the acute change a maintenance change must exceed to leave stabilisation.
    confidence : float, default=0.95
        Posterior probability that makes a call ``class_confident`` (and, with
        ``rule="confident"``, the one needed to call regression or continued remodelling).
    atol : float, default=1e-12
        Acute changes this small are zero.
    rule : {"map", "confident"}, default="map"
        Most probable class, or the conservative call described above.

    Returns
    -------
    pandas.DataFrame
        Columns ``p_regression, p_stabilisation, p_continued_remodelling, maintenance_class,
        class_probability, class_confident`` (NaN probabilities when ``a`` and ``d`` are
        NaN, or ``a`` is 0 without noise).
    """
    if not (fraction > 0 and 0.5 < confidence < 1):
        raise ValueError("fraction must be > 0 and confidence in (0.5, 1).")
    if rule not in CLASS_RULES:
        raise ValueError(f"rule {rule!r}: choose from {CLASS_RULES}")
    a, d = (np.asarray(x, float) for x in (acute, maintenance_change))
    va, vd, cad = (np.nan_to_num(np.broadcast_to(np.asarray(x, float), a.shape))
                   for x in (var_acute, var_maintenance, cov))
    p_reg = _prob_ratio_below(-fraction, a, d, va, vd, cad)
    p_cont = 1.0 - _prob_ratio_below(fraction, a, d, va, vd, cad)
    p_stab = np.clip(1.0 - p_reg - p_cont, 0.0, 1.0)
    z = float(ndtri(confidence))
    flat = np.abs(a) <= atol
    no_acute = flat | (np.abs(a) < z * np.sqrt(va))
    undefined = np.isnan(a) | np.isnan(d) | (flat & (va == 0))
    if rule == "map":
        # ties (e.g. a noiseless ratio exactly on a boundary) go to stabilisation
        stacked = np.stack([p_stab, p_reg, p_cont], axis=1)
        best = np.argmax(np.nan_to_num(stacked, nan=-1.0), axis=1)
        klass = np.array(["stabilisation", "regression", "continued_remodelling"])[best]
    else:
        klass = np.where(p_reg >= confidence, "regression",
                         np.where(p_cont >= confidence, "continued_remodelling",
                                  "stabilisation"))
    klass = np.where(no_acute, NO_ACUTE_CHANGE, klass).astype(object)
    probs = np.stack([p_reg, p_stab, p_cont], axis=1)
    probs[undefined] = np.nan
    klass[np.isnan(a) | np.isnan(d)] = ""
    chosen = {c: i for i, c in enumerate(CLASSES)}
    class_p = np.array([probs[i, chosen[c]] if c in chosen else np.nan
                        for i, c in enumerate(klass)])
    return pd.DataFrame({
        "p_regression": probs[:, 0], "p_stabilisation": probs[:, 1],
        "p_continued_remodelling": probs[:, 2], "maintenance_class": klass,
        "class_probability": class_p, "class_confident": class_p >= confidence,
    })


def change_table(
    long: pd.DataFrame, *, fraction: float = 0.25, confidence: float = 0.95,
    atol: float = 1e-12, rule: str = "map",
) -> pd.DataFrame:
    """Acute and maintenance changes, retention and maintenance class per subject x metric.

    Parameters
    ----------
    long : pandas.DataFrame
        A table accepted by :func:`prepare_long_table`.
    fraction, confidence, atol, rule
        As in :func:`classify_maintenance` (``confidence`` also sets the retention rule).

    Returns
    -------
    pandas.DataFrame
        One row per subject x metric x maintenance session (one row with empty
        ``session_maintenance`` when the subject has none); subjects without both a pre-
        and a post-ECT value of a metric are left out.  Columns :data:`CHANGES_SIDECAR`;
        ``qc_flag`` is true when any session used is flagged.
    """
    long = prepare_long_table(long)
    pre, post = _at_role(long, "pre", "pre"), _at_role(long, "post", "post")
    maint = _maintenance_rows(long)
    groups = long[["subject", "group"]].drop_duplicates("subject")
    out = pre.merge(post, on=_SUBJECT_KEY).merge(maint, on=_SUBJECT_KEY, how="left")
    out = groups.merge(out, on="subject")
    out["session_maintenance"] = out["session_maintenance"].fillna("")
    out["qc_flag"] = (out.pop("qc_flag_pre").astype(bool) | out.pop("qc_flag_post").astype(bool)
                      | out.pop("qc_flag_maintenance").fillna(False).astype(bool))
    se_pre, se_post, se_m = (out[f"se_{r}"] for r in ("pre", "post", "maintenance"))
    out["se_missing"] = se_pre.isna() | se_post.isna() | (
        se_m.isna() & (out["session_maintenance"] != ""))
    vp, vq, vm = (s.fillna(0.0) ** 2 for s in (se_pre, se_post, se_m))
    out["acute_change"] = out["value_post"] - out["value_pre"]
    out["se_acute"] = np.sqrt(vp + vq)
    out["maintenance_change"] = out["value_maintenance"] - out["value_post"]
    out["se_maintenance_change"] = np.sqrt(vm + vq).where(out["session_maintenance"] != "")
    z = float(ndtri(confidence))
    a = out["acute_change"]
    clear = (a.abs() > atol) & (a.abs() >= z * out["se_acute"])
    out["retention"] = ((out["value_maintenance"] - out["value_pre"]) / a).where(clear)
    classes = classify_maintenance(a, out["maintenance_change"], vp + vq, vm + vq, -vq,
                                   fraction=fraction, confidence=confidence, atol=atol,
                                   rule=rule)
    out = pd.concat([out.reset_index(drop=True), classes], axis=1)
    # without standard errors the class is a point-estimate call: no probability to claim
    probability_columns = ["p_regression", "p_stabilisation", "p_continued_remodelling",
                           "class_probability"]
    out.loc[out["se_missing"], probability_columns] = np.nan
    out.loc[out["se_missing"], "class_confident"] = False
    return out[list(CHANGES_SIDECAR)].sort_values(
        ["subject", *KEY_COLUMNS, "order_maintenance"], ignore_index=True, na_position="first")


def _maintenance_rows(long: pd.DataFrame) -> pd.DataFrame:
    part = long.loc[long["role"] == "maintenance",
                    [*_SUBJECT_KEY, "session", "order", "time", "value", "se", "qc_flag"]]
    part = part.rename(columns={c: f"{c}_maintenance" for c in
                                ("session", "order", "time", "value", "se", "qc_flag")})
    last = part.groupby(_SUBJECT_KEY, sort=False)["order_maintenance"].transform("max")
    return part.assign(is_last=part["order_maintenance"] == last)


# --------------------------------------------------------------------------- normalisation


def normalisation_index(long: pd.DataFrame, *, include_flagged: bool = False) -> pd.DataFrame:
    """Distance of every patient session to the controls, in control-SD units, per metric.

    The control mean is the mean over all control sessions; the control SD is the
    between-subject SD pooled over control sessions,
    ``sqrt(sum_s (n_s - 1) var_s / sum_s (n_s - 1))`` with ``var_s`` the variance (ddof 1)
    of the ``n_s`` controls at session role ``s``: it measures how much people differ at one
    time point, without mixing in any session-to-session drift of the controls.  NaN when
    fewer than two controls share a session role (``control_df`` = 0).  Controls are
    assumed unchanged over sessions, so every role is compared with the same reference.

    Parameters
    ----------
    long : pandas.DataFrame
        A table accepted by :func:`prepare_long_table`, with ``group`` (``patient``,
        ``control``).
    include_flagged : bool, default=False
        Use QC-flagged control sessions in the reference (patient rows keep their flag).

    Returns
    -------
    pandas.DataFrame
        Patient rows with columns :data:`NORMALISATION_SIDECAR`; empty when there are no
        controls.
    """
    long = prepare_long_table(long)
    controls = long[(long["group"] == "control") & (include_flagged | ~long["qc_flag"])]
    grouped = controls.groupby([*KEY_COLUMNS, "role"], sort=False)["value"]
    per_role = pd.DataFrame({"n": grouped.count(), "var": grouped.var(ddof=1)}).reset_index()
    per_role["ss"] = (per_role["n"] - 1).clip(lower=0) * per_role["var"].fillna(0.0)
    per_role["df"] = (per_role["n"] - 1).clip(lower=0)
    ref = per_role.groupby(list(KEY_COLUMNS), sort=False)[["ss", "df"]].sum()
    stats = controls.groupby(list(KEY_COLUMNS), sort=False).agg(
        control_mean=("value", "mean"), n_controls=("subject", "nunique"))
    ref = stats.join(ref)
    ref["control_sd"] = np.sqrt(ref["ss"] / ref["df"].where(ref["df"] > 0))
    ref = ref.rename(columns={"df": "control_df"}).drop(columns="ss").reset_index()
    patients = long[long["group"] == "patient"]
    out = patients.merge(ref, on=list(KEY_COLUMNS), how="inner")
    out["control_df"] = out["control_df"].astype(int)
    out["z"] = (out["value"] - out["control_mean"]) / out["control_sd"]
    return out[list(NORMALISATION_SIDECAR)].reset_index(drop=True)


# --------------------------------------------------------------------------- measurement SE


def resample_se(values_from_resamples: np.ndarray | Sequence[float], axis: int = 0) -> np.ndarray:
    """Standard error of an estimate from its values over resamples (bootstrap, streamlines).

    The SD (ddof 1) of the finite resample values along ``axis``; NaN where fewer than two
    are finite.
    """
    x = np.asarray(values_from_resamples, float)
    n = np.isfinite(x).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"), np.testing.suppress_warnings() as sup:
        sup.filter(RuntimeWarning)
        sd = np.nanstd(x, axis=axis, ddof=1)
    return np.where(n >= 2, sd, np.nan)


def _network_fc(timeseries: np.ndarray, networks: np.ndarray) -> np.ndarray:
    """Network-mean FC in the row order of :func:`pipeline.metrics.network_connectivity`."""
    with np.errstate(invalid="ignore", divide="ignore"):
        fc = np.corrcoef(timeseries, rowvar=False)
    if np.isnan(fc).any():  # flat parcels: the NaN-aware reference implementation
        return metrics.network_connectivity(fc, networks)["value"].to_numpy()
    # block sums through one-hot membership (fast: this runs once per bootstrap replicate)
    names = sorted(set(networks.tolist()))
    onehot = (networks[:, None] == np.array(names)[None, :]).astype(float)
    sums = onehot.T @ fc @ onehot
    n = onehot.sum(0)
    iu = np.triu_indices(len(names))
    within = iu[0] == iu[1]
    counts = np.where(within, n[iu[0]] * (n[iu[0]] - 1), n[iu[0]] * n[iu[1]])
    diag = onehot.T @ np.diag(fc)
    block = np.where(within, sums[iu] - diag[iu[0]], sums[iu])  # self-connections excluded
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, block / counts, np.nan)


def _fc_frame(networks: np.ndarray, value: np.ndarray, se: np.ndarray, n: int) -> pd.DataFrame:
    pairs = metrics.network_connectivity(np.eye(len(networks)), networks)
    return pd.DataFrame({"metric": "connectivity", "scope": "network_pair",
                         "network": pairs["network_a"], "network_b": pairs["network_b"],
                         "node": "", "value": value, "se": se, "n_resamples": n})


def _check_timeseries(timeseries: np.ndarray, networks: Sequence[str]) -> tuple[np.ndarray,
                                                                                   np.ndarray]:
    ts = np.asarray(timeseries, float)
    labels = np.asarray(networks).astype(str)
    if ts.ndim != 2 or labels.shape != (ts.shape[1],):
        raise ValueError(
            f"timeseries must be (time, parcels) with one network label per parcel; got "
            f"shape {ts.shape} and {labels.size} labels."
        )
    if ts.shape[0] < 4:
        raise ValueError(f"timeseries has {ts.shape[0]} time points; at least 4 are needed.")
    return ts, labels


def bootstrap_fc_se(
    timeseries: np.ndarray,
    networks: Sequence[str],
    n_boot: int = 200,
    block_length: int | None = None,
    seed: int = 0,
    metric_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> pd.DataFrame:
    """SE of network-level FC by a moving-block bootstrap of the parcel time series.

    Each replicate concatenates ``ceil(T / L)`` blocks of ``L`` consecutive volumes with
    uniformly drawn starts (truncated to ``T``), which keeps the autocorrelation of the BOLD
    signal within blocks; the SE is the SD of the replicate values (:func:`resample_se`).

    Parameters
    ----------
    timeseries : (T, P) array
        Denoised parcel time series (censored volumes removed).
    networks : (P,) sequence of str
        Network of each parcel.
    n_boot : int, default=200
    block_length : int, optional
        ``L``; default ``ceil(sqrt(T))`` (e.g. 15 volumes for T = 200).
    seed : int, default=0
    metric_fn : callable, optional
        ``(T, P) array -> 1-D array`` of metrics; default: the within/between network mean
        FC of :func:`pipeline.metrics.network_connectivity` (then the output is tidy).

    Returns
    -------
    pandas.DataFrame
        With the default ``metric_fn``: columns ``metric, scope, network, network_b, node,
        value, se, n_resamples`` matching the ``connectivity`` rows of
        :func:`pipeline.metrics.network_metrics`; otherwise ``value, se, n_resamples``.
    """
    ts, labels = _check_timeseries(timeseries, networks)
    n_t = ts.shape[0]
    length = int(np.ceil(np.sqrt(n_t))) if block_length is None else int(block_length)
    if not 1 <= length <= n_t or n_boot < 2:
        raise ValueError(f"block_length must be in [1, {n_t}] and n_boot >= 2.")
    func = metric_fn or (lambda x: _network_fc(x, labels))
    rng = np.random.default_rng(seed)
    n_blocks = int(np.ceil(n_t / length))
    reps = []
    for _ in range(n_boot):
        starts = rng.integers(0, n_t - length + 1, n_blocks)
        idx = (starts[:, None] + np.arange(length)).ravel()[:n_t]
        reps.append(func(ts[idx]))
    value, se = func(ts), resample_se(np.array(reps))
    if metric_fn is not None:
        return pd.DataFrame({"value": value, "se": se, "n_resamples": n_boot})
    return _fc_frame(labels, value, se, n_boot)


def split_half_fc_se(
    timeseries: np.ndarray,
    networks: Sequence[str],
    metric_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> pd.DataFrame:
    """SE of network-level FC from the two contiguous halves of the time series.

    A half has twice the sampling variance of the whole, so ``(m1 - m2)^2 / 4`` is an
    unbiased (1-degree-of-freedom) estimate of the whole-run variance and
    ``SE = |m1 - m2| / 2``.  Cheap but noisy; prefer :func:`bootstrap_fc_se`.

    Parameters and returns as :func:`bootstrap_fc_se` (``n_resamples`` = 2).
    """
    ts, labels = _check_timeseries(timeseries, networks)
    func = metric_fn or (lambda x: _network_fc(x, labels))
    half = ts.shape[0] // 2
    m1, m2 = func(ts[:half]), func(ts[half:2 * half])
    value, se = func(ts), np.abs(m1 - m2) / 2
    if metric_fn is not None:
        return pd.DataFrame({"value": value, "se": se, "n_resamples": 2})
    return _fc_frame(labels, value, se, 2)


# --------------------------------------------------------------------------- sidecars

_KEY_DOC = {
    "subject": "Subject label (no 'sub-' prefix).",
    "group": "Group from participants.tsv (patient, control).",
    "modality": "fc, sc, anat or coupling.",
    "atlas": "Atlas label.",
    "metric": "Metric name (see the participant-level metric tables).",
    "scope": "global, network, network_pair, anchor_network or node.",
    "network": "Network (or anchor label); '' when not applicable.",
    "network_b": "Second network of a pair; '' when not applicable.",
    "node": "Parcel name for node-level metrics; '' otherwise.",
}

#: Column descriptions of :func:`trajectory_table` (the order is the table's).
TRAJECTORY_SIDECAR: dict[str, dict[str, str]] = {
    **{c: {"Description": _KEY_DOC[c]} for c in ("subject", "group", *KEY_COLUMNS)},
    "session": {"Description": "Session label (no 'ses-' prefix)."},
    "role": {"Description": "ECT role of the session: pre, post or maintenance."},
    "order": {"Description": "1-based position of the session in the subject's timeline."},
    "time": {"Description": "Time since the subject's first session.", "Units": "day"},
    "value": {"Description": "Metric value at this session."},
    "se": {"Description": "Within-session standard error of the value (measurement noise)."},
    "qc_flag": {"Description": "True when the session failed quality control."},
    "change_from_pre": {"Description": "value - value at the pre-ECT session."},
    "change_from_post": {"Description": "value - value at the post-ECT session."},
}

#: Column descriptions of :func:`change_table`.
CHANGES_SIDECAR: dict[str, dict[str, str]] = {
    **{c: {"Description": _KEY_DOC[c]} for c in ("subject", "group", *KEY_COLUMNS)},
    "session_pre": {"Description": "Pre-ECT session label."},
    "session_post": {"Description": "Post-ECT session label."},
    "session_maintenance": {"Description": "Maintenance session label ('' if none)."},
    "order_maintenance": {"Description": "Position of the maintenance session in the timeline."},
    "time_maintenance": {"Description": "Time of the maintenance session since the first "
                                        "session.", "Units": "day"},
    "is_last": {"Description": "True for the subject's last maintenance session."},
    "value_pre": {"Description": "Value at pre-ECT."},
    "value_post": {"Description": "Value at post-ECT."},
    "value_maintenance": {"Description": "Value at this maintenance session."},
    "se_pre": {"Description": "Standard error at pre-ECT."},
    "se_post": {"Description": "Standard error at post-ECT."},
    "se_maintenance": {"Description": "Standard error at this maintenance session."},
    "se_missing": {"Description": "True when a standard error was unknown (e.g. consensus "
                   "modularity, label-count volumes): the class is then called from the "
                   "point estimates and the probabilities are n/a."},
    "acute_change": {"Description": "a = post - pre."},
    "se_acute": {"Description": "sqrt(se_pre^2 + se_post^2)."},
    "maintenance_change": {"Description": "d = maintenance - post."},
    "se_maintenance_change": {"Description": "sqrt(se_maintenance^2 + se_post^2)."},
    "retention": {"Description": "(maintenance - pre) / (post - pre): 1 = acute change kept, "
                                 "0 = back at pre-ECT; n/a when |a| < z * se_acute "
                                 "(z = Phi^-1(confidence), 1.645 by default) or a = 0."},
    "p_regression": {"Description": "Posterior P(D/A < -fraction) under (A, D) ~ N((a, d), "
                                    "Sigma); fraction = 0.25 by default."},
    "p_stabilisation": {"Description": "Posterior P(|D/A| <= fraction)."},
    "p_continued_remodelling": {"Description": "Posterior P(D/A > fraction)."},
    "maintenance_class": {
        "Description": "The most probable of regression / stabilisation / "
                       "continued_remodelling (see class_confident for how sure); "
                       "no_acute_change when |a| < z * se_acute; '' without a maintenance "
                       "session.",
        "Levels": {"regression": "moves back toward pre-ECT by more than a quarter of the "
                                 "acute change",
                   "stabilisation": "stays within a quarter of the acute change",
                   "continued_remodelling": "moves further in the acute direction by more "
                                            "than a quarter of the acute change",
                   NO_ACUTE_CHANGE: "acute change within noise: class undefined"}},
    "class_probability": {"Description": "Probability of the called class."},
    "class_confident": {"Description": "True when class_probability >= confidence (0.95 by "
                                       "default): the call is beyond measurement noise."},
    "qc_flag": {"Description": "True when any session used failed quality control."},
}

#: Column descriptions of :func:`normalisation_index`.
NORMALISATION_SIDECAR: dict[str, dict[str, str]] = {
    **{c: {"Description": _KEY_DOC[c]} for c in ("subject", "group", *KEY_COLUMNS)},
    "session": TRAJECTORY_SIDECAR["session"],
    "role": TRAJECTORY_SIDECAR["role"],
    "time": TRAJECTORY_SIDECAR["time"],
    "value": TRAJECTORY_SIDECAR["value"],
    "qc_flag": TRAJECTORY_SIDECAR["qc_flag"],
    "control_mean": {"Description": "Mean over all (QC-passed) control sessions."},
    "control_sd": {"Description": "Between-control SD pooled over control session roles."},
    "control_df": {"Description": "Degrees of freedom of control_sd."},
    "n_controls": {"Description": "Number of control subjects in the reference."},
    "z": {"Description": "(value - control_mean) / control_sd: distance to the controls."},
}

#: Proposed file names (relative to the output folder) of the subject-level tables.
SUBJECT_OUTPUTS = {
    "trajectories": "sub-{subject}/sub-{subject}_desc-trajectories_metrics.tsv",
    "changes": "sub-{subject}/sub-{subject}_desc-changes_metrics.tsv",
    "normalisation": "sub-{subject}/sub-{subject}_desc-normalisation_metrics.tsv",
}
