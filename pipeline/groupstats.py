"""Group level: cohort metric table, mixed-effects role models with FDR, maintenance classes.

Design (per metric, i.e. per :data:`pipeline.longitudinal.KEY_COLUMNS` key):

* **patients**: ``value ~ C(role) + (1 | subject)`` (statsmodels ``MixedLM``, REML, pre-ECT
  the reference level), reported as three contrasts: ``post_vs_pre``,
  ``maintenance_vs_post`` and ``maintenance_vs_pre`` (several maintenance sessions of a
  subject share the ``maintenance`` level).  Tests: ``t = estimate / SE`` against Student's t
  with the between-within degrees of freedom ``n_obs - n_subjects - (n_roles - 1)`` (all
  contrasts are within subject), not the asymptotic z of statsmodels, which is too liberal
  with tens of subjects.  For a balanced design this is exactly the repeated-measures
  ANOVA contrast test (with two sessions: the paired t-test).
* **controls**: the same model fitted separately, to show that nothing changes without ECT.
* **patient_minus_control**: the group x role interaction as the difference of the two
  groups' contrasts, ``SE = sqrt(SE_p^2 + SE_c^2)`` (independent samples), Welch-
  Satterthwaite degrees of freedom.  Fitting the
  groups separately lets their residual and subject variances differ, which a single
  pooled interaction model would not.
* FDR: Benjamini-Hochberg (:func:`fdr_bh`) across metrics within each model x contrast
  family (``fdr_by``).
* QC: sessions with ``qc_flag`` are left out by default and listed (:func:`split_flagged`).
* Robustness: every fit records its warnings (e.g. ``ConvergenceWarning``), whether the
  subject variance sits at 0 (``singular``) and, when a metric cannot be modelled, why
  (``skipped``: too few subjects, constant values, no pre-ECT sessions, fit error).
* Node-level metrics are not modelled by default (``scopes``): with a 300-parcel atlas they
  are thousands of exploratory tests; pass ``scopes=None`` to model everything.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import stdtr

from pipeline import longitudinal
from pipeline.longitudinal import KEY_COLUMNS

#: Contrasts of the role model: name -> (role, minus role).
CONTRASTS = {
    "post_vs_pre": ("post", "pre"),
    "maintenance_vs_post": ("maintenance", "post"),
    "maintenance_vs_pre": ("maintenance", "pre"),
}
MODELS = ("patient", "control", "patient_minus_control")
#: Scopes modelled by default: those followed across sessions (structure = hippocampus,
#: amygdala, TICV, tissues) and metrics without a scope.
DEFAULT_SCOPES = ("global", "network", "network_pair", "anchor_network", "structure", "")
#: Relative size of the subject variance (vs. the residual one) below which a fit is singular.
SINGULAR_TOL = 1e-6


class GroupStatsError(ValueError):
    """The group inputs are unusable; the message names the input and says what to do."""


# --------------------------------------------------------------------------- tables


def read_metric_table(path: str | Path) -> pd.DataFrame:
    """Read one participant-level long metric TSV, checked by
    :func:`pipeline.longitudinal.prepare_long_table` (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise GroupStatsError(f"{path}: metric table not found; run the participant level.")
    table = pd.read_csv(path, sep="\t", dtype={"subject": str, "session": str, "node": str,
                                               "network": str, "network_b": str},
                        na_values=["n/a"], keep_default_na=False)
    return longitudinal.prepare_long_table(table, source=str(path))


def collect_long_tables(tables: Iterable[pd.DataFrame | str | Path]) -> pd.DataFrame:
    """One tidy cohort table of every metric from participant-level tables (or TSV paths).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`pipeline.longitudinal.LONG_COLUMNS`, sorted by subject, session
        order and metric key (see :data:`METRICS_SIDECAR`).
    """
    frames = [read_metric_table(t) if isinstance(t, (str, Path)) else t for t in tables]
    if not frames:
        raise GroupStatsError("no participant-level metric tables to gather; run the "
                              "participant level first.")
    return longitudinal.prepare_long_table(pd.concat(frames, ignore_index=True),
                                           source="cohort metric table")


def split_flagged(long: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off QC-flagged rows; return the kept rows and one row per affected session.

    Flags are per row: a failed BOLD QC flags only that atlas' FC and coupling rows
    (:func:`pipeline.group.collect_session_metrics`), so the session's structural and
    anatomical metrics still count.
    """
    long = longitudinal.prepare_long_table(long)
    flagged = long["qc_flag"].astype(bool)
    excluded = (long[flagged].groupby(["subject", "session", "role", "group"], sort=True)
                .size().rename("n_rows").reset_index())
    excluded["reason"] = "qc_flag"
    return long[~flagged].reset_index(drop=True), excluded


# --------------------------------------------------------------------------- FDR


def fdr_bh(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values); NaN p-values stay NaN and do not count.

    ``q_(i) = min_{j >= i} min(1, m p_(j) / j)`` over the ``m`` finite p-values sorted
    ascending.
    """
    p = np.asarray(pvalues, float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return q
    if ((p[ok] < 0) | (p[ok] > 1)).any():
        raise ValueError("p-values must lie in [0, 1].")
    order = np.argsort(p[ok], kind="mergesort")
    ranked = p[ok][order] * m / np.arange(1, m + 1)
    adjusted = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    out = np.empty(m)
    out[order] = adjusted
    q[ok] = out
    return q


# --------------------------------------------------------------------------- models


def _empty_fit(reason: str, n_subjects: int, n_obs: int) -> dict:
    return {"n_subjects": n_subjects, "n_obs": n_obs, "df": np.nan, "subject_var": np.nan,
            "residual_var": np.nan, "converged": False, "singular": False, "warnings": "",
            "skipped": reason, "contrasts": {}}


def fit_role_model(data: pd.DataFrame, *, min_subjects: int = 3) -> dict:
    """Fit ``value ~ C(role) + (1 | subject)`` by REML and return the role contrasts.

    Parameters
    ----------
    data : pandas.DataFrame
        Columns ``subject, role, value`` (one metric, one group); NaN values are dropped.
    min_subjects : int, default=3
        Fewest subjects with a pre-ECT value; a role level seen in fewer subjects is dropped
        (its contrasts are NaN).

    Returns
    -------
    dict
        ``n_subjects, n_obs, df, subject_var, residual_var, converged, singular, warnings,
        skipped`` and ``contrasts``: name -> ``(estimate, se)`` for the :data:`CONTRASTS`
        that the data support.
    """
    from statsmodels.regression.mixed_linear_model import MixedLM

    data = data[np.isfinite(data["value"].to_numpy(float))]
    n_subjects, n_obs = int(data["subject"].nunique()), len(data)
    per_role = data.groupby("role")["subject"].nunique()
    if per_role.get("pre", 0) < min_subjects:
        return _empty_fit(f"fewer than {min_subjects} subjects with a pre-ECT value",
                          n_subjects, n_obs)
    roles = [r for r in longitudinal.ROLES if per_role.get(r, 0) >= min_subjects]
    data = data[data["role"].isin(roles)]
    n_subjects, n_obs = int(data["subject"].nunique()), len(data)
    if len(roles) < 2:
        return _empty_fit("no role other than pre-ECT with enough subjects", n_subjects, n_obs)
    y = data["value"].to_numpy(float)
    if np.ptp(y) <= 1e-12 * max(1.0, np.abs(y).max()):
        return _empty_fit("constant values", n_subjects, n_obs)
    # centre and scale so that the optimiser sees O(1) numbers whatever the metric's unit
    loc, scale = y.mean(), y.std()
    exog = np.column_stack([np.ones(len(data))] + [(data["role"] == r).to_numpy(float)
                                                   for r in roles[1:]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = MixedLM((y - loc) / scale, exog, groups=data["subject"].to_numpy()).fit(
                reml=True)
        except (np.linalg.LinAlgError, ValueError) as err:
            return _empty_fit(f"fit failed: {type(err).__name__}: {err}", n_subjects, n_obs)
    messages = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    k = exog.shape[1]
    beta = np.asarray(fit.fe_params) * scale
    cov = np.asarray(fit.cov_params())[:k, :k] * scale**2
    subject_var = float(np.asarray(fit.cov_re).ravel()[0]) * scale**2
    residual_var = float(fit.scale) * scale**2
    position = {r: i for i, r in enumerate(roles)}  # 0 = intercept (pre)
    contrasts = {}
    for name, (plus, minus) in CONTRASTS.items():
        if plus not in position or minus not in position:
            continue
        vec = np.zeros(k)
        if position[plus]:
            vec[position[plus]] += 1
        if position[minus]:
            vec[position[minus]] -= 1
        contrasts[name] = (float(vec @ beta), float(np.sqrt(max(vec @ cov @ vec, 0.0))))
    df = float(n_obs - n_subjects - (len(roles) - 1))
    return {"n_subjects": n_subjects, "n_obs": n_obs, "df": df, "subject_var": subject_var,
            "residual_var": residual_var, "converged": bool(fit.converged),
            "singular": subject_var <= SINGULAR_TOL * residual_var,
            "warnings": "; ".join(messages), "skipped": "", "contrasts": contrasts}


def _t_p(estimate: float, se: float, df: float) -> tuple[float, float]:
    if not (np.isfinite(estimate) and np.isfinite(se) and df > 0) or se <= 0:
        return np.nan, np.nan
    t = estimate / se
    return t, float(2 * stdtr(df, -abs(t)))


def _rows_of_fit(key: tuple, model: str, fit: dict) -> list[dict]:
    rows = []
    for name in CONTRASTS:
        estimate, se = fit["contrasts"].get(name, (np.nan, np.nan))
        t, p = _t_p(estimate, se, fit["df"])
        rows.append({**dict(zip(KEY_COLUMNS, key, strict=True)), "model": model,
                     "contrast": name, "estimate": estimate, "se": se, "t": t,
                     "df": fit["df"], "p": p,
                     **{c: fit[c] for c in ("n_subjects", "n_obs", "subject_var",
                                            "residual_var", "converged", "singular",
                                            "warnings", "skipped")}})
    return rows


def _difference_rows(key: tuple, pat: dict, ctl: dict) -> list[dict]:
    rows = []
    reasons = "; ".join(f"{g}: {f['skipped']}" for g, f in (("patient", pat), ("control", ctl))
                        if f["skipped"])
    for name in CONTRASTS:
        ep, sp = pat["contrasts"].get(name, (np.nan, np.nan))
        ec, sc = ctl["contrasts"].get(name, (np.nan, np.nan))
        estimate, se = ep - ec, float(np.hypot(sp, sc))
        # Welch-Satterthwaite; a fit without residual degrees of freedom gives none
        df_pat, df_ctl = float(pat["df"]), float(ctl["df"])
        with np.errstate(invalid="ignore", divide="ignore"):
            df = (se**4 / (sp**4 / df_pat + sc**4 / df_ctl)
                  if df_pat > 0 and df_ctl > 0 else np.nan)
        t, p = _t_p(estimate, se, df)
        rows.append({**dict(zip(KEY_COLUMNS, key, strict=True)),
                     "model": "patient_minus_control", "contrast": name, "estimate": estimate,
                     "se": se, "t": t, "df": df, "p": p,
                     "n_subjects": pat["n_subjects"] + ctl["n_subjects"],
                     "n_obs": pat["n_obs"] + ctl["n_obs"], "subject_var": np.nan,
                     "residual_var": np.nan, "converged": pat["converged"] and ctl["converged"],
                     "singular": pat["singular"] or ctl["singular"], "warnings": "",
                     "skipped": reasons})
    return rows


def lme_table(
    long: pd.DataFrame,
    *,
    scopes: Sequence[str] | None = DEFAULT_SCOPES,
    include_flagged: bool = False,
    min_subjects: int = 3,
    fdr_by: Sequence[str] = ("model", "contrast"),
    patient_group: str = "patient",
    control_group: str = "control",
) -> pd.DataFrame:
    """Mixed-effects role models of every metric with BH-FDR (see the module docstring).

    Parameters
    ----------
    long : pandas.DataFrame
        Cohort long table (:func:`collect_long_tables`).  Subjects without any group label
        are all analysed as patients.
    scopes : sequence of str or None, default=:data:`DEFAULT_SCOPES`
        Metric scopes to model (None: all, node level included).
    include_flagged : bool, default=False
        Keep QC-flagged sessions.
    min_subjects : int, default=3
        See :func:`fit_role_model`.
    fdr_by : sequence of str, default=("model", "contrast")
        Columns defining an FDR family (add e.g. ``"modality"`` for per-modality families).
    patient_group, control_group : str
        ``group`` labels of the two groups.

    Returns
    -------
    pandas.DataFrame
        One row per metric x model x contrast; columns :data:`LME_SIDECAR`.  The control and
        difference rows appear only when the cohort has controls.
    """
    long = longitudinal.prepare_long_table(long)
    if not include_flagged:
        long, _ = split_flagged(long)
    if scopes is not None:
        long = long[long["scope"].isin(list(scopes))]
    if (long["group"] == "").all():
        long = long.assign(group=patient_group)
    has_controls = (long["group"] == control_group).any()
    rows: list[dict] = []
    cols = ["subject", "role", "value"]
    for key, part in long.groupby(list(KEY_COLUMNS), sort=True):
        pat = fit_role_model(part.loc[part["group"] == patient_group, cols],
                             min_subjects=min_subjects)
        rows += _rows_of_fit(key, "patient", pat)
        if has_controls:
            ctl = fit_role_model(part.loc[part["group"] == control_group, cols],
                                 min_subjects=min_subjects)
            rows += _rows_of_fit(key, "control", ctl)
            rows += _difference_rows(key, pat, ctl)
    table = pd.DataFrame(rows, columns=[c for c in LME_SIDECAR if c != "q"])
    table["q"] = np.nan
    for _, index in table.groupby(list(fdr_by)).groups.items():
        table.loc[index, "q"] = fdr_bh(table.loc[index, "p"].to_numpy(float))
    return table[list(LME_SIDECAR)]


def class_counts(
    changes: pd.DataFrame, *, include_flagged: bool = False, last_only: bool = True,
    patient_group: str = "patient",
) -> pd.DataFrame:
    """Counts of maintenance classes per metric over patients.

    Parameters
    ----------
    changes : pandas.DataFrame
        :func:`pipeline.longitudinal.change_table` rows of all subjects.
    include_flagged : bool, default=False
        Count rows that used a QC-flagged session.
    last_only : bool, default=True
        Use each subject's last maintenance session only (else every maintenance session).
    patient_group : str
        Only subjects of this group are counted ("" groups count as patients).

    Returns
    -------
    pandas.DataFrame
        One row per metric; columns :data:`CLASS_COUNTS_SIDECAR`.
    """
    rows = changes[changes["session_maintenance"].astype(str) != ""]
    rows = rows[rows["group"].isin([patient_group, ""])]
    if last_only:
        rows = rows[rows["is_last"].astype(bool)]
    if not include_flagged:
        rows = rows[~rows["qc_flag"].astype(bool)]
    labels = (*longitudinal.CLASSES, longitudinal.NO_ACUTE_CHANGE)
    counts = pd.crosstab([rows[c] for c in KEY_COLUMNS], rows["maintenance_class"])
    counts = counts.reindex(columns=list(labels), fill_value=0)
    counts.columns = [f"n_{c}" for c in labels]
    grouped = rows.groupby(list(KEY_COLUMNS))
    extra = grouped.agg(n_subjects=("subject", "nunique"),
                        median_retention=("retention", "median"),
                        **{f"mean_p_{c}": (f"p_{c}", "mean") for c in longitudinal.CLASSES})
    out = counts.join(extra).reset_index()
    return out[list(CLASS_COUNTS_SIDECAR)]


def run_group(
    long: pd.DataFrame, changes: pd.DataFrame | None = None, **lme_options,
) -> dict[str, pd.DataFrame]:
    """The whole group level on a cohort long table.

    Parameters
    ----------
    long : pandas.DataFrame
        Cohort long table (:func:`collect_long_tables`).
    changes : pandas.DataFrame, optional
        Subject-level change tables (computed from ``long`` when omitted).
    **lme_options
        Passed to :func:`lme_table` (``include_flagged`` also applies to the class counts).

    Returns
    -------
    dict of str to pandas.DataFrame
        ``metrics``, ``excluded_sessions``, ``lme``, ``class_counts``; keys of
        :data:`GROUP_OUTPUTS` (file names) and :data:`GROUP_SIDECARS` (column definitions).
    """
    long = longitudinal.prepare_long_table(long)
    _, excluded = split_flagged(long)
    if changes is None:
        changes = longitudinal.change_table(long)
    return {
        "metrics": long,
        "excluded_sessions": excluded,
        "lme": lme_table(long, **lme_options),
        "class_counts": class_counts(
            changes, include_flagged=lme_options.get("include_flagged", False)),
    }


# --------------------------------------------------------------------------- sidecars

_KEYS_DOC = {c: longitudinal.CHANGES_SIDECAR[c] for c in KEY_COLUMNS}

#: Column descriptions of the cohort metric table.
METRICS_SIDECAR = {c: longitudinal.TRAJECTORY_SIDECAR.get(c, {"Description": d})
                   for c, d in (
                       ("subject", ""), ("session", ""), ("role", ""), ("order", ""),
                       ("time", ""), ("group", ""), *((k, "") for k in KEY_COLUMNS),
                       ("value", ""), ("se", ""), ("qc_flag", ""))}

#: Column descriptions of :func:`lme_table`.
LME_SIDECAR: dict[str, dict] = {
    **_KEYS_DOC,
    "model": {"Description": "Which fit the row comes from.",
              "Levels": {"patient": "value ~ C(role) + (1|subject), patients, REML",
                         "control": "the same model fitted on controls only",
                         "patient_minus_control": "group x role interaction: patient contrast"
                                                  " minus control contrast"}},
    "contrast": {"Description": "Fixed-effect contrast.",
                 "Levels": {k: f"{a} - {b}" for k, (a, b) in CONTRASTS.items()}},
    "estimate": {"Description": "Contrast estimate, in the metric's units."},
    "se": {"Description": "Standard error of the estimate."},
    "t": {"Description": "estimate / se."},
    "df": {"Description": "Degrees of freedom of the t test: n_obs - n_subjects - "
                          "(n_roles - 1); Welch-Satterthwaite for patient_minus_control."},
    "p": {"Description": "Two-sided p-value of the t test."},
    "q": {"Description": "Benjamini-Hochberg FDR q-value across metrics within one "
                         "model x contrast family."},
    "n_subjects": {"Description": "Subjects in the fit(s)."},
    "n_obs": {"Description": "Sessions (observations) in the fit(s)."},
    "subject_var": {"Description": "REML estimate of the between-subject variance."},
    "residual_var": {"Description": "REML estimate of the residual variance."},
    "converged": {"Description": "True when the optimiser reported convergence."},
    "singular": {"Description": f"True when subject_var <= {SINGULAR_TOL} x residual_var "
                                "(boundary fit)."},
    "warnings": {"Description": "Warnings raised during the fit ('; '-separated)."},
    "skipped": {"Description": "Why the metric was not modelled ('' when it was)."},
}

#: Column descriptions of :func:`class_counts`.
CLASS_COUNTS_SIDECAR: dict[str, dict] = {
    **_KEYS_DOC,
    **{f"n_{c}": {"Description": f"Patients whose maintenance class is {c}."}
       for c in (*longitudinal.CLASSES, longitudinal.NO_ACUTE_CHANGE)},
    "n_subjects": {"Description": "Patients counted."},
    "median_retention": {"Description": "Median retention (maintenance - pre) / (post - pre)."},
    **{f"mean_p_{c}": {"Description": f"Mean probability of {c}."}
       for c in longitudinal.CLASSES},
}

#: Column descriptions of the excluded-sessions table.
EXCLUDED_SIDECAR: dict[str, dict] = {
    "subject": longitudinal.TRAJECTORY_SIDECAR["subject"],
    "session": longitudinal.TRAJECTORY_SIDECAR["session"],
    "role": longitudinal.TRAJECTORY_SIDECAR["role"],
    "group": longitudinal.TRAJECTORY_SIDECAR["group"],
    "n_rows": {"Description": "Metric rows of the session left out (flagged rows only)."},
    "reason": {"Description": "Why they were excluded (qc_flag: failed QC, see qc_reason "
               "in the cohort metrics table)."},
}

GROUP_SIDECARS = {"metrics": METRICS_SIDECAR, "excluded_sessions": EXCLUDED_SIDECAR,
                  "lme": LME_SIDECAR, "class_counts": CLASS_COUNTS_SIDECAR}

#: Proposed file names (relative to the output folder) of the group tables.
GROUP_OUTPUTS = {
    "metrics": "group/desc-cohort_metrics.tsv",
    "excluded_sessions": "group/desc-excluded_sessions.tsv",
    "lme": "group/desc-lme_stats.tsv",
    "class_counts": "group/desc-maintenanceclasses_stats.tsv",
}
