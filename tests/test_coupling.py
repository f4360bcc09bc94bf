"""Structure-function coupling against hand-computed values and independent references."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy.linalg import expm

from pipeline import coupling
from pipeline.metrics import TIDY_COLUMNS


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


# Five regions.  Region 3 has only two structural edges (to 0 and 2), below the minimum.
SC5 = np.array(
    [
        [0, 5, 3, 1, 7],
        [5, 0, 4, 0, 1],
        [3, 4, 0, 2, 6],
        [1, 0, 2, 0, 0],
        [7, 1, 6, 0, 0],
    ],
    dtype=float,
)
FC5 = np.array(
    [
        [1.0, 0.6, 0.2, 0.1, 0.5],
        [0.6, 1.0, 0.7, 0.7, -0.1],
        [0.2, 0.7, 1.0, 0.4, 0.8],
        [0.1, 0.7, 0.4, 1.0, 0.9],
        [0.5, -0.1, 0.8, 0.9, 1.0],
    ]
)


def rho(d_squared: float, n: int) -> float:
    """Spearman's rho without ties: 1 - 6 sum(d^2) / (n (n^2 - 1))."""
    return 1 - 6 * d_squared / (n * (n * n - 1))


# Ranks by hand, over j != i with SC[i, j] > 0:
# 0: j=1..4  SC 5,3,1,7 -> 3,2,1,4   FC .6,.2,.1,.5  -> 4,2,1,3   d^2 = 1+0+0+1 = 2
# 1: j=0,2,4 SC 5,4,1   -> 3,2,1     FC .6,.7,-.1    -> 2,3,1     d^2 = 1+1+0   = 2
# 2: j=0,1,3,4 SC 3,4,2,6 -> 2,3,1,4 FC .2,.7,.4,.8  -> 1,3,2,4   d^2 = 1+0+1+0 = 2
# 3: two edges only -> NaN
# 4: j=0,1,2 SC 7,1,6   -> 3,1,2     FC .5,-.1,.8    -> 2,1,3     d^2 = 1+0+1   = 2
EXPECTED_RHO = [rho(2, 4), rho(2, 3), rho(2, 4), np.nan, rho(2, 3)]


def test_regional_coupling_hand_example():
    assert EXPECTED_RHO[:3] == [0.8, 0.5, 0.8]
    np.testing.assert_allclose(
        coupling.regional_coupling(SC5, FC5), EXPECTED_RHO, rtol=0, atol=1e-15
    )
    assert coupling.MIN_EDGES_SPEARMAN == 3


def test_regional_coupling_with_ties_uses_average_ranks():
    # region 0 over j=1..4: SC 2,2,1,3 -> ranks 2.5,2.5,1,4; FC .1,.3,.2,.4 -> 1,3,2,4
    sc = np.zeros((5, 5))
    sc[0, 1:] = sc[1:, 0] = [2, 2, 1, 3]
    fc = np.eye(5)
    fc[0, 1:] = fc[1:, 0] = [0.1, 0.3, 0.2, 0.4]
    # Pearson of the centred ranks (0, 0, -1.5, 1.5) and (-1.5, .5, -.5, 1.5)
    expected = (0 + 0 + 0.75 + 2.25) / np.sqrt(4.5 * 5.0)
    assert coupling.regional_coupling(sc, fc)[0] == pytest.approx(expected, abs=1e-15)


def test_regional_coupling_nan_nodes_dropped():
    # pad a region without data in front of region 3: the others must not change
    def pad(m):
        m = np.insert(m, 3, np.nan, axis=0)
        return np.insert(m, 3, np.nan, axis=1)

    out = coupling.regional_coupling(pad(SC5), pad(FC5))
    assert np.isnan(out[3])
    np.testing.assert_allclose(np.delete(out, 3), EXPECTED_RHO, rtol=0, atol=1e-15)


# --------------------------------------------------------------------------- predictors


def floyd_warshall(lengths: np.ndarray) -> np.ndarray:
    n = len(lengths)
    D = np.where(lengths > 0, lengths, np.inf)
    np.fill_diagonal(D, 0)
    for k, i, j in itertools.product(range(n), repeat=3):
        if D[i, k] + D[k, j] < D[i, j]:
            D[i, j] = D[i, k] + D[k, j]
    return D


def test_shortest_path_length_hand_graph():
    # path 0-1-2-3 with weights 2, 4, 1 plus a weak shortcut 0-3 (weight 0.25, length 4)
    # and isolated node 4.  Lengths: 0.5, 0.25, 1, shortcut 4.
    sc = np.zeros((5, 5))
    for i, j, w in [(0, 1, 2), (1, 2, 4), (2, 3, 1), (0, 3, 0.25)]:
        sc[i, j] = sc[j, i] = w
    D = coupling.shortest_path_length(sc)
    assert D[0, 3] == pytest.approx(1.75)  # 0.5 + 0.25 + 1 beats the 4.0 shortcut
    assert D[0, 2] == pytest.approx(0.75)
    assert np.isinf(D[4, :4]).all() and D[4, 4] == 0
    lengths = np.where(sc > 0, 1 / np.where(sc > 0, sc, 1), 0)
    np.testing.assert_allclose(D, floyd_warshall(lengths), rtol=0, atol=1e-15)


def test_shortest_path_length_matches_floyd_warshall(rng):
    n = 9
    sc = np.triu(rng.random((n, n)) * (rng.random((n, n)) < 0.5), 1)
    sc = sc + sc.T
    lengths = np.zeros_like(sc)
    lengths[sc > 0] = 1 / sc[sc > 0]
    np.testing.assert_allclose(
        coupling.shortest_path_length(sc), floyd_warshall(lengths), rtol=1e-14, atol=0
    )


def sc_matrix(rng: np.random.Generator, n: int, isolated: int | None = None) -> np.ndarray:
    sc = np.triu(rng.gamma(2.0, 50.0, (n, n)) * (rng.random((n, n)) < 0.6), 1)
    sc = sc + sc.T
    if isolated is not None:
        sc[isolated, :] = sc[:, isolated] = 0
    return sc


def test_communicability_is_expm_of_normalised_sc(rng):
    sc = sc_matrix(rng, 8, isolated=5)
    s = sc.sum(axis=1)
    norm = np.zeros_like(sc)
    for i, j in itertools.product(range(8), repeat=2):
        if s[i] > 0 and s[j] > 0:
            norm[i, j] = sc[i, j] / np.sqrt(s[i] * s[j])
    G = coupling.communicability(sc)
    np.testing.assert_allclose(G, expm(norm), rtol=1e-12, atol=1e-14)
    values, vectors = np.linalg.eigh(norm)  # independent route for a symmetric matrix
    np.testing.assert_allclose(G, vectors @ np.diag(np.exp(values)) @ vectors.T, atol=1e-12)
    assert G[5, 5] == pytest.approx(1.0) and np.all(np.delete(G[5], 5) == 0)


def test_euclidean_distance_hand_values():
    xyz = np.array([[0, 0, 0], [3, 4, 0], [1, 2, 2]], dtype=float)
    D = coupling.euclidean_distance(xyz)
    np.testing.assert_allclose(D[0], [0, 5, 3])
    np.testing.assert_allclose(D[1, 2], np.sqrt(4 + 4 + 4))
    np.testing.assert_array_equal(D, D.T)


# --------------------------------------------------------------------------- multilinear


def ols_adjusted_r2(y: np.ndarray, X: np.ndarray) -> float:
    try:
        import statsmodels.api as sm
    except ImportError:  # pragma: no cover - statsmodels is in the venv
        design = np.column_stack([np.ones(len(y)), X])
        beta = np.linalg.solve(design.T @ design, design.T @ y)
        r2 = 1 - ((y - design @ beta) ** 2).sum() / ((y - y.mean()) ** 2).sum()
        return 1 - (1 - r2) * (len(y) - 1) / (len(y) - X.shape[1] - 1)
    return float(sm.OLS(y, sm.add_constant(X, has_constant="add")).fit().rsquared_adj)


def test_multilinear_matches_independent_ols(rng):
    n = 12
    sc = sc_matrix(rng, n, isolated=9)
    fc = np.corrcoef(rng.standard_normal((n, 40)))
    coords = rng.uniform(-60, 60, (n, 3))
    out = coupling.regional_multilinear_coupling(sc, fc, coords)

    dist = np.array([[np.linalg.norm(coords[i] - coords[j]) for j in range(n)] for i in range(n)])
    lengths = np.zeros_like(sc)
    lengths[sc > 0] = 1 / sc[sc > 0]
    spl = floyd_warshall(lengths)
    s = sc.sum(axis=1)
    d = np.where(s > 0, 1 / np.sqrt(np.where(s > 0, s, 1)), 0)
    values, vectors = np.linalg.eigh(d[:, None] * sc * d[None, :])
    comm = vectors @ np.diag(np.exp(values)) @ vectors.T

    assert np.isnan(out[9])  # reaches no region on SC
    for i in range(n):
        if i == 9:
            continue
        j = [k for k in range(n) if k not in (i, 9)]  # region 9 unreachable: left out
        X = np.column_stack([dist[i, j], spl[i, j], comm[i, j]])
        assert out[i] == pytest.approx(ols_adjusted_r2(fc[i, j], X), abs=1e-10)


def test_multilinear_perfect_fit_and_minimum():
    # FC built exactly from the predictors -> adjusted R^2 of 1 for every region
    rng = np.random.default_rng(1)
    n = 8
    sc = sc_matrix(rng, n)
    coords = rng.uniform(-50, 50, (n, 3))
    D = coupling.euclidean_distance(coords)
    P = coupling.shortest_path_length(sc)
    C = coupling.communicability(sc)
    fc = 0.3 - 0.002 * D + 0.01 * P + 0.5 * C
    fc = (fc + fc.T) / 2
    np.testing.assert_allclose(
        coupling.regional_multilinear_coupling(sc, fc, coords), 1.0, rtol=0, atol=1e-10
    )
    assert coupling.MIN_OBSERVATIONS_MULTILINEAR == 5
    assert np.isnan(coupling.adjusted_r2(np.arange(4.0), np.ones((4, 3))))


def test_multilinear_nan_nodes_dropped(rng):
    n = 10
    sc = sc_matrix(rng, n)
    fc = np.corrcoef(rng.standard_normal((n, 30)))
    coords = rng.uniform(-60, 60, (n, 3))
    keep = np.array([i for i in range(n) if i != 4])
    sub = coupling.regional_multilinear_coupling(
        sc[np.ix_(keep, keep)], fc[np.ix_(keep, keep)], coords[keep]
    )
    fc_nan = fc.copy()
    fc_nan[4, :] = fc_nan[:, 4] = np.nan
    out = coupling.regional_multilinear_coupling(sc, fc_nan, coords)
    assert np.isnan(out[4])
    np.testing.assert_array_equal(out[keep], sub)


# --------------------------------------------------------------------------- table


def test_within_network_coupling_hand_example():
    # DMN = 0, 2, 4: connected edges (0,2) SC 3 FC .2, (0,4) 7 .5, (2,4) 6 .8
    #   SC ranks 1,3,2; FC ranks 1,2,3; d^2 = 2 -> rho = 0.5
    # SAL = 1, 3: SC[1, 3] = 0, no connected edge -> NaN
    # whole brain, the 8 connected edges (0,1) (0,2) (0,3) (0,4) (1,2) (1,4) (2,3) (2,4):
    #   SC 5,3,1,7,4,1,2,6 -> ranks 6,4,1.5,8,5,1.5,3,7 (tie at 1: average rank)
    #   FC .6,.2,.1,.5,.7,-.1,.4,.8 -> ranks 6,3,2,5,7,1,4,8
    sc_ranks = np.array([6, 4, 1.5, 8, 5, 1.5, 3, 7])
    fc_ranks = np.array([6, 3, 2, 5, 7, 1, 4, 8])
    whole = np.corrcoef(sc_ranks, fc_ranks)[0, 1]
    got = coupling.within_network_coupling(SC5, FC5, ["DMN", "SAL", "DMN", "SAL", "DMN"])
    assert got["network"].tolist() == ["DMN", "SAL", ""]
    assert got["value"].iloc[0] == pytest.approx(rho(2, 3)) == 0.5
    assert np.isnan(got["value"].iloc[1])
    assert got["value"].iloc[2] == pytest.approx(whole, abs=1e-15)


def test_within_network_all_pairs_hand_example():
    # DMN = 0, 2, 4: pairs (0,2) SC 3 FC .2, (0,4) 7 .5, (2,4) 6 .8 (all connected)
    #   SC - mean = -7/3, 5/3, 2/3; FC - mean = -.3, 0, .3
    #   r = (.7 + 0 + .2) / sqrt((49 + 25 + 4) / 9 * .18) = .9 / sqrt(1.56)
    # SAL = 1, 3: one pair -> NaN
    # whole brain: all 10 pairs, (1,3) and (3,4) with SC 0
    got = coupling.within_network_coupling_all_pairs(SC5, FC5, ["DMN", "SAL", "DMN", "SAL",
                                                                 "DMN"])
    assert got["network"].tolist() == ["DMN", "SAL", ""]
    assert got["value"].iloc[0] == pytest.approx(0.9 / np.sqrt(1.56), abs=1e-14)
    assert np.isnan(got["value"].iloc[1])
    pairs = list(itertools.combinations(range(5), 2))
    reference = np.corrcoef([SC5[p] for p in pairs], [FC5[p] for p in pairs])[0, 1]
    assert got["value"].iloc[2] == pytest.approx(reference, abs=1e-14)


@pytest.mark.parametrize("measure", [coupling.within_network_coupling,
                                     coupling.within_network_coupling_all_pairs])
def test_within_network_coupling_sees_a_change_the_regional_measure_dilutes(rng, measure):
    # FC gains SC-proportional coupling on one network's edges only: the within-network
    # value of that network rises, the other network's does not move
    n = 40
    networks = np.array(["A"] * 10 + ["B"] * 30)
    sc = np.triu(rng.gamma(1.0, 1.0, (n, n)) * (rng.random((n, n)) < 0.4), 1)
    sc += sc.T
    noise = np.triu(rng.normal(0, 0.2, (n, n)), 1)
    fc = noise + noise.T
    in_a = np.outer(networks == "A", networks == "A")
    coupled = fc + 0.2 * in_a * sc
    before = measure(sc, fc, networks).set_index("network")["value"]
    after = measure(sc, coupled, networks).set_index("network")["value"]
    assert after["A"] - before["A"] > 0.3
    assert after["B"] == before["B"]


def test_coupling_table(rng):
    nodes = pd.DataFrame(
        {
            "name": [f"r{i}" for i in range(5)],
            "network": ["DMN", "SAL", "DMN", "SAL", "DMN"],
            "x": [0.0, 10, 20, 30, 45],
            "y": [0.0, 5, -5, 12, 3],
            "z": [0.0, 1, 2, 3, -8],
        }
    )
    table = coupling.coupling_table(SC5, FC5, None, nodes)
    assert list(table.columns) == list(TIDY_COLUMNS)
    rows = table[table.metric == "sc_fc_spearman"].set_index(["scope", "network", "node"])
    np.testing.assert_allclose(
        [rows.loc[("node", net, f"r{i}"), "value"] for i, net in enumerate(nodes.network)],
        EXPECTED_RHO,
        atol=1e-15,
    )
    # DMN = regions 0, 2, 4 -> (0.8 + 0.8 + 0.5) / 3; SAL = 1, 3 -> 0.5 (3 is NaN)
    assert rows.loc[("network", "DMN", ""), "value"] == pytest.approx(0.7)
    assert rows.loc[("network", "SAL", ""), "value"] == pytest.approx(0.5)
    assert rows.loc[("global", "", ""), "value"] == pytest.approx(0.65)
    # 5 regions give 4 observations each, below the multilinear minimum
    multi = table[table.metric == "sc_fc_multilinear_r2adj"]
    assert len(multi) == 5 + 2 + 1 and multi["value"].isna().all()
    within = table[table.metric == "sc_fc_within_spearman"].set_index(["scope", "network"])
    assert len(within) == 2 + 1
    assert within.loc[("network", "DMN"), "value"] == pytest.approx(0.5)
    pearson = table[table.metric == "sc_fc_within_pearson"].set_index(["scope", "network"])
    assert len(pearson) == 2 + 1
    assert pearson.loc[("network", "DMN"), "value"] == pytest.approx(0.9 / np.sqrt(1.56))
    with pytest.raises(ValueError, match="4 rows but the matrices have 5"):
        coupling.coupling_table(SC5, FC5, None, nodes.iloc[:4])


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="negative"):
        coupling.regional_coupling(-SC5, FC5)
    with pytest.raises(ValueError, match="different numbers of nodes"):
        coupling.regional_coupling(SC5, FC5[:4, :4])
    with pytest.raises(ValueError, match="coords must have shape"):
        coupling.regional_multilinear_coupling(SC5, FC5, np.zeros((5, 2)))
