"""Graph metrics against bctpy (reference), networkx (modularity) and hand-computed values."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pandas as pd
import pytest

from pipeline import metrics

bct = pytest.importorskip("bct")  # test-only reference implementation (bctpy)

TOL = 1e-8


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


def random_graph(rng: np.random.Generator, n: int = 30, zero_fraction: float = 0.3) -> np.ndarray:
    """Symmetric weights in (0, 1), ~30 % absent edges, zero diagonal."""
    W = rng.random((n, n))
    W = np.triu(W, 1)
    W[rng.random((n, n)) < zero_fraction] = 0
    return W + W.T


def planted_blocks(
    rng: np.random.Generator, sizes, within: float, between: float, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(len(sizes)), sizes)
    n = len(labels)
    W = np.where(labels[:, None] == labels[None, :], within, between)
    W = np.triu(W + noise * rng.standard_normal((n, n)), 1)
    W = W + W.T
    W[W < 0] = 0
    return W, labels


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to relabelling."""
    return np.array_equal(metrics._canonical(np.asarray(a)), metrics._canonical(np.asarray(b)))


# --------------------------------------------------------------------------- versus bctpy


@pytest.fixture
def graphs(rng) -> list[np.ndarray]:
    dense = random_graph(rng, 30, 0.3)
    sparse = bct.threshold_proportional(random_graph(rng, 30, 0.0), 0.15)
    isolated = random_graph(rng, 25, 0.4)
    isolated[4, :] = isolated[:, 4] = 0  # a node without edges
    isolated[7, :] = isolated[:, 7] = 0
    isolated[7, 8] = isolated[8, 7] = 0.5  # a node with a single neighbour
    return [dense, sparse, isolated]


def test_strength_matches_bct(graphs):
    for W in graphs:
        np.testing.assert_allclose(metrics.strength(W), bct.strengths_und(W), rtol=0, atol=TOL)


def test_global_efficiency_matches_bct(graphs):
    for W in graphs:
        assert metrics.global_efficiency(W) == pytest.approx(bct.efficiency_wei(W), abs=TOL)


def test_local_efficiency_matches_bct(graphs):
    for W in graphs:
        np.testing.assert_allclose(
            metrics.local_efficiency(W), bct.efficiency_wei(W, local=True), rtol=0, atol=TOL
        )


def test_clustering_matches_bct(graphs):
    for W in graphs:
        np.testing.assert_allclose(
            metrics.clustering_coef(W), bct.clustering_coef_wu(W), rtol=0, atol=TOL
        )


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inside bct
def test_participation_and_zscore_match_bct(graphs, rng):
    for W in graphs:
        # unordered labels, a singleton module (z-score 0) and string-free ints
        ci = rng.choice([3, 9, 4, 7], size=len(W))
        ci[0] = 11
        np.testing.assert_allclose(
            metrics.participation_coef(W, ci), bct.participation_coef(W, ci), rtol=0, atol=TOL
        )
        np.testing.assert_allclose(
            metrics.module_degree_zscore(W, ci), bct.module_degree_zscore(W, ci), rtol=0, atol=TOL
        )


@pytest.mark.parametrize("density", [0.0, 0.05, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_threshold_proportional_matches_bct(graphs, density):
    for W in graphs:
        np.testing.assert_array_equal(
            metrics.threshold_proportional(W, density), bct.threshold_proportional(W, density)
        )


def test_threshold_proportional_breaks_ties_in_row_major_order():
    # five equal upper-triangle weights; density 0.4 of 10 possible edges keeps 4 links:
    # the 0.9 edge, then the first three 0.5 edges in row-major order
    W = np.zeros((5, 5))
    for i, j in [(0, 1), (0, 3), (1, 2), (2, 4), (3, 4)]:
        W[i, j] = W[j, i] = 0.5
    W[1, 4] = W[4, 1] = 0.9
    out = metrics.threshold_proportional(W, 0.4)
    kept = sorted(zip(*np.nonzero(np.triu(out)), strict=True))
    assert [(int(i), int(j)) for i, j in kept] == [(0, 1), (0, 3), (1, 2), (1, 4)]
    assert np.array_equal(out, out.T)


def test_threshold_matrix_records_what_it_did():
    M = np.array(
        [
            [1.0, 0.8, -0.2, 0.4],
            [0.8, 1.0, 0.6, -0.1],
            [-0.2, 0.6, 1.0, 0.2],
            [0.4, -0.1, 0.2, 1.0],
        ]
    )
    W, info = metrics.threshold_matrix(M)
    expected = np.array([[0, 0.8, 0, 0.4], [0.8, 0, 0.6, 0], [0, 0.6, 0, 0.2], [0.4, 0, 0.2, 0]])
    np.testing.assert_array_equal(W, expected)
    assert info == {
        "method": "weighted",
        "density": None,
        "normalize": False,
        "scale": 1.0,
        "negative_weights": "set_to_zero",
        "n_negative_set_to_zero": 2,
        "diagonal": "set_to_zero",
        "n_nodes": 4,
        "n_edges": 4,
    }
    # density 0.5 of 6 possible edges keeps the 3 strongest; normalised by 0.8 first
    W, info = metrics.threshold_matrix(M, density=0.5, normalize=True)
    kept = np.array([[0, 1.0, 0, 0.5], [1.0, 0, 0.75, 0], [0, 0.75, 0, 0], [0.5, 0, 0, 0]])
    np.testing.assert_allclose(W, kept, rtol=0, atol=1e-15)
    assert (info["method"], info["density"], info["scale"], info["n_edges"]) == (
        "proportional",
        0.5,
        0.8,
        3,
    )


def test_graph_measures_reject_bad_input():
    W = np.array([[0, 1.0, 0], [1.0, 0, -0.5], [0, -0.5, 0]])
    with pytest.raises(ValueError, match="negative"):
        metrics.clustering_coef(W)
    with pytest.raises(ValueError, match="symmetric"):
        metrics.strength(np.array([[0, 1.0], [0.5, 0]]))
    with pytest.raises(ValueError, match="square"):
        metrics.strength(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="density"):
        metrics.threshold_proportional(np.zeros((3, 3)), 1.5)


# --------------------------------------------------------------------------- communities


def nx_modularity(W: np.ndarray, partition: np.ndarray) -> float:
    graph = nx.from_numpy_array(W)
    communities = [set(np.flatnonzero(partition == m).tolist()) for m in np.unique(partition)]
    return nx.community.modularity(graph, communities, weight="weight")


def test_modularity_matches_networkx(graphs, rng):
    for W in graphs:
        ci = rng.integers(0, 4, len(W))
        assert metrics.modularity(W, ci) == pytest.approx(nx_modularity(W, ci), abs=1e-12)


def test_louvain_q_is_the_modularity_of_its_partition(graphs):
    for W in graphs:
        ci, q = metrics.community_louvain(W, seed=5)
        assert q == pytest.approx(nx_modularity(W, ci), abs=1e-12)
        assert q > 0


def test_louvain_reproduces_bct_move_for_move(graphs):
    # same RandomState stream -> same visiting order -> identical partition and Q
    for W in graphs:
        for k in range(5):
            ours, q_ours = metrics.community_louvain(W, seed=np.random.RandomState(k))
            ref, q_ref = bct.community_louvain(W, seed=np.random.RandomState(k))
            np.testing.assert_array_equal(ours, ref)
            assert q_ours == pytest.approx(q_ref, abs=1e-12)


def test_louvain_recovers_strong_planted_modules(rng):
    W, labels = planted_blocks(rng, (7, 8, 9, 6), within=0.8, between=0.05, noise=0.02)
    for seed in range(5):
        ci, q = metrics.community_louvain(W, seed=seed)
        assert same_partition(ci, labels)
        assert q == pytest.approx(metrics.modularity(W, labels), abs=1e-12)


def test_louvain_is_deterministic(graphs):
    W = graphs[0]
    a, qa = metrics.community_louvain(W, seed=3)
    b, qb = metrics.community_louvain(W, seed=3)
    assert np.array_equal(a, b) and qa == qb


def test_consensus_recovers_planted_modules_from_noisy_runs():
    W, labels = planted_blocks(
        np.random.default_rng(3), (7, 8, 9, 6), within=0.5, between=0.2, noise=0.2
    )
    single = {tuple(metrics._canonical(metrics.community_louvain(W, seed=s)[0])) for s in range(30)}
    assert len(single) > 1  # single runs disagree, so the consensus has work to do
    ci, q = metrics.consensus_partition(W, n_repeats=50, seed=0)
    np.testing.assert_array_equal(ci, metrics._canonical(labels))
    assert q == pytest.approx(nx_modularity(W, labels), abs=1e-12)
    again, q_again = metrics.consensus_partition(W, n_repeats=50, seed=0)
    assert np.array_equal(ci, again) and q == q_again


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # bct.agreement uses np.sum(gen)
def test_agreement_counts_shared_modules():
    parts = [np.array([1, 1, 2, 2]), np.array([1, 2, 2, 2]), np.array([5, 5, 5, 1])]
    expected = np.array([[0, 2, 1, 0], [2, 0, 2, 1], [1, 2, 0, 2], [0, 1, 2, 0]])
    np.testing.assert_array_equal(metrics.agreement(parts), expected)
    np.testing.assert_array_equal(metrics.agreement(parts), bct.agreement(np.array(parts).T))


# --------------------------------------------------------------------------- network means


# Five nodes: A = {0, 1}, B = {2, 3, 4}; edge (1, 4) missing (NaN).
HAND = np.array(
    [
        [1.0, 0.5, 0.1, 0.2, 0.3],
        [0.5, 1.0, 0.4, -0.2, np.nan],
        [0.1, 0.4, 1.0, 0.6, 0.8],
        [0.2, -0.2, 0.6, 1.0, 0.7],
        [0.3, np.nan, 0.8, 0.7, 1.0],
    ]
)


def test_network_connectivity_hand_example():
    table = metrics.network_connectivity(HAND, list("AABBB"))
    assert table[["network_a", "network_b"]].values.tolist() == [["A", "A"], ["A", "B"], ["B", "B"]]
    # within A: the single edge 0.5; between: (0.1 + 0.2 + 0.3 + 0.4 - 0.2) / 5, the NaN
    # edge (1, 4) ignored; within B: (0.6 + 0.8 + 0.7) / 3
    np.testing.assert_allclose(table["value"], [0.5, 0.16, 0.7], rtol=0, atol=1e-15)


def test_network_connectivity_single_node_network_is_nan():
    table = metrics.network_connectivity(HAND, list("AABBC"))
    values = dict(zip(zip(table.network_a, table.network_b, strict=True), table.value, strict=True))
    assert np.isnan(values[("C", "C")])
    assert values[("B", "B")] == pytest.approx(0.6)
    assert values[("B", "C")] == pytest.approx((0.8 + 0.7) / 2)
    assert values[("A", "C")] == pytest.approx(0.3)  # (0.3 + NaN) -> 0.3


def test_anchored_connectivity_hand_example():
    nodes = pd.DataFrame(
        {
            "name": ["L_Hippocampus", "ctx_a", "R_hippocampus", "ctx_b", "ctx_c"],
            "network": list("AABBB"),
        }
    )
    anchor = metrics.select_nodes(nodes, metrics.DEFAULT_ANCHORS["hippocampus"])
    assert anchor.tolist() == [True, False, True, False, False]
    table = metrics.anchored_connectivity(HAND, anchor, nodes["network"])
    # A: anchors {0, 2} to non-anchor A node 1: (0.5 + 0.4) / 2
    # B: anchors {0, 2} to non-anchor B nodes {3, 4}: (0.2 + 0.3 + 0.6 + 0.8) / 4
    assert table["network"].tolist() == ["A", "B"]
    np.testing.assert_allclose(table["value"], [0.45, 0.475], rtol=0, atol=1e-15)
    none = metrics.anchored_connectivity(HAND, np.zeros(5, bool), nodes["network"])
    assert none["value"].isna().all()


# --------------------------------------------------------------------------- tidy table


def atlas_nodes(n: int, rng: np.random.Generator) -> pd.DataFrame:
    network = rng.choice(["Default", "Salience", "Visual"], size=n)
    anatomy = np.where(np.arange(n) % 9 == 2, "hippocampus", "cortexL")
    return pd.DataFrame(
        {
            "index": np.arange(1, n + 1),
            "name": [f"roi{i:02d}" for i in range(n)],
            "network": network,
            "anatomy": anatomy,
        }
    )


def fc_like(rng: np.random.Generator, n: int) -> np.ndarray:
    X = rng.standard_normal((n, 60)) + 0.8 * rng.standard_normal((1, 60))
    return np.corrcoef(X)


def test_network_metrics_values_and_layout(rng):
    n = 20
    M = fc_like(rng, n)
    nodes = atlas_nodes(n, rng)
    table = metrics.network_metrics(M, nodes, n_consensus=20)
    assert list(table.columns) == list(metrics.TIDY_COLUMNS)
    W, _ = metrics.threshold_matrix(M)

    def node_values(metric):
        rows = table[(table.metric == metric) & (table.scope == "node")]
        assert rows["node"].tolist() == nodes["name"].tolist()
        return rows["value"].to_numpy()

    np.testing.assert_allclose(node_values("strength"), bct.strengths_und(W), atol=TOL)
    np.testing.assert_allclose(node_values("clustering"), bct.clustering_coef_wu(W), atol=TOL)
    np.testing.assert_allclose(
        node_values("local_efficiency"), bct.efficiency_wei(W, local=True), atol=TOL
    )
    ci = node_values("module").astype(int)
    np.testing.assert_allclose(
        node_values("participation"), bct.participation_coef(W, ci), atol=TOL
    )
    net = nodes["network"].to_numpy()
    np.testing.assert_allclose(
        node_values("module_degree_zscore_atlas"), bct.module_degree_zscore(W, net), atol=TOL
    )
    glob = table[table.scope == "global"].set_index("metric")["value"]
    assert glob["global_efficiency"] == pytest.approx(bct.efficiency_wei(W), abs=TOL)
    assert glob["modularity"] == pytest.approx(nx_modularity(W, ci), abs=1e-12)
    assert glob["n_modules"] == len(np.unique(ci))
    # network summary = mean of the node values of that network
    dmn = table[(table.metric == "strength") & (table.scope == "network")].set_index("network")
    assert dmn.loc["Default", "value"] == pytest.approx(
        bct.strengths_und(W)[net == "Default"].mean()
    )
    # connectivity rows are the raw signed means
    conn = table[table.metric == "connectivity"]
    ref = metrics.network_connectivity(M, net)
    np.testing.assert_array_equal(conn["value"].to_numpy(), ref["value"].to_numpy())
    anchored = table[
        (table.metric == "anchored_connectivity") & (table.network == "hippocampus")
    ].set_index("network_b")
    hippo = nodes["anatomy"].eq("hippocampus").to_numpy()
    expected = M[np.ix_(hippo, (net == "Visual") & ~hippo)].mean()
    assert anchored.loc["Visual", "value"] == pytest.approx(expected, abs=1e-15)
    assert table.attrs["provenance"]["method"] == "weighted"


def test_network_metrics_drops_nan_nodes(rng):
    n = 18
    M = fc_like(rng, n)
    nodes = atlas_nodes(n, rng)
    dropped = [3, 11]
    M_nan = M.copy()
    M_nan[dropped, :] = np.nan
    M_nan[:, dropped] = np.nan
    keep = np.setdiff1d(np.arange(n), dropped)
    full = metrics.network_metrics(M_nan, nodes, threshold=0.4, n_consensus=10, seed=2)
    sub = metrics.network_metrics(
        M[np.ix_(keep, keep)],
        nodes.iloc[keep].reset_index(drop=True),
        threshold=0.4,
        n_consensus=10,
        seed=2,
    )
    node_rows = full[full.scope == "node"]
    gone = node_rows["node"].isin(nodes["name"].iloc[dropped])
    assert node_rows.loc[gone, "value"].isna().all()
    assert gone.sum() == len(dropped) * len(metrics.NODE_METRICS)
    sub_nodes = sub[sub.scope == "node"].reset_index(drop=True)
    pd.testing.assert_frame_equal(node_rows[~gone].reset_index(drop=True), sub_nodes)
    for scope in ("global", "network", "network_pair", "anchor_network"):
        a = full[(full.scope == scope) & (full.metric != "n_nodes_dropped")]
        b = sub[(sub.scope == scope) & (sub.metric != "n_nodes_dropped")]
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    glob = full[full.scope == "global"].set_index("metric")["value"]
    assert glob["n_nodes_dropped"] == 2
    prov = full.attrs["provenance"]
    assert prov["dropped_nodes"] == ["roi03", "roi11"]
    assert (prov["method"], prov["density"], prov["n_nodes"]) == ("proportional", 0.4, 16)
    assert prov["n_edges"] == round(16 * 15 / 2 * 0.4)


def test_network_metrics_is_deterministic(rng):
    M = fc_like(rng, 15)
    nodes = atlas_nodes(15, rng)
    a = metrics.network_metrics(M, nodes, n_consensus=10, seed=7)
    b = metrics.network_metrics(M, nodes, n_consensus=10, seed=7)
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_network_metrics_clear_errors(rng):
    M = fc_like(rng, 6)
    with pytest.raises(ValueError, match="5 rows but the matrix has 6"):
        metrics.network_metrics(M, atlas_nodes(5, rng))
    M[1, 2] = M[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"isolated NaN edges.*\(1, 2\)"):
        metrics.network_metrics(M, atlas_nodes(6, rng))


def test_consensus_edge_cases(rng):
    W, labels = planted_blocks(rng, (5, 6, 7), within=0.8, between=0.05, noise=0.02)
    # nothing agrees above tau > 1: every node becomes its own module
    ci, _ = metrics.consensus_partition(W, n_repeats=5, tau=1.01)
    np.testing.assert_array_equal(ci, np.arange(1, 19))
    # no rounds allowed: warn and fall back to the most frequent Louvain partition
    with pytest.warns(RuntimeWarning, match="did not converge"):
        ci, q = metrics.consensus_partition(W, n_repeats=5, max_iter=0)
    assert same_partition(ci, labels)
    assert q == pytest.approx(nx_modularity(W, labels), abs=1e-12)
