"""Denoising: planted confound/drift/spikes, censoring independence, filter response, YAMLs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline import confounds as cf
from pipeline import denoise as dn

TR = 2.0


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)


def band_signal(rng, n_t, n_cols):
    """Signal inside 0.01-0.08 Hz: sum of random-phase sinusoids."""
    t = np.arange(n_t) * TR
    freqs = np.linspace(0.02, 0.07, 6)
    phases = rng.uniform(0, 2 * np.pi, (6, n_cols))
    return np.sum([np.sin(2 * np.pi * f * t[:, None] + p) for f, p in zip(freqs, phases,
                   strict=True)], axis=0)


def fake_confounds(rng, n_t):
    cols = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    table = pd.DataFrame(rng.normal(0, 0.05, (n_t, 6)), columns=cols)
    table = cf.expand_confounds(table, cols)
    table["framewise_displacement"] = np.r_[np.nan, np.full(n_t - 1, 0.1)]
    return table


def planted(rng, n_t=200, n_cols=6):
    truth = band_signal(rng, n_t, n_cols)
    table = fake_confounds(rng, n_t)
    nuisance = table["trans_y"].to_numpy() * 40  # strong broadband confound
    t = np.linspace(0, 1, n_t)
    drift = 3 * t + 2 * t**2
    spikes = [50, 120, 121]
    data = truth + nuisance[:, None] + drift[:, None] + 100
    data[spikes] += 25.0
    table.loc[spikes, "framewise_displacement"] = 1.2
    return data, table, truth, nuisance, spikes


def strategy(**kw):
    base = {"name": "test", "confounds": ["trans_*", "rot_*"]}
    return dn.parse_strategy({**base, **kw}, "test")


def test_denoise_removes_confound_and_censors_spikes(rng):
    data, table, truth, nuisance, spikes = planted(rng, n_t=400, n_cols=20)
    run = dn.denoise_run(data, table, TR, strategy())
    keep = run.keep
    assert not keep[spikes].any()
    assert keep.sum() == 400 - 3 and run.data.shape == (397, 20)
    before = [abs(np.corrcoef(data[keep, j], nuisance[keep])[0, 1]) for j in range(20)]
    after = [abs(np.corrcoef(run.data[:, j], nuisance[keep])[0, 1]) for j in range(20)]
    assert np.median(before) > 0.5
    assert np.median(after) < 0.05  # chance level for 397 volumes is ~0.05 std
    fit = [np.corrcoef(run.data[:, j], truth[keep, j])[0, 1] for j in range(20)]
    assert min(fit) > 0.95
    # exact: a modelled confound and linear drift leave no trace in the output
    linear = truth + nuisance[:, None] + np.linspace(0, 3, 400)[:, None] + 100
    a = dn.denoise_run(linear, table, TR, strategy())
    b = dn.denoise_run(truth, table, TR, strategy())
    np.testing.assert_allclose(a.data, b.data, atol=1e-8, rtol=0)


def test_kept_volumes_do_not_depend_on_censored_values(rng):
    data, table, *_ , spikes = planted(rng)
    other = data.copy()
    other[spikes] = rng.normal(1e4, 1e3, (len(spikes), data.shape[1]))
    a = dn.denoise_run(data, table, TR, strategy())
    b = dn.denoise_run(other, table, TR, strategy())
    np.testing.assert_allclose(a.data, b.data, atol=1e-8, rtol=0)
    # without censoring the spikes leak into neighbouring volumes through the filter
    c = dn.denoise_run(other, table, TR, strategy(censoring=None))
    assert np.abs(c.data[40:60] - a.data[40:60]).max() > 1


def test_min_segment_rule():
    fd = np.array([np.nan, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0])
    keep = dn.censor_mask(fd, 0.5, 5)
    np.testing.assert_array_equal(keep, [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    assert dn.censor_mask(fd, None).all()
    assert dn.censor_mask(np.zeros(3), 0.5, 5).all()  # nothing censored -> nothing dropped


def test_interpolation_is_cubic_spline():
    t = np.arange(20.0)
    y = (0.01 * t**3 - 0.2 * t**2 + t)[:, None]  # a cubic is reproduced exactly
    keep = np.ones(20, bool)
    keep[[0, 7, 8, 19]] = False
    out = dn.interpolate_censored(np.where(keep[:, None], y, 999.0), keep, 1.0)
    np.testing.assert_allclose(out[7:9], y[7:9], atol=1e-9)
    assert out[0, 0] == y[1, 0] and out[19, 0] == y[18, 0]  # edges: nearest kept value


@pytest.mark.parametrize(("freq", "passes"), [(0.004, False), (0.03, True), (0.05, True),
                                              (0.15, False)])
def test_filter_passband_and_stopband(freq, passes):
    n_t = 600
    t = np.arange(n_t) * TR
    x = np.sin(2 * np.pi * freq * t)[:, None]
    y = dn.butterworth_filter(x, TR, 0.01, 0.08, order=2)
    mid = slice(150, 450)  # away from the ends
    gain = y[mid].std() / x[mid].std()
    if passes:
        assert 0.95 < gain < 1.05
    else:
        assert gain < 0.1
    # zero phase: the filtered passband sinusoid is not shifted
    if passes:
        assert np.corrcoef(x[mid, 0], y[mid, 0])[0, 1] > 0.999


def test_nan_columns_survive(rng):
    data, table, *_ = planted(rng)
    data[:, 2] = np.nan
    run = dn.denoise_run(data, table, TR, strategy())
    assert np.isnan(run.data[:, 2]).all() and np.isfinite(run.data[:, [0, 1, 3]]).all()


def test_dummy_volumes_dropped_from_outlier_columns(rng):
    data, table, *_ = planted(rng)
    table = pd.concat([table, cf.non_steady_state_columns(len(table), 3)], axis=1)
    run = dn.denoise_run(data, table, TR, strategy())
    assert run.n_dummy == 3 and run.keep.size == 197


def test_concatenate_and_qc(rng):
    data, table, *_ = planted(rng)
    a = dn.denoise_run(data, table, TR, strategy())
    b = dn.denoise_run(data[:150], table.iloc[:150], TR, strategy())
    both = dn.concatenate_runs([a, b])
    assert both.data.shape[0] == a.data.shape[0] + b.data.shape[0]
    qc = dn.qc_summary(both, tsnr=55.0)
    assert qc["n_censored"] == a.n_censored + b.n_censored
    assert qc["remaining_minutes"] == pytest.approx(both.data.shape[0] * TR / 60)
    assert qc["max_fd"] == pytest.approx(1.2)
    assert qc["percent_censored"] == pytest.approx(100 * qc["n_censored"] / 350)
    assert dn.check_min_minutes(qc["remaining_minutes"]) == (True, None)
    ok, reason = dn.check_min_minutes(3.5, 4)
    assert not ok and "3.50 min" in reason and "4 min" in reason


def test_builtin_strategies_match_fmriprep_columns(rng):
    assert {"8P", "24P", "36P", "acompcor", "acompcor_gsr"} <= set(dn.builtin_strategies())
    shape, n_t = (7, 8, 9), 30
    data = rng.normal(400, 4, (*shape, n_t))
    wm = np.zeros(shape, bool)
    wm[1:6, 1:4, 1:8] = True
    csf = np.zeros(shape, bool)
    csf[1:6, 4:7, 1:8] = True
    table = cf.build_confounds(data, rng.normal(0, 0.1, (n_t, 6)), TR,
                               brain_mask=np.ones(shape, bool), wm_mask=wm, csf_mask=csf)
    sizes = {"8P": 8, "24P": 24, "36P": 36, "acompcor": 22, "acompcor_gsr": 24}
    for name, size in sizes.items():
        s = dn.load_strategy(name)
        assert len(dn.select_confounds(s, table)) == size
        assert s.fd_threshold == 0.5 and (s.low_hz, s.high_hz) == (0.01, 0.08)
        assert "{" not in s.methods_text() and s.citation


def test_user_yaml_errors_name_the_key(tmp_path):
    good = tmp_path / "mine.yml"
    good.write_text("name: mine\nconfounds: [trans_x, csf]\ncensoring: null\n"
                    "filter: {low_hz: 0.009, high_hz: null}\n")
    s = dn.load_strategy(good)
    assert s.fd_threshold is None and s.high_hz is None and s.low_hz == 0.009
    cases = {
        "name: x\nconfounds: [a]\nfilters: {}\n": "'filters'",
        "name: x\nconfounds: [a]\ncensoring: {fd_thresh: 0.3}\n": "'censoring.fd_thresh'",
        "name: x\nconfounds: [a]\ncensoring: {fd_threshold: -1}\n": "'censoring.fd_threshold'",
        "name: x\nconfounds: a\n": "'confounds'",
        "confounds: [a]\n": "'name'",
        "name: x\nconfounds: [a]\nfilter: {low_hz: 0.1, high_hz: 0.05}\n": "'filter.low_hz'",
        "name: x\nconfounds: [a]\nfilter: {order: 0}\n": "'filter.order'",
    }
    for text, key in cases.items():
        bad = tmp_path / "bad.yml"
        bad.write_text(text)
        with pytest.raises(dn.StrategyError, match=key) as err:
            dn.load_strategy(bad)
        assert str(bad) in str(err.value)
    with pytest.raises(dn.StrategyError, match="neither a built-in"):
        dn.load_strategy(tmp_path / "missing.yml")
    table = pd.DataFrame({"trans_x": [0.0]})
    with pytest.raises(dn.StrategyError, match="'csf'"):
        dn.select_confounds(s, table)
