"""One session's metric table and the standard errors from resampling the session's data."""

import numpy as np
import pandas as pd
import pytest

from pipeline import session_metrics as sm


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def _nodes(networks):
    n = len(networks)
    return pd.DataFrame({
        "name": [f"p{i}" for i in range(n)],
        "network": networks,
        "x": np.arange(n, dtype=float) * 10, "y": np.zeros(n), "z": np.zeros(n),
    })


def test_moving_block_indices_are_contiguous_blocks(rng):
    idx = sm.moving_block_indices(23, 5, rng)
    assert idx.shape == (23,)
    assert idx.min() >= 0 and idx.max() < 23
    blocks = idx[:20].reshape(4, 5)
    assert (np.diff(blocks, axis=1) == 1).all()


def test_fc_bootstrap_se_matches_the_correlation_formula(rng):
    # two parcels in two networks: the between-network mean is the correlation itself,
    # whose sampling SD for Gaussian white noise is (1 - rho^2) / sqrt(T)
    T, rho = 400, 0.5
    cov = np.array([[1, rho], [rho, 1]])
    ts = rng.multivariate_normal([0, 0], cov, size=T)
    nodes = _nodes(["A", "B"])
    fc = np.corrcoef(ts.T)
    table = sm.session_metric_table(nodes, fc=fc, timeseries=ts, n_boot=400, n_consensus=2,
                                    seed=3)
    row = table[(table.metric == "connectivity") & (table.network == "A")
                & (table.network_b == "B")].iloc[0]
    expected = (1 - rho**2) / np.sqrt(T)
    assert row.value == pytest.approx(fc[0, 1])
    assert row.se == pytest.approx(expected, rel=0.2)


def test_sc_replicates_keep_the_total_and_are_unbiased(rng):
    counts = np.zeros((4, 4))
    counts[0, 1], counts[1, 2], counts[2, 3] = 400, 100, 25
    counts += counts.T
    weights = counts / 2.0
    reps = np.array(list(sm.sc_replicates(counts, weights, n_boot=2000, seed=1)))
    iu = np.triu_indices(4, 1)
    np.testing.assert_allclose(reps[:, iu[0], iu[1]].sum(axis=1) * 2, counts[iu].sum())
    np.testing.assert_allclose(reps.mean(axis=0), weights, rtol=0.03, atol=0.5)
    # multinomial SD of an edge: sqrt(N p (1 - p)), times the fixed factor 1/2
    total = counts[iu].sum()
    p = 400 / total
    assert reps[:, 0, 1].std() == pytest.approx(np.sqrt(total * p * (1 - p)) / 2, rel=0.1)
    assert (reps[:, 0, 3] == 0).all()


def test_session_table_has_every_modality_and_standard_errors(rng):
    networks = ["Default"] * 4 + ["Salience"] * 3 + ["FrontoParietal"] * 3
    nodes = _nodes(networks)
    ts = rng.standard_normal((120, 10)) + rng.standard_normal((120, 1))
    fc = np.corrcoef(ts.T)
    counts = np.triu(rng.poisson(30, (10, 10)).astype(float), 1)
    counts += counts.T
    volumes = pd.DataFrame({"region": ["p0", "hippocampus_L", "TICV"],
                            "volume_mm3": [100.0, 3500.0, 1.5e6],
                            "volume_se_mm3": [2.0, 40.0, np.nan]})
    table = sm.session_metric_table(nodes, fc=fc, timeseries=ts, sc=counts / 10,
                                    sc_counts=counts, volumes=volumes, n_boot=20,
                                    n_consensus=5, seed=0)
    assert list(table.columns) == list(sm.COLUMNS)
    assert set(table.modality) == {"fc", "sc", "coupling", "anat"}
    resampled = table[table.metric.isin(["connectivity", "strength"])
                      & (table.scope != "node") & table.modality.isin(["fc", "sc"])]
    assert resampled.se.notna().all() and (resampled.se > 0).all()
    glob = table[(table.modality == "coupling") & (table.scope == "global")]
    assert glob.se.notna().all()
    hip = table[(table.modality == "anat") & (table.node == "hippocampus_L")].iloc[0]
    assert hip.scope == "structure" and hip.value == 3500.0 and hip.se == 40.0
    assert np.isnan(table[(table.modality == "anat") & (table.node == "TICV")].se).all()
    # deterministic
    again = sm.session_metric_table(nodes, fc=fc, timeseries=ts, sc=counts / 10,
                                    sc_counts=counts, volumes=volumes, n_boot=20,
                                    n_consensus=5, seed=0)
    pd.testing.assert_frame_equal(table, again)


def test_nothing_to_measure_is_an_error():
    with pytest.raises(ValueError, match="nothing to measure"):
        sm.session_metric_table(_nodes(["A", "B"]))
