"""Group level: BH-FDR, mixed-model role contrasts, class counts, QC exclusion."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ttest_rel
from statsmodels.stats.multitest import multipletests

from pipeline import derivatives
from pipeline import groupstats as G
from pipeline import longitudinal as L

ROLES = (("pre", "pre", 0.0), ("post", "post", 28.0), ("maint", "maintenance", 182.0))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def cohort(rng, n_pat: int, n_ctl: int, effects: dict[str, dict[str, float]],
           subject_sd: float = 1.0, noise_sd: float = 0.5, roles=ROLES) -> pd.DataFrame:
    """Long table; ``effects[metric][role]`` is added to patients' values at that role."""
    rows = []
    for s in range(n_pat + n_ctl):
        group = "patient" if s < n_pat else "control"
        for metric, shift in effects.items():
            base = rng.normal(0, subject_sd)
            for session, role, time in roles:
                value = base + rng.normal(0, noise_sd)
                if group == "patient":
                    value += shift.get(role, 0.0)
                rows.append({"subject": f"{group[0]}{s:02d}", "session": session, "role": role,
                             "time": time, "group": group, "modality": "fc", "atlas": "A",
                             "metric": metric, "scope": "global", "network": "",
                             "network_b": "", "node": "", "value": value, "se": noise_sd,
                             "qc_flag": 0})
    return pd.DataFrame(rows)


def test_bh_equals_statsmodels(rng):
    p = np.concatenate([rng.uniform(0, 1, 200), rng.uniform(0, 0.01, 30), [0.5, 0.5, 0.0, 1.0]])
    rng.shuffle(p)
    np.testing.assert_allclose(G.fdr_bh(p), multipletests(p, method="fdr_bh")[1], atol=1e-15)
    with_nan = np.concatenate([p[:50], [np.nan, np.nan]])
    q = G.fdr_bh(with_nan)
    assert np.isnan(q[-2:]).all()
    np.testing.assert_allclose(q[:50], multipletests(p[:50], method="fdr_bh")[1], atol=1e-15)
    assert G.fdr_bh([np.nan]).shape == (1,) and np.isnan(G.fdr_bh([]).sum() + np.nan)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        G.fdr_bh([0.2, 1.5])


def test_balanced_two_sessions_equal_the_paired_difference(rng):
    data = cohort(rng, 15, 0, {"m": {"post": 0.8}}, roles=ROLES[:2])
    fit = G.fit_role_model(data)
    wide = data.pivot(index="subject", columns="role", values="value")
    diff = wide["post"] - wide["pre"]
    estimate, se = fit["contrasts"]["post_vs_pre"]
    assert estimate == pytest.approx(diff.mean(), abs=1e-10)
    assert se == pytest.approx(diff.std(ddof=1) / np.sqrt(len(diff)), rel=1e-4)
    assert fit["contrasts"].keys() == {"post_vs_pre"} and fit["skipped"] == ""
    # the t test of the contrast is the paired t-test
    row = G.lme_table(data).iloc[0]
    paired = ttest_rel(wide["post"], wide["pre"])
    assert row["df"] == 14 and row["t"] == pytest.approx(paired.statistic, rel=1e-4)
    assert row["p"] == pytest.approx(paired.pvalue, rel=1e-3)


def test_balanced_three_sessions_equal_the_anova_formulas(rng):
    data = cohort(rng, 12, 0, {"m": {"post": 0.8, "maintenance": 0.3}})
    fit = G.fit_role_model(data)
    wide = data.pivot(index="subject", columns="role", values="value")[["pre", "post",
                                                                         "maintenance"]]
    n, k = wide.shape
    x = wide.to_numpy()
    resid = x - x.mean(1, keepdims=True) - x.mean(0) + x.mean()
    sigma2 = (resid ** 2).sum() / ((n - 1) * (k - 1))  # REML = ANOVA when interior
    se_pair = np.sqrt(2 * sigma2 / n)
    means = wide.mean(axis=0)
    for name, (plus, minus) in G.CONTRASTS.items():
        estimate, se = fit["contrasts"][name]
        assert estimate == pytest.approx(means[plus] - means[minus], abs=1e-10)
        assert se == pytest.approx(se_pair, rel=1e-4)
    assert fit["residual_var"] == pytest.approx(sigma2, rel=1e-4)
    assert fit["df"] == (n - 1) * (k - 1)
    subject_var = (k * wide.mean(axis=1).var(ddof=1) - sigma2) / k
    assert fit["subject_var"] == pytest.approx(subject_var, rel=1e-3)


def test_planted_effects_detected_and_nulls_not(rng):
    planted = {f"planted{i}": {"post": 1.0, "maintenance": 1.0} for i in range(6)}
    nulls = {f"null{i:03d}": {} for i in range(100)}
    table = G.lme_table(cohort(rng, 20, 0, {**planted, **nulls}, noise_sd=0.5))
    post = table[table["contrast"] == "post_vs_pre"].set_index("metric")
    assert set(table["model"]) == {"patient"}  # no controls, no control models
    assert (post.loc[list(planted), "q"] < 0.05).all()
    null_p = post.loc[list(nulls), "p"]
    # 100 null tests at alpha 0.05: binomial mean 5, P(more than 11) < 0.5 %
    assert (null_p < 0.05).sum() <= 11
    # BH bounds the expected share of false discoveries (5 %), not their number: at most one
    # null among the discoveries of this seeded cohort
    assert (post.loc[list(nulls), "q"] < 0.05).sum() <= 1
    maint = table[table["contrast"] == "maintenance_vs_post"].set_index("metric")
    assert (maint.loc[list(planted), "q"] >= 0.05).all()  # nothing planted after post
    assert (table["skipped"] == "").all() and table["converged"].all()


def test_controls_and_interaction(rng):
    effects = {"planted": {"post": 1.5, "maintenance": 1.5}, "null": {}}
    table = G.lme_table(cohort(rng, 15, 10, effects, noise_sd=0.4))
    table = table[table["contrast"] == "post_vs_pre"].set_index(["metric", "model"])
    assert table.loc[("planted", "patient"), "p"] < 1e-6
    assert table.loc[("planted", "control"), "p"] > 0.01
    diff = table.loc[("planted", "patient_minus_control")]
    pat, ctl = table.loc[("planted", "patient")], table.loc[("planted", "control")]
    assert diff["estimate"] == pytest.approx(pat["estimate"] - ctl["estimate"])
    assert diff["se"] == pytest.approx(np.hypot(pat["se"], ctl["se"]))
    assert diff["p"] < 1e-4 and diff["n_subjects"] == 25
    assert table.loc[("null", "patient_minus_control"), "p"] > 0.01


def test_skips_and_singular_fits_are_reported(rng):
    data = cohort(rng, 6, 0, {"few": {}, "flat": {}, "nosubj": {}}, subject_sd=0.0)
    data = data[~((data["metric"] == "few") & (data["subject"] > "p01"))]
    data.loc[data["metric"] == "flat", "value"] = 3.0
    table = G.lme_table(data).drop_duplicates("metric").set_index("metric")
    assert table.loc["few", "skipped"].startswith("fewer than 3 subjects")
    assert table.loc["flat", "skipped"] == "constant values"
    assert np.isnan(table.loc["flat", "p"]) and np.isnan(table.loc["flat", "q"])
    # no subject variance planted: the REML estimate sits at (or next to) the boundary
    assert table.loc["nosubj", "skipped"] == ""
    assert table.loc["nosubj", "subject_var"] < 0.05 * table.loc["nosubj", "residual_var"]
    assert isinstance(table.loc["nosubj", "warnings"], str)


def test_flagged_sessions_are_excluded_and_listed(rng):
    data = cohort(rng, 8, 0, {"m": {"post": 1.0}})
    data.loc[(data["subject"] == "p03") & (data["role"] == "post"), "qc_flag"] = 1
    kept, excluded = G.split_flagged(data)
    assert excluded[["subject", "session", "role", "n_rows", "reason"]].values.tolist() == [
        ["p03", "post", "post", 1, "qc_flag"]]
    assert len(kept) == len(data) - 1
    default = G.lme_table(data)
    everything = G.lme_table(data, include_flagged=True)
    assert default["n_obs"].iloc[0] == 23 and everything["n_obs"].iloc[0] == 24


def test_class_counts_and_run_group(rng, tmp_path):
    rows = []
    planted = {"p1": (1.0, 2.0, 1.3), "p2": (1.0, 2.0, 2.0), "p3": (1.0, 2.0, 2.5),
               "p4": (1.0, 2.0, 1.2)}  # regression, stabilisation, continued, regression
    for sub, values in planted.items():
        for (session, role, time), value in zip(ROLES, values, strict=True):
            rows.append({"subject": sub, "session": session, "role": role, "time": time,
                         "group": "patient", "metric": "m", "value": value, "se": 0.01})
    table = pd.DataFrame(rows)
    path = tmp_path / "sub-all_metrics.tsv"
    derivatives.write_tsv(path, table)
    out = G.run_group(G.collect_long_tables([path]))
    counts = out["class_counts"].iloc[0]
    assert (counts["n_regression"], counts["n_stabilisation"],
            counts["n_continued_remodelling"], counts["n_no_acute_change"]) == (2, 1, 1, 0)
    assert counts["median_retention"] == pytest.approx(np.median([0.3, 1.0, 1.5, 0.2]))
    for name, frame in out.items():
        assert list(frame.columns) == list(G.GROUP_SIDECARS[name]), name
    assert out["excluded_sessions"].empty
    with pytest.raises(G.GroupStatsError, match=r"missing\.tsv: metric table not found"):
        G.collect_long_tables([tmp_path / "missing.tsv"])
    bad = tmp_path / "bad.tsv"
    derivatives.write_tsv(bad, table.drop(columns="value"))
    with pytest.raises(L.LongitudinalInputError, match=r"bad\.tsv: missing column"):
        G.collect_long_tables([bad])


def test_difference_without_residual_degrees_of_freedom_is_nan(rng):
    # a metric often NaN: 5 controls with 6 values (one with both sessions, two pre-only,
    # two post-only), so their fit has n_obs - n_subjects - 1 = 0 degrees of freedom; the
    # patient - control difference then has no t test instead of stopping the group level
    data = cohort(rng, 8, 5, {"sparse": {"post": 1.0}}, roles=ROLES[:2])
    controls = sorted(data.loc[data["group"] == "control", "subject"].unique())
    gone = ((data["subject"].isin(controls[1:3]) & (data["role"] == "post"))
            | (data["subject"].isin(controls[3:]) & (data["role"] == "pre")))
    data = data[~gone]
    table = G.lme_table(data).set_index(["model", "contrast"])
    assert table.loc[("control", "post_vs_pre"), "df"] == 0
    diff = table.loc[("patient_minus_control", "post_vs_pre")]
    assert np.isnan(diff["df"]) and np.isnan(diff["p"])
    assert table.loc[("patient", "post_vs_pre"), "p"] < 0.01
