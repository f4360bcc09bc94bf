"""Network metrics of functional and structural connectivity matrices.

Every graph measure reproduces the Brain Connectivity Toolbox (Rubinov & Sporns 2010, as
ported in ``bctpy``) on weighted undirected matrices; the tests check agreement to 1e-8.

Conventions
-----------
* Matrices are square and symmetric.  A parcel without signal (poor coverage) appears as a
  row/column of NaN: such nodes are dropped before any graph measure, and every per-node
  output for them is NaN (see :func:`valid_nodes`).  NaN scattered inside otherwise valid
  rows is an error, because there is no principled way to guess a single missing edge.
* Graph measures run on a *prepared* matrix (:func:`threshold_matrix`): diagonal set to 0,
  negative weights set to 0, optionally scaled to a maximum of 1 and optionally
  proportionally thresholded.  What was done is returned as a dict for provenance.
* Distances come from weights by inverse length (``length = 1 / weight``).
* Network means (:func:`network_connectivity`, :func:`anchored_connectivity`) describe the
  raw, signed matrix: negative correlations are part of the mean there.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.sparse.csgraph import shortest_path

#: Columns of every tidy table this module (and :mod:`pipeline.coupling`) returns.
TIDY_COLUMNS = ("metric", "scope", "network", "network_b", "node", "value")

#: Default anchor regions for :func:`anchored_connectivity`: label -> regular expression
#: matched (case-insensitively) against the atlas ``anatomy`` and ``name`` columns.
DEFAULT_ANCHORS: dict[str, str] = {
    "hippocampus": r"hippocamp",
    "amygdala": r"amygdal",
    "subgenual_cingulate": r"subgenual|sgACC|\bBA25\b|\bCg25\b",
}

# Same tolerance as BCT: a move must raise modularity by more than this to count.
_LOUVAIN_TOL = 1e-10
_LOUVAIN_MAX_PASSES = 1000

RandomSeed = int | np.random.Generator | np.random.RandomState


# --------------------------------------------------------------------------- validation


def _square(matrix: np.ndarray, what: str = "matrix") -> np.ndarray:
    W = np.array(matrix, dtype=float)  # always a copy: callers may edit it
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"{what} must be a square 2-D array, got shape {W.shape}.")
    return W


def _graph(W: np.ndarray, what: str = "matrix") -> np.ndarray:
    """Check a prepared graph: square, finite, symmetric, non-negative."""
    W = _square(W, what)
    if not np.isfinite(W).all():
        raise ValueError(
            f"{what} contains NaN/inf; drop nodes without signal first "
            "(valid_nodes) and prepare the matrix with threshold_matrix."
        )
    if not np.allclose(W, W.T):
        raise ValueError(f"{what} is not symmetric; graph measures here are undirected.")
    if (W < 0).any():
        raise ValueError(
            f"{what} has negative weights; set them to 0 first (threshold_matrix does)."
        )
    return W


def valid_nodes(matrix: np.ndarray) -> np.ndarray:
    """Return a boolean mask of nodes that carry data.

    A node is invalid when all its off-diagonal entries in its row are NaN (a parcel
    without signal).  The remaining submatrix must be free of NaN.

    Parameters
    ----------
    matrix : (n, n) array

    Returns
    -------
    (n,) bool array

    Raises
    ------
    ValueError
        If NaN remains between valid nodes (isolated missing edges).
    """
    W = _square(matrix)
    n = len(W)
    off = ~np.eye(n, dtype=bool)
    missing = np.isnan(W) & off
    keep = ~(missing.sum(axis=1) == n - 1) if n > 1 else np.ones(n, dtype=bool)
    sub = W[np.ix_(keep, keep)]
    sub_off = ~np.eye(int(keep.sum()), dtype=bool)
    if np.isnan(sub[sub_off]).any():
        rows, cols = np.nonzero(np.isnan(sub) & sub_off)
        idx = np.flatnonzero(keep)
        pairs = list(zip(idx[rows].tolist(), idx[cols].tolist(), strict=True))[:5]
        raise ValueError(
            f"the matrix has isolated NaN edges between nodes with data, e.g. {pairs}; "
            "only whole NaN rows/columns (parcels without signal) are supported. "
            "Recompute the matrix or set those parcels' whole rows to NaN."
        )
    return keep


def _spread(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Put per-node values of the kept nodes back at full size, NaN elsewhere."""
    out = np.full(keep.shape, np.nan)
    out[keep] = values
    return out


# --------------------------------------------------------------------------- thresholding


def _round_half_up(x: float) -> int:
    # MATLAB-style round, as bctpy's teachers_round, so edge counts match BCT.
    return int(np.ceil(x)) if x % 1 >= 0.5 else int(np.floor(x))


def threshold_proportional(W: np.ndarray, density: float) -> np.ndarray:
    """Keep the strongest ``density`` fraction of all possible edges of a symmetric matrix.

    Matches ``bct.threshold_proportional`` on symmetric input: the diagonal is cleared,
    ``round((n**2 - n) * density / 2)`` upper-triangle links with the largest weights are
    kept (zeros never count as links) and mirrored.  Ties are broken deterministically by
    keeping the earlier edge in row-major upper-triangle order.

    Parameters
    ----------
    W : (n, n) array
        Symmetric weighted matrix without NaN.
    density : float
        Fraction in [0, 1] of the ``n * (n - 1) / 2`` possible edges to keep.

    Returns
    -------
    (n, n) array
    """
    W = _square(W)
    if not 0 <= density <= 1:
        raise ValueError(f"density must be within [0, 1], got {density}.")
    if not np.isfinite(W).all() or not np.allclose(W, W.T):
        raise ValueError("threshold_proportional needs a finite symmetric matrix.")
    n = len(W)
    rows, cols = np.triu_indices(n, 1)
    values = W[rows, cols]
    links = np.flatnonzero(values)
    order = links[np.argsort(-values[links], kind="stable")]
    kept = order[: _round_half_up((n * n - n) * density / 2)]
    out = np.zeros_like(W)
    out[rows[kept], cols[kept]] = values[kept]
    return out + out.T


def threshold_matrix(
    matrix: np.ndarray, *, density: float | None = None, normalize: bool = False
) -> tuple[np.ndarray, dict]:
    """Prepare a connectivity matrix for graph measures and describe what was done.

    Steps, in order: diagonal -> 0; negative weights -> 0; if ``normalize``, divide by
    the largest weight (BCT measures such as clustering assume weights in [0, 1]); if
    ``density`` is given, :func:`threshold_proportional`.

    Parameters
    ----------
    matrix : (n, n) array
        Symmetric matrix without NaN (drop empty parcels with :func:`valid_nodes`).
    density : float, optional
        Proportional threshold; None (default) keeps every positive weight.
    normalize : bool, default=False
        Scale weights so the largest is 1 (advisable for streamline counts).

    Returns
    -------
    W : (n, n) array
        Non-negative, symmetric, zero diagonal.
    info : dict
        Provenance: ``method`` ("weighted" or "proportional"), ``density``,
        ``normalize``, ``scale`` (divisor used, 1.0 when not normalised),
        ``negative_weights`` and ``n_negative_set_to_zero`` (upper-triangle count),
        ``diagonal``, ``n_nodes`` and ``n_edges`` (kept undirected edges).
    """
    W = _square(matrix)
    if not np.isfinite(W).all():
        raise ValueError(
            "threshold_matrix got NaN/inf; drop nodes without signal first (valid_nodes)."
        )
    if not np.allclose(W, W.T):
        raise ValueError("threshold_matrix needs a symmetric matrix.")
    np.fill_diagonal(W, 0)
    upper = np.triu(np.ones(W.shape, dtype=bool), 1)
    n_negative = int((W[upper] < 0).sum())
    W[W < 0] = 0
    scale = 1.0
    if normalize and W.max() > 0:
        scale = float(W.max())
        W = W / scale
    if density is not None:
        W = threshold_proportional(W, density)
    info = {
        "method": "weighted" if density is None else "proportional",
        "density": None if density is None else float(density),
        "normalize": bool(normalize),
        "scale": scale,
        "negative_weights": "set_to_zero",
        "n_negative_set_to_zero": n_negative,
        "diagonal": "set_to_zero",
        "n_nodes": len(W),
        "n_edges": int((W[upper] != 0).sum()),
    }
    return W, info


# --------------------------------------------------------------------------- node measures


def strength(W: np.ndarray) -> np.ndarray:
    """Node strength: the sum of a node's weights (``bct.strengths_und``).

    Parameters
    ----------
    W : (n, n) array
        Prepared weighted undirected matrix.

    Returns
    -------
    (n,) array
    """
    return _graph(W).sum(axis=0)


def _lengths(W: np.ndarray) -> np.ndarray:
    L = np.zeros_like(W)
    nz = W != 0
    L[nz] = 1.0 / W[nz]
    return L


def _inverse_distance(L: np.ndarray) -> np.ndarray:
    """Inverse shortest-path lengths; 0 on the diagonal and between disconnected nodes."""
    D = shortest_path(L, directed=True)  # dense input: zero entries are non-edges
    with np.errstate(divide="ignore"):
        E = 1.0 / D
    E[~np.isfinite(D)] = 0
    np.fill_diagonal(E, 0)
    return E


def global_efficiency(W: np.ndarray) -> float:
    """Weighted global efficiency (``bct.efficiency_wei(W)``).

    The mean inverse shortest-path length over ordered node pairs, lengths ``1 / w``.

    Parameters
    ----------
    W : (n, n) array
        Prepared weighted undirected matrix.

    Returns
    -------
    float
        NaN for fewer than two nodes.
    """
    W = _graph(W)
    n = len(W)
    if n < 2:
        return float("nan")
    return float(_inverse_distance(_lengths(W)).sum() / (n * n - n))


def local_efficiency(W: np.ndarray) -> np.ndarray:
    """Weighted local efficiency (``bct.efficiency_wei(W, local=True)``).

    The Wang et al. (2016) form BCT uses: for node ``u`` with neighbours ``V`` (``k`` of
    them), ``E_u = sum_{j != h in V} (w_uj w_uh)^(1/3) / d_jh / (k (k - 1))``, where
    ``d_jh`` is the shortest path between ``j`` and ``h`` inside the neighbourhood with
    cube-rooted lengths ``(1 / w)^(1/3)``.  Nodes with fewer than two neighbours get 0.

    Parameters
    ----------
    W : (n, n) array
        Prepared weighted undirected matrix.

    Returns
    -------
    (n,) array
    """
    W = _graph(W)
    cube_w = np.cbrt(W)
    cube_l = np.cbrt(_lengths(W))
    out = np.zeros(len(W))
    for u in range(len(W)):
        nb = np.flatnonzero(W[u])
        k = len(nb)
        if k < 2:
            continue
        e = _inverse_distance(cube_l[np.ix_(nb, nb)])
        out[u] = cube_w[u, nb] @ e @ cube_w[u, nb] / (k * (k - 1))
    return out


def clustering_coef(W: np.ndarray) -> np.ndarray:
    """Weighted clustering coefficient of Onnela et al. (2005) (``bct.clustering_coef_wu``).

    ``C_u = sum_jh (w_uj w_jh w_hu)^(1/3) / (k_u (k_u - 1))`` with ``k_u`` the binary
    degree; 0 for nodes in no triangle.

    Parameters
    ----------
    W : (n, n) array
        Prepared weighted undirected matrix (weights in [0, 1] for values in [0, 1]).

    Returns
    -------
    (n,) array
    """
    W = _graph(W)
    degree = (W != 0).sum(axis=1).astype(float)
    ws = np.cbrt(W)
    cycles = np.einsum("ij,jk,ki->i", ws, ws, ws)
    out = np.zeros(len(W))
    has = cycles != 0
    out[has] = cycles[has] / (degree[has] * (degree[has] - 1))
    return out


# --------------------------------------------------------------------------- communities


def _rng(seed: RandomSeed) -> np.random.Generator | np.random.RandomState:
    if isinstance(seed, (np.random.Generator, np.random.RandomState)):
        return seed
    return np.random.default_rng(seed)


def _canonical(partition: np.ndarray) -> np.ndarray:
    """Relabel modules 1, 2, ... in order of first appearance (labels become comparable)."""
    _, first, inverse = np.unique(partition, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=int)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse] + 1


def modularity(W: np.ndarray, partition: Sequence[int], gamma: float = 1.0) -> float:
    """Newman's weighted modularity ``Q`` of a partition.

    ``Q = 1/s * sum_ij (w_ij - gamma k_i k_j / s) [c_i == c_j]`` with ``s = sum_ij w_ij``.

    Parameters
    ----------
    W : (n, n) array
        Prepared weighted undirected matrix.
    partition : (n,) sequence of int
        Module of each node.
    gamma : float, default=1.0
        Resolution.

    Returns
    -------
    float
        NaN for a graph without edges.
    """
    W = _graph(W)
    ci = np.asarray(partition)
    if ci.shape != (len(W),):
        raise ValueError(f"partition has shape {ci.shape}; expected ({len(W)},).")
    s = W.sum()
    if s == 0:
        return float("nan")
    k = W.sum(axis=1)
    same = ci[:, None] == ci[None, :]
    return float(((W - gamma * np.outer(k, k) / s) * same).sum() / s)


def community_louvain(
    W: np.ndarray, *, gamma: float = 1.0, seed: RandomSeed = 0
) -> tuple[np.ndarray, float]:
    """Louvain modularity maximisation (``bct.community_louvain``, modularity objective).

    Nodes are visited in a random order (from ``seed``) and moved to the module giving
    the largest modularity gain (above 1e-10); moves repeat until none helps, modules are
    then merged into nodes and the procedure repeats until no level changes anything.

    Parameters
    ----------
    W : (n, n) array
        Prepared weighted undirected matrix (non-negative).
    gamma : float, default=1.0
        Resolution.
    seed : int, numpy Generator or RandomState, default=0
        Randomness of the visiting order.  An int gives a fresh ``default_rng(seed)``;
        passing ``numpy.random.RandomState(k)`` reproduces ``bct.community_louvain(W,
        seed=k)`` move for move.

    Returns
    -------
    partition : (n,) int array
        Modules numbered from 1 (numbering as BCT's).
    q : float
        Modularity of the partition (NaN for a graph without edges).
    """
    W = _graph(W)
    rng = _rng(seed)
    n = len(W)
    s = W.sum()
    if s == 0:
        return np.arange(1, n + 1), float("nan")
    k = W.sum(axis=1)
    B = W - gamma * np.outer(k, W.sum(axis=0)) / s
    ci = np.arange(n)
    level = B
    while True:
        m = len(level)
        module = np.arange(m)
        to_module = level.copy()  # node-to-module sums of B
        moved = False
        for _ in range(_LOUVAIN_MAX_PASSES):
            changed = False
            for u in rng.permutation(m):
                ma = module[u]
                gain = to_module[u] - to_module[u, ma]
                gain += level[u, u]
                gain[ma] = 0
                mb = gain.argmax()
                if gain[mb] > _LOUVAIN_TOL:
                    to_module[:, mb] += level[:, u]
                    to_module[:, ma] -= level[:, u]
                    module[u] = mb
                    changed = moved = True
            if not changed:
                break
        else:
            raise RuntimeError("Louvain did not converge; is the matrix symmetric?")
        if not moved:
            break
        _, module = np.unique(module, return_inverse=True)
        ci = module[ci]
        member = np.zeros((m, module.max() + 1))
        member[np.arange(m), module] = 1
        level = member.T @ level @ member
    q = float(B[ci[:, None] == ci[None, :]].sum() / s)
    return ci + 1, q


def agreement(partitions: Sequence[np.ndarray]) -> np.ndarray:
    """Count how often each pair of nodes shares a module (``bct.agreement``).

    Parameters
    ----------
    partitions : sequence of (n,) int arrays

    Returns
    -------
    (n, n) array
        Counts, zero diagonal.
    """
    P = np.asarray(partitions)
    D = (P[:, :, None] == P[:, None, :]).sum(axis=0).astype(float)
    np.fill_diagonal(D, 0)
    return D


def consensus_partition(
    W: np.ndarray,
    *,
    n_repeats: int = 100,
    tau: float = 0.5,
    gamma: float = 1.0,
    seed: RandomSeed = 0,
    max_iter: int = 100,
) -> tuple[np.ndarray, float]:
    """Consensus of repeated Louvain runs (Lancichinetti & Fortunato 2012; ``bct.consensus_und``).

    ``n_repeats`` Louvain partitions of ``W`` give an agreement matrix (fraction of runs
    two nodes share a module).  It is thresholded at ``tau`` and re-partitioned
    ``n_repeats`` times (gamma 1) until every run returns the same partition.  As in
    BCT, nodes left without agreement above ``tau`` stay singletons.  The re-partitioning
    uses :func:`community_louvain` (BCT uses ``modularity_louvain_und_sign``, which
    optimises the same objective on non-negative input).  All randomness comes from one
    generator seeded with ``seed``.

    Parameters
    ----------
    W : (n, n) array
        Prepared weighted undirected matrix.
    n_repeats : int, default=100
        Louvain runs per round.
    tau : float, default=0.5
        Agreement threshold.
    gamma : float, default=1.0
        Resolution of the runs on ``W``.
    seed : int, numpy Generator or RandomState, default=0
    max_iter : int, default=100
        Rounds before giving up; then the most frequent partition of the last round is
        returned with a ``RuntimeWarning``.

    Returns
    -------
    partition : (n,) int array
        Modules numbered from 1 in order of first appearance.
    q : float
        Modularity of the partition on ``W`` (with ``gamma``).
    """
    W = _graph(W)
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be at least 1, got {n_repeats}.")
    rng = _rng(seed)
    runs = [_canonical(community_louvain(W, gamma=gamma, seed=rng)[0]) for _ in range(n_repeats)]
    for _ in range(max_iter):
        share = agreement(runs) / n_repeats
        share = np.where(share >= tau, share, 0.0)
        if not share.any():
            final = np.arange(1, len(W) + 1)
            break
        runs = [_canonical(community_louvain(share, seed=rng)[0]) for _ in range(n_repeats)]
        if all(np.array_equal(runs[0], r) for r in runs[1:]):
            final = runs[0]
            break
    else:
        warnings.warn(
            f"consensus clustering did not converge in {max_iter} rounds; "
            "returning the most frequent partition of the last round.",
            RuntimeWarning,
            stacklevel=2,
        )
        unique, counts = np.unique(np.asarray(runs), axis=0, return_counts=True)
        final = unique[int(np.argmax(counts))]
    return final, modularity(W, final, gamma)


def participation_coef(W: np.ndarray, partition: Sequence[int]) -> np.ndarray:
    """Participation coefficient (``bct.participation_coef``, undirected).

    ``P_i = 1 - sum_m (k_im / k_i)^2`` with ``k_im`` the strength of node ``i`` into
    module ``m``; 0 for nodes without edges.

    Parameters
    ----------
    W : (n, n) array
        Prepared weighted undirected matrix.
    partition : (n,) sequence
        Module (any labels) of each node.

    Returns
    -------
    (n,) array
    """
    W = _graph(W)
    ci = np.asarray(partition)
    k = W.sum(axis=1)
    to_module = np.stack([W[:, ci == m].sum(axis=1) for m in np.unique(ci)], axis=1)
    out = np.zeros(len(W))
    has = k != 0
    out[has] = 1 - (to_module[has] ** 2).sum(axis=1) / k[has] ** 2
    return out


def module_degree_zscore(W: np.ndarray, partition: Sequence[int]) -> np.ndarray:
    """Within-module degree z-score (``bct.module_degree_zscore``, undirected).

    The strength of a node within its module, z-scored over the module's nodes with the
    population standard deviation (``ddof=0``, as bctpy); 0 where that deviation is 0
    (e.g. single-node modules).

    Parameters
    ----------
    W : (n, n) array
        Prepared weighted undirected matrix.
    partition : (n,) sequence
        Module (any labels) of each node.

    Returns
    -------
    (n,) array
    """
    W = _graph(W)
    ci = np.asarray(partition)
    out = np.zeros(len(W))
    for m in np.unique(ci):
        members = ci == m
        within = W[np.ix_(members, members)].sum(axis=1)
        sd = within.std()
        if sd > 0:
            out[members] = (within - within.mean()) / sd
    return out


# --------------------------------------------------------------------------- network means


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def network_connectivity(matrix: np.ndarray, networks: Sequence[str]) -> pd.DataFrame:
    """Mean connectivity within each network and between each pair of networks.

    Within: mean of the upper-triangle edges among the network's nodes (diagonal
    excluded).  Between: mean over all pairs with one node in each network.  NaN entries
    are ignored; a network with one node, or with only NaN edges, gives NaN.

    Parameters
    ----------
    matrix : (n, n) array
        Symmetric connectivity (signed values are averaged as they are).
    networks : (n,) sequence of str
        Network label per node.

    Returns
    -------
    pandas.DataFrame
        Columns ``network_a, network_b, value``; one row per unordered pair in sorted
        label order, ``network_a <= network_b`` (equal for within-network rows).
    """
    M = _square(matrix)
    labels = np.asarray(networks).astype(str)
    if labels.shape != (len(M),):
        raise ValueError(f"got {labels.size} network labels for a {len(M)}-node matrix.")
    names = sorted(set(labels.tolist()))
    rows = []
    for i, a in enumerate(names):
        ia = np.flatnonzero(labels == a)
        sub = M[np.ix_(ia, ia)]
        rows.append((a, a, _nanmean(sub[np.triu_indices(len(ia), 1)])))
        for b in names[i + 1 :]:
            rows.append((a, b, _nanmean(M[np.ix_(ia, labels == b)].ravel())))
    return pd.DataFrame(rows, columns=["network_a", "network_b", "value"])


def select_nodes(
    nodes: pd.DataFrame, pattern: str, columns: Sequence[str] = ("anatomy", "name")
) -> np.ndarray:
    """Boolean mask of atlas rows whose ``columns`` match a regular expression.

    Parameters
    ----------
    nodes : pandas.DataFrame
        Atlas table, one row per node.
    pattern : str
        Regular expression, matched case-insensitively anywhere in the text.
    columns : sequence of str, default=("anatomy", "name")
        Columns searched (those absent are skipped).

    Returns
    -------
    (n,) bool array
    """
    present = [c for c in columns if c in nodes.columns]
    if not present:
        raise ValueError(
            f"the atlas table has none of the columns {list(columns)} to select nodes by."
        )
    regex = re.compile(pattern, re.IGNORECASE)
    mask = np.zeros(len(nodes), dtype=bool)
    for column in present:
        text = nodes[column].astype(str).to_numpy()
        mask |= np.array([regex.search(t) is not None for t in text], dtype=bool)
    return mask


def anchored_connectivity(
    matrix: np.ndarray, anchor: np.ndarray, networks: Sequence[str]
) -> pd.DataFrame:
    """Mean connectivity between a set of anchor (seed) nodes and each network.

    For network ``N`` the mean is over pairs ``(a, j)`` with ``a`` an anchor and ``j`` a
    non-anchor node of ``N`` (anchor-anchor pairs and self-connections excluded); NaN
    entries are ignored.  No anchors, or no such pairs, give NaN.

    Parameters
    ----------
    matrix : (n, n) array
        Symmetric connectivity.
    anchor : (n,) bool array
        Anchor nodes, e.g. from :func:`select_nodes`.
    networks : (n,) sequence of str
        Network label per node.

    Returns
    -------
    pandas.DataFrame
        Columns ``network, value`` in sorted network order.
    """
    M = _square(matrix)
    labels = np.asarray(networks).astype(str)
    anchor = np.asarray(anchor, dtype=bool)
    if labels.shape != (len(M),) or anchor.shape != (len(M),):
        raise ValueError("anchor mask and network labels must have one entry per node.")
    rows = [
        (name, _nanmean(M[np.ix_(anchor, (labels == name) & ~anchor)].ravel()))
        for name in sorted(set(labels.tolist()))
    ]
    return pd.DataFrame(rows, columns=["network", "value"])


# --------------------------------------------------------------------------- tidy table


@dataclass(frozen=True)
class _Graph:
    """Everything a metric function may need, computed once per matrix."""

    raw: np.ndarray  # full matrix as given (NaN rows kept), for network means
    W: np.ndarray  # prepared graph of the kept nodes
    keep: np.ndarray  # (n,) bool
    networks: np.ndarray  # (n,) str
    names: np.ndarray  # (n,) str
    partition: np.ndarray  # consensus modules of kept nodes
    q: float
    anchors: Mapping[str, np.ndarray]  # label -> (n,) bool


@dataclass(frozen=True)
class _NodeMetric:
    func: Callable[[_Graph], np.ndarray]
    summarise: bool = True  # also report the mean per network


def _atlas_partition(g: _Graph) -> np.ndarray:
    return g.networks[g.keep]


#: Per-node measures, computed on the kept nodes (NaN for dropped ones).
NODE_METRICS: dict[str, _NodeMetric] = {
    "strength": _NodeMetric(lambda g: strength(g.W)),
    "clustering": _NodeMetric(lambda g: clustering_coef(g.W)),
    "local_efficiency": _NodeMetric(lambda g: local_efficiency(g.W)),
    "module": _NodeMetric(lambda g: g.partition.astype(float), summarise=False),
    "participation": _NodeMetric(lambda g: participation_coef(g.W, g.partition)),
    "module_degree_zscore": _NodeMetric(lambda g: module_degree_zscore(g.W, g.partition)),
    "participation_atlas": _NodeMetric(lambda g: participation_coef(g.W, _atlas_partition(g))),
    "module_degree_zscore_atlas": _NodeMetric(
        lambda g: module_degree_zscore(g.W, _atlas_partition(g))
    ),
}

#: Whole-graph measures.
GLOBAL_METRICS: dict[str, Callable[[_Graph], float]] = {
    "global_efficiency": lambda g: global_efficiency(g.W),
    "modularity": lambda g: g.q,
    "n_modules": lambda g: float(len(np.unique(g.partition))),
    "n_nodes_dropped": lambda g: float((~g.keep).sum()),
}


def _rows(metric: str, scope: str, network="", network_b="", node="", value=np.nan) -> dict:
    return {
        "metric": metric,
        "scope": scope,
        "network": network,
        "network_b": network_b,
        "node": node,
        "value": float(value),
    }


def _connectivity_rows(g: _Graph) -> list[dict]:
    table = network_connectivity(g.raw, g.networks)
    return [
        _rows("connectivity", "network_pair", a, b, value=v)
        for a, b, v in table.itertuples(index=False)
    ]


def _anchored_rows(g: _Graph) -> list[dict]:
    rows = []
    for label, mask in g.anchors.items():
        table = anchored_connectivity(g.raw, mask, g.networks)
        rows += [
            _rows("anchored_connectivity", "anchor_network", label, net, value=v)
            for net, v in table.itertuples(index=False)
        ]
    return rows


#: Measures of the raw (signed, unthresholded) matrix, each returning tidy rows.
MEAN_METRICS: dict[str, Callable[[_Graph], list[dict]]] = {
    "connectivity": _connectivity_rows,
    "anchored_connectivity": _anchored_rows,
}


def _node_rows(name: str, metric: _NodeMetric, g: _Graph) -> list[dict]:
    values = _spread(metric.func(g), g.keep)
    rows = []
    if metric.summarise:
        for net in sorted(set(g.networks.tolist())):
            rows.append(_rows(name, "network", net, value=_nanmean(values[g.networks == net])))
    rows += [
        _rows(name, "node", net, node=node, value=v)
        for net, node, v in zip(g.networks, g.names, values, strict=True)
    ]
    return rows


def network_metrics(
    matrix: np.ndarray,
    nodes: pd.DataFrame,
    *,
    threshold: float | None = None,
    normalize: bool = False,
    seed: int = 0,
    n_consensus: int = 100,
    tau: float = 0.5,
    anchors: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """All network metrics of one connectivity matrix as a tidy long table.

    Nodes whose rows are entirely NaN are dropped before graph measures (their per-node
    values are NaN and they are excluded from network means).  Graph measures use the
    matrix prepared by :func:`threshold_matrix`; ``connectivity`` and
    ``anchored_connectivity`` use the raw signed matrix.  Modules are the consensus of
    ``n_consensus`` Louvain runs (:func:`consensus_partition`); the ``*_atlas`` variants
    use the atlas networks as modules instead.

    Parameters
    ----------
    matrix : (n, n) array
        Symmetric FC or SC matrix.
    nodes : pandas.DataFrame
        Atlas table in matrix order, with ``name`` and ``network`` (and optionally
        ``anatomy``, used to find anchors).
    threshold : float, optional
        Proportional density for graph measures; None (default) keeps all positive
        weights.
    normalize : bool, default=False
        Divide by the largest weight before graph measures (advisable for SC counts).
    seed : int, default=0
        Seed of the Louvain/consensus generator.
    n_consensus : int, default=100
        Louvain runs per consensus round.
    tau : float, default=0.5
        Consensus agreement threshold.
    anchors : mapping of str to str, optional
        Anchor label -> regular expression over ``anatomy``/``name``; default
        :data:`DEFAULT_ANCHORS`.  An anchor matching no node yields NaN rows.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`TIDY_COLUMNS`.  ``scope`` is ``global``, ``network_pair``
        (``network``/``network_b``), ``anchor_network`` (``network`` = anchor label,
        ``network_b`` = target network), ``network`` (mean of a node measure over the
        network's nodes) or ``node``; unused columns are "".  ``attrs["provenance"]``
        holds the :func:`threshold_matrix` record plus the dropped nodes and the
        community-detection settings.
    """
    M = _square(matrix)
    missing = [c for c in ("name", "network") if c not in nodes.columns]
    if missing:
        raise ValueError(f"the atlas table lacks column(s) {missing}.")
    if len(nodes) != len(M):
        raise ValueError(
            f"the atlas table has {len(nodes)} rows but the matrix has {len(M)} nodes; "
            "use the table of the atlas the matrix was built with."
        )
    if not np.allclose(M, M.T, equal_nan=True):
        raise ValueError("the connectivity matrix is not symmetric.")
    keep = valid_nodes(M)
    W, info = threshold_matrix(M[np.ix_(keep, keep)], density=threshold, normalize=normalize)
    if keep.sum() >= 2:
        partition, q = consensus_partition(W, n_repeats=n_consensus, tau=tau, seed=seed)
    else:
        partition, q = np.arange(1, keep.sum() + 1), float("nan")
    patterns = DEFAULT_ANCHORS if anchors is None else anchors
    names = nodes["name"].astype(str).to_numpy()
    g = _Graph(
        raw=M,
        W=W,
        keep=keep,
        networks=nodes["network"].astype(str).to_numpy(),
        names=names,
        partition=partition,
        q=q,
        anchors={label: select_nodes(nodes, p) for label, p in patterns.items()},
    )
    rows = [_rows(name, "global", value=func(g)) for name, func in GLOBAL_METRICS.items()]
    for func in MEAN_METRICS.values():
        rows += func(g)
    for name, metric in NODE_METRICS.items():
        rows += _node_rows(name, metric, g)
    table = pd.DataFrame(rows, columns=list(TIDY_COLUMNS))
    table.attrs["provenance"] = {
        **info,
        "dropped_nodes": names[~keep].tolist(),
        "community": {
            "method": "consensus_louvain",
            "gamma": 1.0,
            "n_consensus": n_consensus,
            "tau": tau,
            "seed": seed,
        },
        "connectivity_means": "raw matrix (signed, diagonal excluded, NaN ignored)",
        "anchors": dict(patterns),
    }
    return table
