"""Trajectories, retention, maintenance classes, normalisation and measurement SEs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import ndtr
from scipy.stats import multivariate_normal

from pipeline import longitudinal as L
from pipeline import metrics
from pipeline.simulate.effects import MAINTENANCE_FACTORS

ROOT = Path(__file__).resolve().parents[1]
GROUNDTRUTH = ROOT / "bids_examples" / "ds-ect" / "derivatives" / "groundtruth"
DUMMIES = 4


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20260522)


def _row(subject, session, role, value, se=np.nan, metric="m", group="patient", qc=0, time=0.0):
    return {"subject": subject, "session": session, "role": role, "time": time, "group": group,
            "modality": "fc", "atlas": "A", "metric": metric, "scope": "global", "network": "",
            "network_b": "", "node": "", "value": value, "se": se, "qc_flag": qc}


# --------------------------------------------------------------------------- class maths


def test_bivariate_normal_cdf_matches_scipy(rng):
    h, k = rng.normal(0, 2, (2, 200))
    h[::5], k[::7] = 0.0, 0.0  # the formula's special branches
    rho = rng.uniform(-0.99, 0.99, 200)
    ours = L._phi2(h, k, rho)
    ref = [multivariate_normal([0, 0], [[1, r], [r, 1]]).cdf([a, b])
           for a, b, r in zip(h, k, rho, strict=True)]
    np.testing.assert_allclose(ours, ref, atol=1e-7)
    # perfectly (anti)correlated limits
    np.testing.assert_allclose(L._phi2(np.array([0.3, 0.3]), np.array([-0.2, -0.2]),
                                       np.array([1.0, -1.0])),
                               [ndtr(-0.2), ndtr(0.3) - ndtr(0.2)], atol=1e-12)


def test_planted_factors_give_exact_classes_at_clear_effects():
    # the simulator's factors: maintenance = post + factor * (post - pre)
    factors = np.array([MAINTENANCE_FACTORS[c] for c in L.CLASSES] * 2)
    acute = np.repeat([0.4, -0.4], 3)  # both directions of the acute change
    se = 0.02  # per session; a and d then have SE 0.028
    out = L.classify_maintenance(acute, factors * acute, 2 * se**2, 2 * se**2, -se**2)
    assert out["maintenance_class"].tolist() == list(L.CLASSES) * 2
    probs = out[["p_regression", "p_stabilisation", "p_continued_remodelling"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-12)
    assert (out["class_probability"] > 0.99).all()
    again = L.classify_maintenance(acute, factors * acute, 2 * se**2, 2 * se**2, -se**2)
    pd.testing.assert_frame_equal(out, again)


def test_probabilities_equal_monte_carlo_of_the_gaussian_model(rng):
    a, d = np.array([0.3, -0.2, 0.1, 0.05]), np.array([-0.1, 0.04, 0.03, -0.02])
    va, vd, cad = np.array([0.01, 0.004, 0.003, 0.002]), 0.006, -0.002
    ours = L.classify_maintenance(a, d, va, vd, cad)
    draws = rng.standard_normal((400_000, 2))
    for i in range(len(a)):
        cov = np.array([[va[i], cad], [cad, vd]])
        A, D = (draws @ np.linalg.cholesky(cov).T + [a[i], d[i]]).T
        ratio = D / A
        expected = [(ratio < -0.25).mean(), (np.abs(ratio) <= 0.25).mean(), (ratio > 0.25).mean()]
        got = ours.loc[i, ["p_regression", "p_stabilisation", "p_continued_remodelling"]]
        np.testing.assert_allclose(got.to_numpy(float), expected, atol=4e-3)


def test_noise_decides_between_a_class_and_stabilisation():
    # d = -0.5 a: a regression, called only when the noise is small enough
    a, d = np.full(3, 0.4), np.full(3, -0.2)
    se = np.array([0.01, 0.05, 0.2])
    out = L.classify_maintenance(a, d, 2 * se**2, 2 * se**2, -se**2, rule="confident")
    assert out["maintenance_class"].tolist() == ["regression", "stabilisation", NO_ACUTE]
    # |a| = 0.4 < 1.645 * sqrt(2) * 0.2: no class without a clear acute change
    assert out.loc[1, "p_regression"] > out.loc[1, "p_continued_remodelling"]
    # the default calls the most probable class and says whether it is beyond noise
    best = L.classify_maintenance(a, d, 2 * se**2, 2 * se**2, -se**2)
    assert best["maintenance_class"].tolist() == ["regression", "regression", NO_ACUTE]
    assert best["class_confident"].tolist() == [True, False, False]
    p = best.loc[1, ["p_regression", "p_stabilisation", "p_continued_remodelling"]]
    assert best.loc[1, "class_probability"] == p.max() < 0.95
    with pytest.raises(ValueError, match="rule"):
        L.classify_maintenance(a, d, rule="vote")


def test_most_probable_class_misclassifies_least():
    # planted ratios D/A = -0.7, 0, +0.5 (regression, stabilisation, remodelling) seen
    # through noise: the most probable class is right more often than the conservative call
    rng = np.random.default_rng(7)
    n, se = 3000, 0.25
    truth = np.array(["regression", "stabilisation", "continued_remodelling"])[np.arange(n) % 3]
    ratio = np.select([truth == "regression", truth == "stabilisation"], [-0.7, 0.0], 0.5)
    pre, post = np.zeros(n), np.full(n, 1.5)
    maint = post + ratio * (post - pre)
    obs = [x + rng.normal(0, se, n) for x in (pre, post, maint)]
    a, d = obs[1] - obs[0], obs[2] - obs[1]
    v = se**2
    calls = {rule: L.classify_maintenance(a, d, 2 * v, 2 * v, -v, rule=rule)["maintenance_class"]
             for rule in L.CLASS_RULES}
    accuracy = {rule: float((c.to_numpy() == truth).mean()) for rule, c in calls.items()}
    assert accuracy["map"] > accuracy["confident"] + 0.1
    assert accuracy["map"] > 0.75


NO_ACUTE = L.NO_ACUTE_CHANGE


def test_undefined_inputs():
    out = L.classify_maintenance([0.0, np.nan, 1.0], [0.1, 0.1, np.nan])
    assert out["maintenance_class"].tolist() == [NO_ACUTE, "", ""]
    assert out[["p_regression", "p_stabilisation"]].isna().all().all()
    with pytest.raises(ValueError, match="fraction"):
        L.classify_maintenance([1.0], [0.0], fraction=0.0)


# --------------------------------------------------------------------------- tables


def _hand_table() -> pd.DataFrame:
    rows = [
        _row("01", "pre", "pre", 1.0, 0.03, time=0),
        _row("01", "post", "post", 2.0, 0.04, time=28),
        _row("01", "m1", "maintenance", 1.3, 0.0, time=90),
        _row("01", "m2", "maintenance", 2.5, 0.0, time=180, qc=1),
        _row("02", "pre", "pre", 5.0, 0.1),  # no acute change at all
        _row("02", "post", "post", 5.0, 0.1),
        _row("03", "pre", "pre", 1.0),  # acute change within noise
        _row("03", "post", "post", 1.1, 0.5),
        _row("03", "m", "maintenance", 1.05, 0.5),
    ]
    return pd.DataFrame(rows)


def test_change_table_numbers():
    out = L.change_table(_hand_table()).set_index(["subject", "session_maintenance"])
    r1, r2 = out.loc[("01", "m1")], out.loc[("01", "m2")]
    assert r1["acute_change"] == pytest.approx(1.0)
    assert r1["se_acute"] == pytest.approx(0.05)  # sqrt(0.03^2 + 0.04^2)
    assert r1["maintenance_change"] == pytest.approx(-0.7)
    assert r1["se_maintenance_change"] == pytest.approx(0.04)
    assert r1["retention"] == pytest.approx(0.3)
    assert r2["retention"] == pytest.approx(1.5)
    assert (r1["maintenance_class"], r2["maintenance_class"]) == ("regression",
                                                                  "continued_remodelling")
    assert (bool(r1["is_last"]), bool(r2["is_last"])) == (False, True)
    assert (bool(r1["qc_flag"]), bool(r2["qc_flag"])) == (False, True)
    no_maint = out.loc[("02", "")]
    assert no_maint["acute_change"] == 0 and np.isnan(no_maint["retention"])
    assert no_maint["maintenance_class"] == ""
    noisy = out.loc[("03", "m")]
    assert np.isnan(noisy["retention"]) and noisy["maintenance_class"] == NO_ACUTE
    assert bool(noisy["se_missing"]) and not bool(r1["se_missing"])
    assert np.isnan(noisy["class_probability"]) and np.isnan(noisy["p_stabilisation"])
    assert r1["class_probability"] >= 0.95  # known errors keep their probabilities
    assert set(L.CHANGES_SIDECAR) == set(out.reset_index().columns)


def test_trajectory_table_changes():
    out = L.trajectory_table(_hand_table())
    sub1 = out[out["subject"] == "01"].set_index("session")
    np.testing.assert_allclose(sub1["change_from_pre"], [0.0, 1.0, 0.3, 1.5])
    np.testing.assert_allclose(sub1["change_from_post"], [-1.0, 0.0, -0.7, 0.5])
    assert sub1["order"].tolist() == [1, 2, 3, 4]
    assert list(out.columns) == list(L.TRAJECTORY_SIDECAR)


def test_time_from_acq_time_and_order():
    table = _hand_table().drop(columns=["time"]).query("subject == '01'")
    table["acq_time"] = ["2022-06-23T14:00:00", "2022-07-21T14:00:00", "2022-09-21T14:00:00",
                         "2022-12-20T02:00:00"]
    out = L.prepare_long_table(table.iloc[::-1])
    np.testing.assert_allclose(out["time"], [0, 28, 90, 179.5])
    assert out["session"].tolist() == ["pre", "post", "m1", "m2"]


def test_recovers_planted_classes_on_noisy_trajectories(rng):
    # 90 subjects x 3 planted classes, acute change 0.3 +- 10 %, measurement SE 0.005: the
    # class margins (0.25 x 0.3 away from the planted ratios) are ~9 SE.  At SE 0.02 (z ~ 2.3)
    # 9 of the 30 continued-remodelling subjects fall back to stabilisation, as they should.
    n, se = 90, 0.005
    rows = []
    for i in range(n):
        klass = L.CLASSES[i % 3]
        pre = rng.normal(0.5, 0.05)
        acute = (-1) ** i * 0.3 * (1 + rng.normal(0, 0.1))
        true = {"pre": pre, "post": pre + acute,
                "maintenance": pre + acute * (1 + MAINTENANCE_FACTORS[klass])}
        rows += [_row(f"{i:03d}", role, role, value + rng.normal(0, se), se, metric=klass)
                 for role, value in true.items()]
    out = L.change_table(pd.DataFrame(rows))
    assert (out["maintenance_class"] == out["metric"]).all()
    # retention recovers 1 + factor
    expected = out["metric"].map(MAINTENANCE_FACTORS) + 1
    assert np.abs(out["retention"] - expected).max() < 0.35


def test_bad_input_names_the_source():
    with pytest.raises(L.LongitudinalInputError, match=r"x\.tsv: missing column\(s\) \['role'\]"):
        L.prepare_long_table(_hand_table().drop(columns="role"), source="x.tsv")
    bad = _hand_table()
    bad.loc[0, "role"] = "baseline2"
    with pytest.raises(L.LongitudinalInputError, match="unknown role"):
        L.prepare_long_table(bad)
    twice = _hand_table()
    twice.loc[2, "role"] = "post"
    with pytest.raises(L.LongitudinalInputError, match="more than one 'post'"):
        L.prepare_long_table(twice)
    with pytest.raises(L.LongitudinalInputError, match="duplicated"):
        L.prepare_long_table(pd.concat([_hand_table()] * 2))
    flags = _hand_table().astype({"qc_flag": object})
    flags.loc[0, "qc_flag"] = "maybe"
    with pytest.raises(L.LongitudinalInputError, match="qc_flag"):
        L.prepare_long_table(flags)


def test_normalisation_index_uses_pooled_control_sd():
    rows = [_row("p1", r, r, v) for r, v in (("pre", 10.0), ("post", 4.0))]
    controls = {"c1": (1.0, 2.0), "c2": (3.0, 6.0), "c3": (5.0, 7.0)}  # (pre, post)
    for sub, (v_pre, v_post) in controls.items():
        rows += [_row(sub, "pre", "pre", v_pre, group="control"),
                 _row(sub, "post", "post", v_post, group="control"),
                 _row(sub, "m", "maintenance", 100.0, group="control", qc=1)]  # excluded
    out = L.normalisation_index(pd.DataFrame(rows)).set_index("role")
    mean = np.mean([1, 3, 5, 2, 6, 7])
    sd = np.sqrt((2 * np.var([1, 3, 5], ddof=1) + 2 * np.var([2, 6, 7], ddof=1)) / 4)
    assert out.loc["pre", "control_mean"] == pytest.approx(mean)
    assert out.loc["pre", "control_sd"] == pytest.approx(sd)
    assert out.loc["pre", "control_df"] == 4
    assert out.loc["pre", "z"] == pytest.approx((10 - mean) / sd)
    assert out.loc["post", "z"] == pytest.approx((4 - mean) / sd)
    assert set(out.reset_index().columns) == set(L.NORMALISATION_SIDECAR)


# --------------------------------------------------------------------------- SE helpers


def test_resample_se():
    x = np.array([[1.0, 2.0, np.nan], [3.0, 2.0, np.nan], [5.0, np.nan, 1.0]])
    np.testing.assert_allclose(L.resample_se(x), [2.0, 0.0, np.nan])


def test_network_fc_fast_path_equals_metrics(rng):
    ts = rng.normal(size=(40, 23))
    nets = np.array(list("aabbbcccccdeeeeeeffffgg"))
    ref = metrics.network_connectivity(np.corrcoef(ts, rowvar=False), nets)["value"]
    np.testing.assert_allclose(L._network_fc(ts, nets), ref, atol=1e-12)


def test_bootstrap_and_split_half_se_match_white_noise_theory(rng):
    # independent white parcels: the within-network mean of m pairwise r has SE 1/sqrt(T m)
    n_t, nets = 400, np.repeat(["a", "b", "c"], [6, 7, 8])
    ts = rng.normal(size=(n_t, len(nets)))
    boot = L.bootstrap_fc_se(ts, nets, n_boot=400, block_length=1, seed=3)
    within = boot[boot["network"] == boot["network_b"]]
    m = np.array([15, 21, 28])
    np.testing.assert_allclose(within["se"], 1 / np.sqrt(n_t * m), rtol=0.15)
    between = boot[boot["network"] != boot["network_b"]]
    np.testing.assert_allclose(between["se"], 1 / np.sqrt(n_t * np.array([42, 48, 56])),
                               rtol=0.15)
    assert boot.equals(L.bootstrap_fc_se(ts, nets, n_boot=400, block_length=1, seed=3))
    # split-half: (m1 - m2)^2 / 4 is unbiased for the variance (averaged over 300 runs)
    var = np.mean([L.split_half_fc_se(rng.normal(size=(n_t, 8)), np.repeat("a", 8))["se"]
                   .to_numpy()[0] ** 2 for _ in range(300)])
    assert var == pytest.approx(1 / (n_t * 28), rel=0.2)


def test_bootstrap_rejects_bad_input(rng):
    with pytest.raises(ValueError, match="one network label per parcel"):
        L.bootstrap_fc_se(rng.normal(size=(20, 5)), ["a"] * 4)
    with pytest.raises(ValueError, match="block_length"):
        L.bootstrap_fc_se(rng.normal(size=(20, 5)), ["a"] * 5, block_length=30)


# --------------------------------------------------------------------------- example dataset


def _planted_long() -> pd.DataFrame:
    """Network FC (+ block-bootstrap SE) of the planted latent series of ds-ect's patients."""
    keep = {"DefaultMode", "Visual", "Salience", "FrontoParietal"}
    rows = []
    for sub in ("pat01", "pat02"):
        for ses, role in (("preECT", "pre"), ("postECT", "post"),
                          ("maintenance", "maintenance")):
            path = (GROUNDTRUTH / f"sub-{sub}" / f"ses-{ses}" / "func" /
                    f"sub-{sub}_ses-{ses}_task-rest_atlas-Seitzman300_desc-planted_"
                    "timeseries.tsv.gz")
            ts = pd.read_csv(path, sep="\t")
            nets = np.array([c.split("_", 2)[2].rsplit("_", 1)[0] for c in ts.columns])
            cols = np.isin(nets, list(keep))
            # the example's first 4 volumes are non-steady-state (simulator preset)
            table = L.bootstrap_fc_se(ts.to_numpy()[DUMMIES:, cols], nets[cols], n_boot=40, seed=1)
            rows.append(table.assign(subject=sub, session=ses, role=role, group="patient",
                                     modality="fc", atlas="Seitzman300", qc_flag=0))
    return pd.concat(rows, ignore_index=True)


def test_example_dataset_classes_follow_the_planted_ones():
    changes = L.change_table(_planted_long())
    planted = {sub: pd.read_csv(GROUNDTRUTH / f"sub-{sub}" / f"sub-{sub}_desc-planted_effects.tsv",
                                sep="\t").set_index("effect") for sub in ("pat01", "pat02")}
    probs = ["p_regression", "p_stabilisation", "p_continued_remodelling"]
    for sub, effects in planted.items():
        rows = changes[changes["subject"] == sub].set_index(["network", "network_b"])
        dmn = rows.loc[("DefaultMode", "DefaultMode")]
        # measured values agree with the planted ones (same latent series)
        assert dmn["value_pre"] == pytest.approx(effects.loc["dmn_within_fc", "pre"], abs=0.005)
        # the most probable class of the strong DMN effect is the planted one
        best = L.CLASSES[int(np.argmax(dmn[probs].to_numpy(float)))]
        assert best == effects.loc["dmn_within_fc", "maintenance_class"]
        # nothing planted in Visual: its acute change is within noise
        assert rows.loc[("Visual", "Visual"), "maintenance_class"] == NO_ACUTE
