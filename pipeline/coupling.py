"""Structure-function coupling: how well structural connectivity predicts functional.

Two regional measures, each one value per region:

* **Rank coupling** (Baum et al. 2020, PNAS): Spearman correlation between region
  ``i``'s SC row and FC row over the regions it is structurally connected to
  (``SC[i, j] > 0``, ``j != i``).  At least :data:`MIN_EDGES_SPEARMAN` such edges are
  needed, otherwise NaN.
* **Multilinear coupling** (Vazquez-Rodriguez et al. 2019, PNAS): adjusted R^2 of an
  ordinary least-squares fit (with intercept) of ``FC[i, j]`` (``j != i``) on three
  predictors: Euclidean distance between parcel centroids, weighted shortest-path
  length on SC (``length = 1 / weight``) and communicability of the degree-normalised
  SC (``expm(D^-1/2 W D^-1/2)``; Estrada & Hatano 2008, Crofts & Higham 2009).
  Regions not reachable on SC are left out of the fit; at least
  :data:`MIN_OBSERVATIONS_MULTILINEAR` observations are needed, otherwise NaN.

And one edge-wise measure per network:

* **Within-network coupling**: Spearman correlation between SC and FC over the edges
  inside a network that are structurally connected (``SC[i, j] > 0``, ``i < j``, both
  in the network); the whole-brain value uses every structurally connected edge.  The
  regional measures above correlate a region's profile over the whole brain, so a
  change confined to one network's edges (e.g. stronger DMN coupling) is diluted there;
  this is the edge-wise coupling of Honey et al. (2009, PNAS) restricted to a network,
  with Baum's rank and non-zero-edge rules.  At least :data:`MIN_EDGES_SPEARMAN` edges
  are needed, otherwise NaN.
* **Within-network all-pairs coupling**: Pearson correlation between SC weights and FC
  over every pair of a network's nodes, unconnected pairs entering with ``SC = 0`` (the
  all-pairs SC-FC correlation of Honey et al. 2009).  Where the rank measure asks whether
  stronger connections have stronger FC, this one also asks whether connected pairs have
  stronger FC than unconnected ones, and it does not depend on which weak edges
  tractography happens to reach in a session.  NaN when SC or FC is constant over the
  pairs or there are fewer than :data:`MIN_EDGES_SPEARMAN` pairs.

Nodes whose SC or FC row is entirely NaN (parcels without data) are dropped before
anything is computed; their values are NaN and the others equal those computed on the
submatrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.linalg import expm
from scipy.sparse.csgraph import shortest_path
from scipy.stats import rankdata

from pipeline.metrics import TIDY_COLUMNS, valid_nodes

#: Fewest structurally connected regions for a Spearman coupling value.
MIN_EDGES_SPEARMAN = 3
#: Predictors of the multilinear model (distance, path length, communicability).
N_PREDICTORS = 3
#: Fewest observations for adjusted R^2 (leaves one residual degree of freedom).
MIN_OBSERVATIONS_MULTILINEAR = N_PREDICTORS + 2


def _square(matrix: np.ndarray, what: str) -> np.ndarray:
    M = np.array(matrix, dtype=float)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{what} must be a square 2-D array, got shape {M.shape}.")
    if not np.allclose(M, M.T, equal_nan=True):
        raise ValueError(f"{what} is not symmetric.")
    return M


def _structural(sc: np.ndarray) -> np.ndarray:
    W = _square(sc, "SC")
    np.fill_diagonal(W, 0)
    if not np.isfinite(W).all():
        raise ValueError("SC contains NaN/inf; drop empty parcels first (valid_nodes).")
    if (W < 0).any():
        raise ValueError("SC has negative weights; structural weights must be >= 0.")
    return W


def _pair(sc: np.ndarray, fc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check SC/FC agree in size; return both and the mask of nodes valid in both."""
    S = _square(sc, "SC")
    F = _square(fc, "FC")
    if S.shape != F.shape:
        raise ValueError(f"SC {S.shape} and FC {F.shape} have different numbers of nodes.")
    keep = valid_nodes(S) & valid_nodes(F)
    return S, F, keep


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denom) if denom > 0 else float("nan")


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    return _pearson(rankdata(x), rankdata(y))  # average ranks for ties


def regional_coupling(sc: np.ndarray, fc: np.ndarray) -> np.ndarray:
    """Spearman SC-FC coupling of each region (Baum et al. 2020).

    Parameters
    ----------
    sc, fc : (n, n) arrays
        Symmetric structural and functional connectivity.

    Returns
    -------
    (n,) array
        NaN for regions with fewer than :data:`MIN_EDGES_SPEARMAN` structural edges,
        with constant SC or FC over those edges, or without data.
    """
    S, F, keep = _pair(sc, fc)
    S = _structural(S[np.ix_(keep, keep)])
    F = F[np.ix_(keep, keep)]
    values = np.full(len(S), np.nan)
    for i in range(len(S)):
        edges = np.flatnonzero(S[i] > 0)
        edges = edges[edges != i]
        if len(edges) >= MIN_EDGES_SPEARMAN:
            values[i] = _spearman(S[i, edges], F[i, edges])
    out = np.full(keep.shape, np.nan)
    out[keep] = values
    return out


def within_network_coupling(
    sc: np.ndarray, fc: np.ndarray, networks: Sequence[str]
) -> pd.DataFrame:
    """Edge-wise Spearman SC-FC coupling within each network, and over the whole brain.

    Parameters
    ----------
    sc, fc : (n, n) arrays
        Symmetric structural and functional connectivity.
    networks : (n,) sequence of str
        Network label of each node.

    Returns
    -------
    pandas.DataFrame
        Columns ``network, value``: one row per network (sorted), then ``network=""``
        for every structurally connected edge of the brain.  NaN with fewer than
        :data:`MIN_EDGES_SPEARMAN` connected edges or constant SC or FC over them.
    """
    return _per_network(sc, fc, networks, connected_only=True, correlate=_spearman)


def within_network_coupling_all_pairs(
    sc: np.ndarray, fc: np.ndarray, networks: Sequence[str]
) -> pd.DataFrame:
    """Pearson SC-FC correlation over all node pairs within each network and the brain.

    Parameters
    ----------
    sc, fc : (n, n) arrays
        Symmetric structural and functional connectivity.
    networks : (n,) sequence of str
        Network label of each node.

    Returns
    -------
    pandas.DataFrame
        Columns ``network, value``: one row per network (sorted), then ``network=""``
        over every pair of the brain.  Unconnected pairs count with ``SC = 0``; NaN with
        fewer than :data:`MIN_EDGES_SPEARMAN` pairs or constant SC or FC over them.
    """
    return _per_network(sc, fc, networks, connected_only=False, correlate=_pearson)


def _per_network(sc, fc, networks, *, connected_only: bool, correlate) -> pd.DataFrame:
    S, F, keep = _pair(sc, fc)
    labels = np.asarray(networks).astype(str)
    if labels.shape != (len(S),):
        raise ValueError("need one network label per node.")
    S = _structural(S[np.ix_(keep, keep)])
    F = F[np.ix_(keep, keep)]
    kept = labels[keep]
    upper = np.triu(np.ones(S.shape, bool), 1)
    if connected_only:
        upper &= S > 0

    def coupling(edges: np.ndarray) -> float:
        if edges.sum() < MIN_EDGES_SPEARMAN:
            return float("nan")
        return correlate(S[edges], F[edges])

    rows = [(net, coupling(upper & np.outer(kept == net, kept == net)))
            for net in sorted(set(labels.tolist()))]
    rows.append(("", coupling(upper)))
    return pd.DataFrame(rows, columns=["network", "value"])


def euclidean_distance(coords: np.ndarray) -> np.ndarray:
    """Pairwise Euclidean distance between parcel centroids.

    Parameters
    ----------
    coords : (n, 3) array
        Centroids in mm.

    Returns
    -------
    (n, n) array
    """
    xyz = np.asarray(coords, dtype=float)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"coords must have shape (n, 3), got {xyz.shape}.")
    diff = xyz[:, None, :] - xyz[None, :, :]
    return np.sqrt((diff**2).sum(axis=-1))


def shortest_path_length(sc: np.ndarray) -> np.ndarray:
    """Weighted shortest-path lengths on SC with ``length = 1 / weight``.

    Parameters
    ----------
    sc : (n, n) array
        Non-negative symmetric structural connectivity; zero means no edge.

    Returns
    -------
    (n, n) array
        Path lengths; 0 on the diagonal, inf between disconnected regions.
    """
    W = _structural(sc)
    L = np.zeros_like(W)
    L[W > 0] = 1.0 / W[W > 0]
    return shortest_path(L, method="D", directed=False)


def communicability(sc: np.ndarray) -> np.ndarray:
    """Weighted communicability ``expm(D^-1/2 W D^-1/2)``, ``D`` the diagonal of strengths.

    Regions without structural edges get a zero row/column in the normalised matrix
    (communicability 1 with themselves, 0 with the rest).

    Parameters
    ----------
    sc : (n, n) array
        Non-negative symmetric structural connectivity.

    Returns
    -------
    (n, n) array
    """
    W = _structural(sc)
    s = W.sum(axis=1)
    inv_sqrt = np.zeros_like(s)
    inv_sqrt[s > 0] = 1.0 / np.sqrt(s[s > 0])
    return expm(inv_sqrt[:, None] * W * inv_sqrt[None, :])


def adjusted_r2(y: np.ndarray, X: np.ndarray) -> float:
    """Adjusted R^2 of an OLS fit of ``y`` on the columns of ``X`` plus an intercept.

    Parameters
    ----------
    y : (m,) array
    X : (m, p) array
        Predictors (no intercept column).

    Returns
    -------
    float
        ``1 - (1 - R^2) (m - 1) / (m - p - 1)``; NaN when ``m <= p + 1`` or ``y`` is
        constant.
    """
    y = np.asarray(y, dtype=float)
    X = np.asarray(X, dtype=float).reshape(len(y), -1)
    m, p = X.shape
    total = ((y - y.mean()) ** 2).sum()
    if m <= p + 1 or total == 0:
        return float("nan")
    design = np.column_stack([np.ones(m), X])
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = ((y - design @ beta) ** 2).sum()
    return float(1 - (residual / total) * (m - 1) / (m - p - 1))


def regional_multilinear_coupling(sc: np.ndarray, fc: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Multilinear SC-FC coupling of each region (Vazquez-Rodriguez et al. 2019).

    Parameters
    ----------
    sc, fc : (n, n) arrays
        Symmetric structural and functional connectivity.
    coords : (n, 3) array
        Parcel centroids in mm.

    Returns
    -------
    (n,) array
        Adjusted R^2 per region; NaN for regions without data or with fewer than
        :data:`MIN_OBSERVATIONS_MULTILINEAR` regions reachable on SC.
    """
    S, F, keep = _pair(sc, fc)
    xyz = np.asarray(coords, dtype=float)
    if xyz.shape != (len(S), 3):
        raise ValueError(f"coords must have shape ({len(S)}, 3), got {xyz.shape}.")
    keep &= np.isfinite(xyz).all(axis=1)
    S = _structural(S[np.ix_(keep, keep)])
    F = F[np.ix_(keep, keep)]
    predictors = np.stack(
        [euclidean_distance(xyz[keep]), shortest_path_length(S), communicability(S)], axis=-1
    )
    values = np.full(len(S), np.nan)
    for i in range(len(S)):
        others = np.flatnonzero((np.arange(len(S)) != i) & np.isfinite(predictors[i]).all(axis=1))
        if len(others) >= MIN_OBSERVATIONS_MULTILINEAR:
            values[i] = adjusted_r2(F[i, others], predictors[i, others])
    out = np.full(keep.shape, np.nan)
    out[keep] = values
    return out


def summarise_by_network(values: np.ndarray, networks: Sequence[str]) -> pd.DataFrame:
    """Mean of regional values per network and over the whole brain, ignoring NaN.

    Parameters
    ----------
    values : (n,) array
    networks : (n,) sequence of str

    Returns
    -------
    pandas.DataFrame
        Columns ``network, value``: one row per network (sorted), then ``network=""``
        for the whole-brain mean.
    """
    values = np.asarray(values, dtype=float)
    labels = np.asarray(networks).astype(str)
    if labels.shape != values.shape:
        raise ValueError("need one network label per regional value.")

    def mean(v: np.ndarray) -> float:
        v = v[~np.isnan(v)]
        return float(v.mean()) if v.size else float("nan")

    rows = [(net, mean(values[labels == net])) for net in sorted(set(labels.tolist()))]
    rows.append(("", mean(values)))
    return pd.DataFrame(rows, columns=["network", "value"])


def coupling_table(
    sc: np.ndarray, fc: np.ndarray, coords: np.ndarray | None, nodes: pd.DataFrame
) -> pd.DataFrame:
    """Regional, network and whole-brain structure-function coupling as a tidy table.

    Parameters
    ----------
    sc, fc : (n, n) arrays
        Symmetric structural and functional connectivity in atlas order.
    coords : (n, 3) array or None
        Parcel centroids in mm; None takes the ``x, y, z`` columns of ``nodes``.
    nodes : pandas.DataFrame
        Atlas table with ``name`` and ``network``, one row per node.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`pipeline.metrics.TIDY_COLUMNS`; metrics ``sc_fc_spearman`` and
        ``sc_fc_multilinear_r2adj`` at scopes ``global``, ``network`` and ``node``, and
        ``sc_fc_within_spearman`` (:func:`within_network_coupling`) and
        ``sc_fc_within_pearson`` (:func:`within_network_coupling_all_pairs`) at ``global``
        and ``network``.
    """
    missing = [c for c in ("name", "network") if c not in nodes.columns]
    if missing:
        raise ValueError(f"the atlas table lacks column(s) {missing}.")
    if coords is None:
        if not {"x", "y", "z"} <= set(nodes.columns):
            raise ValueError("no coords given and the atlas table lacks x, y, z columns.")
        coords = nodes[["x", "y", "z"]].to_numpy(float)
    n = np.shape(sc)[0]
    if len(nodes) != n:
        raise ValueError(f"the atlas table has {len(nodes)} rows but the matrices have {n} nodes.")
    networks = nodes["network"].astype(str).to_numpy()
    names = nodes["name"].astype(str).to_numpy()
    measures = {
        "sc_fc_spearman": regional_coupling(sc, fc),
        "sc_fc_multilinear_r2adj": regional_multilinear_coupling(sc, fc, coords),
    }
    rows = []
    for metric, values in measures.items():
        summary = summarise_by_network(values, networks)
        for net, value in summary.itertuples(index=False):
            rows.append((metric, "network" if net else "global", net, "", "", value))
        rows += [
            (metric, "node", net, "", name, float(v))
            for net, name, v in zip(networks, names, values, strict=True)
        ]
    for metric, within in (
        ("sc_fc_within_spearman", within_network_coupling(sc, fc, networks)),
        ("sc_fc_within_pearson", within_network_coupling_all_pairs(sc, fc, networks)),
    ):
        rows += [(metric, "network" if net else "global", net, "", "", value)
                 for net, value in within.itertuples(index=False)]
    return pd.DataFrame(rows, columns=list(TIDY_COLUMNS))
