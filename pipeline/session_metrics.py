"""One session's metrics in one tidy table: FC and SC network measures, coupling, volumes.

Every row carries a standard error (``se``) where one can be estimated from the session's
own data, because the longitudinal classes (:mod:`pipeline.longitudinal`) judge a change
against the measurement error of that very metric:

* FC: moving-block bootstrap of the denoised parcel time series (blocks keep the
  autocorrelation of the BOLD signal), FC recomputed per replicate;
* SC: bootstrap over streamlines, which for count-based weights is exactly a multinomial
  resampling of the edge counts with probabilities ``count / total`` (volume
  normalisation is a fixed per-edge factor and is re-applied);
* coupling: both at once;
* Jacobian volumes: the session's registration noise floor
  (:func:`pipeline.anat.jacobian_volume_se`).

Replicates only recompute the cheap, interpretable summaries (network-pair means, anchored
connectivity, global/network coupling, node-strength means); consensus-Louvain measures
would cost minutes per replicate and get ``se`` NaN.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from pipeline import coupling, metrics

KEY_COLUMNS = ("modality", "metric", "scope", "network", "network_b", "node")
COLUMNS = (*KEY_COLUMNS, "value", "se")

#: Column descriptions for the JSON sidecar.
COLUMN_DESCRIPTIONS = {
    "modality": "fc (functional), sc (structural), coupling (structure-function) or anat.",
    "metric": "Measure name (see the Trajectome documentation of pipeline.metrics).",
    "scope": "global, network, network_pair, anchor_network, node, or region (volumes).",
    "network": "Network (or anchor label) the value belongs to; empty for global values.",
    "network_b": "Second network of a network pair; empty otherwise.",
    "node": "Parcel or region name for node/region values; empty otherwise.",
    "value": "The measure in this session.",
    "se": "Standard error from resampling the session's own data (bootstrap); NaN when "
    "not estimated.",
}

#: Metrics recomputed on every resampled replicate.
RESAMPLED_METRICS = ("connectivity", "anchored_connectivity", "strength")


def moving_block_indices(n_volumes: int, block_length: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of one moving-block bootstrap replicate of ``n_volumes`` time points."""
    block_length = int(max(1, min(block_length, n_volumes)))
    n_blocks = int(np.ceil(n_volumes / block_length))
    starts = rng.integers(0, n_volumes - block_length + 1, size=n_blocks)
    return (starts[:, None] + np.arange(block_length)[None, :]).ravel()[:n_volumes]


def default_block_length(n_volumes: int) -> int:
    """Block length ~ n^(1/3) (Kuensch 1989), at least 5 volumes for BOLD autocorrelation."""
    return int(max(5, round(n_volumes ** (1 / 3))))


def fc_replicates(
    timeseries: np.ndarray, *, n_boot: int, seed: int, block_length: int | None = None
) -> Iterator[np.ndarray]:
    """Pearson FC of moving-block bootstrap replicates of (T, parcels) time series."""
    from pipeline.connectivity import pearson_correlation

    ts = np.asarray(timeseries, float)
    block = block_length or default_block_length(len(ts))
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield pearson_correlation(ts[moving_block_indices(len(ts), block, rng)])


def sc_replicates(
    counts: np.ndarray, weights: np.ndarray | None = None, *, n_boot: int, seed: int
) -> Iterator[np.ndarray]:
    """Streamline-bootstrap replicates of an SC matrix.

    ``counts`` is the symmetric streamline-count matrix; ``weights`` the matrix actually
    analysed (e.g. volume-normalised counts), derived from counts by a fixed per-edge
    factor.  Each replicate redraws the total number of streamlines over the edges
    (upper triangle) with multinomial probabilities ``count / total``.
    """
    counts = np.asarray(counts, float)
    weights = counts if weights is None else np.asarray(weights, float)
    iu = np.triu_indices_from(counts, k=1)
    edge_counts = np.nan_to_num(counts[iu])
    total = round(float(edge_counts.sum()))
    factor = np.divide(weights[iu], edge_counts, out=np.zeros_like(edge_counts),
                       where=edge_counts > 0)
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        out = np.zeros_like(counts)
        if total > 0:
            out[iu] = rng.multinomial(total, edge_counts / edge_counts.sum()) * factor
        out = out + out.T
        # parcels without signal stay empty (NaN rows) as in the original
        out[np.isnan(weights).all(axis=1)] = np.nan
        out[:, np.isnan(weights).all(axis=0)] = np.nan
        yield out


def _cheap_metrics(
    matrix: np.ndarray, nodes: pd.DataFrame, *, normalize: bool, density: float | None
) -> pd.DataFrame:
    """The resampled subset of :func:`pipeline.metrics.network_metrics`, same row keys."""
    networks = nodes["network"].astype(str).to_numpy()
    rows = [
        ("connectivity", "network_pair", a, b, "", v)
        for a, b, v in metrics.network_connectivity(matrix, networks).itertuples(index=False)
    ]
    for label, pattern in metrics.DEFAULT_ANCHORS.items():
        mask = metrics.select_nodes(nodes, pattern)
        table = metrics.anchored_connectivity(matrix, mask, networks)
        rows += [("anchored_connectivity", "anchor_network", label, net, "", v)
                 for net, v in table.itertuples(index=False)]
    keep = metrics.valid_nodes(matrix)
    W, _ = metrics.threshold_matrix(matrix[np.ix_(keep, keep)], density=density,
                                    normalize=normalize)
    strength = metrics.strength(W)
    for net in sorted(set(networks[keep].tolist())):
        rows.append(("strength", "network", net, "", "", float(strength[networks[keep] == net]
                                                               .mean())))
    return pd.DataFrame(rows, columns=list(metrics.TIDY_COLUMNS))


def _coupling_summary(sc: np.ndarray, fc: np.ndarray, nodes: pd.DataFrame) -> pd.DataFrame:
    table = coupling.coupling_table(sc, fc, None, nodes)
    return table[table["scope"] != "node"]


def _se(base: pd.DataFrame, replicates: list[pd.DataFrame]) -> pd.Series:
    """Standard deviation over replicates of each row of ``base`` (matched on keys)."""
    keys = [c for c in metrics.TIDY_COLUMNS if c != "value"]
    if not replicates:
        return pd.Series(np.nan, index=base.index)
    stacked = pd.concat(replicates, ignore_index=True)
    sd = stacked.groupby(keys, sort=False)["value"].std(ddof=1).rename("se").reset_index()
    return base[keys].merge(sd, on=keys, how="left")["se"].set_axis(base.index)


def _with_modality(table: pd.DataFrame, modality: str, se: pd.Series | None) -> pd.DataFrame:
    out = table.copy()
    out.insert(0, "modality", modality)
    out["se"] = np.nan if se is None else se.to_numpy()
    return out[list(COLUMNS)]


def volume_rows(volumes: pd.DataFrame) -> pd.DataFrame:
    """Anatomical rows from a ``stat-volume_morph`` table (``region, volume_mm3``).

    ``se`` is the table's ``volume_se_mm3`` when present (Jacobian volumes), else NaN.

    Hippocampus/amygdala totals, TICV and tissue volumes get scope ``structure``; atlas
    parcels scope ``region``.
    """
    structures = {"hippocampus_L", "hippocampus_R", "amygdala_L", "amygdala_R", "TICV",
                  "GM", "WM", "CSF"}
    region = volumes["region"].astype(str)
    return pd.DataFrame({
        "modality": "anat",
        "metric": "volume_mm3",
        "scope": np.where(region.isin(structures), "structure", "region"),
        "network": "",
        "network_b": "",
        "node": region,
        "value": volumes["volume_mm3"].astype(float),
        "se": (pd.to_numeric(volumes["volume_se_mm3"], errors="coerce")
               if "volume_se_mm3" in volumes else np.nan),
    })[list(COLUMNS)]


def session_metric_table(
    nodes: pd.DataFrame,
    *,
    fc: np.ndarray | None = None,
    timeseries: np.ndarray | None = None,
    sc: np.ndarray | None = None,
    sc_counts: np.ndarray | None = None,
    volumes: pd.DataFrame | None = None,
    graph_density: float | None = None,
    n_boot: int = 100,
    n_consensus: int = 100,
    seed: int = 0,
) -> pd.DataFrame:
    """All metrics of one session and atlas as one tidy table (:data:`COLUMNS`).

    Parameters
    ----------
    nodes : pandas.DataFrame
        Atlas table in matrix order (``name``, ``network``, ``x``, ``y``, ``z``; optional
        ``anatomy`` for anchors).
    fc : (n, n) array, optional
        Pearson FC of the session.
    timeseries : (T, n) array, optional
        Denoised, censored parcel time series the FC came from (for its ``se``).
    sc : (n, n) array, optional
        Structural weights analysed (volume-normalised streamline counts).
    sc_counts : (n, n) array, optional
        Streamline counts ``sc`` derives from (for its ``se``).
    volumes : pandas.DataFrame, optional
        ``region, volume_mm3`` of the session.
    graph_density : float, optional
        Proportional threshold of graph measures (None: all positive weights).
    n_boot : int
        Bootstrap replicates for standard errors (0 disables them).
    n_consensus : int
        Louvain runs per consensus round.
    seed : int
        Seed of Louvain and of the bootstraps.

    Returns
    -------
    pandas.DataFrame
        ``attrs["provenance"]`` records thresholds, dropped nodes and resampling settings.
    """
    parts, provenance = [], {"n_boot": n_boot, "seed": seed, "graph_density": graph_density}
    fc_reps: list[np.ndarray] = []
    sc_reps: list[np.ndarray] = []
    if fc is not None:
        table = metrics.network_metrics(fc, nodes, threshold=graph_density, seed=seed,
                                        n_consensus=n_consensus)
        provenance["fc"] = table.attrs.get("provenance", {})
        if timeseries is not None and n_boot > 1:
            fc_reps = list(fc_replicates(timeseries, n_boot=n_boot, seed=seed))
            provenance["fc_bootstrap"] = {
                "method": "moving-block bootstrap of the parcel time series",
                "block_length": default_block_length(len(timeseries)),
            }
        reps = [_cheap_metrics(r, nodes, normalize=False, density=graph_density)
                for r in fc_reps]
        parts.append(_with_modality(table, "fc", _se(table, reps)))
    if sc is not None:
        table = metrics.network_metrics(sc, nodes, threshold=graph_density, normalize=True,
                                        seed=seed, n_consensus=n_consensus)
        provenance["sc"] = table.attrs.get("provenance", {})
        if sc_counts is not None and n_boot > 1:
            sc_reps = list(sc_replicates(sc_counts, sc, n_boot=n_boot, seed=seed + 1))
            provenance["sc_bootstrap"] = {"method": "multinomial resampling of streamlines"}
        reps = [_cheap_metrics(r, nodes, normalize=True, density=graph_density)
                for r in sc_reps]
        parts.append(_with_modality(table, "sc", _se(table, reps)))
    if fc is not None and sc is not None:
        table = coupling.coupling_table(sc, fc, None, nodes)
        n_pairs = max(len(sc_reps), len(fc_reps))
        pairs = zip(sc_reps or [sc] * n_pairs, fc_reps or [fc] * n_pairs, strict=True)
        reps = [_coupling_summary(s, f, nodes) for s, f in pairs]
        parts.append(_with_modality(table, "coupling", _se(table, reps)))
    if volumes is not None:
        parts.append(volume_rows(volumes))
    if not parts:
        raise ValueError("no FC, SC or volumes given: nothing to measure in this session.")
    out = pd.concat(parts, ignore_index=True)
    out.attrs["provenance"] = provenance
    return out
