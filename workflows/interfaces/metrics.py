"""Interface computing one session's metric table (see :mod:`pipeline.session_metrics`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from pipeline import session_metrics


class _SessionMetricsInputSpec(BaseInterfaceInputSpec):
    atlas_table = File(exists=True, mandatory=True, desc="atlas TSV (index, name, network, x..)")
    fc_relmat = File(exists=True, desc="Pearson FC relmat TSV (Node column first)")
    fc_timeseries = File(exists=True, desc="denoised parcel time series TSV (for SE)")
    sc_relmat = File(exists=True, desc="volume-normalised streamline-count relmat TSV")
    sc_counts = File(exists=True, desc="streamline-count relmat TSV (for SE)")
    volumes = File(exists=True, desc="stat-volume_morph TSV (region, volume_mm3)")
    graph_density = traits.Either(None, traits.Float, default=None, usedefault=True)
    n_boot = traits.Int(100, usedefault=True)
    n_consensus = traits.Int(100, usedefault=True)
    seed = traits.Int(42, usedefault=True)


class _SessionMetricsOutputSpec(TraitedSpec):
    out_file = File(exists=True)
    out_meta = traits.Dict()


def _matrix(path: str, names: list[str]) -> np.ndarray:
    """A relmat TSV in atlas order (parcels missing from it become NaN rows/columns)."""
    table = pd.read_csv(path, sep="\t", index_col=0)
    table.index = table.index.astype(str)
    table.columns = table.columns.astype(str)
    unknown = set(table.index) - set(names)
    if unknown:
        raise ValueError(
            f"{path}: parcels {sorted(unknown)[:5]} are not in the atlas table; the matrix and "
            "the atlas do not belong together."
        )
    return table.reindex(index=names, columns=names).to_numpy(float)


def _timeseries(path: str, names: list[str]) -> np.ndarray:
    table = pd.read_csv(path, sep="\t")
    table.columns = table.columns.astype(str)
    return table.reindex(columns=names).to_numpy(float)


class SessionMetrics(SimpleInterface):
    """FC/SC network metrics, coupling and volumes of one session, with bootstrap SEs."""

    input_spec = _SessionMetricsInputSpec
    output_spec = _SessionMetricsOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        nodes = pd.read_csv(spec.atlas_table, sep="\t")
        names = nodes["name"].astype(str).tolist()

        def given(name):
            value = getattr(spec, name)
            return value if isdefined(value) else None

        fc = _matrix(spec.fc_relmat, names) if given("fc_relmat") else None
        ts = _timeseries(spec.fc_timeseries, names) if given("fc_timeseries") else None
        if ts is not None:
            ts = ts[~np.isnan(ts).all(axis=1)]
        sc = _matrix(spec.sc_relmat, names) if given("sc_relmat") else None
        counts = _matrix(spec.sc_counts, names) if given("sc_counts") else None
        volumes = pd.read_csv(spec.volumes, sep="\t") if given("volumes") else None
        table = session_metrics.session_metric_table(
            nodes, fc=fc, timeseries=ts, sc=sc, sc_counts=counts, volumes=volumes,
            graph_density=spec.graph_density, n_boot=spec.n_boot,
            n_consensus=spec.n_consensus, seed=spec.seed,
        )
        out = Path(runtime.cwd) / "metrics.tsv"
        table.to_csv(out, sep="\t", index=False, na_rep="n/a", float_format="%.10g")
        self._results["out_file"] = str(out)
        self._results["out_meta"] = {
            **{k: {"Description": v} for k, v in session_metrics.COLUMN_DESCRIPTIONS.items()},
            "Sources": [Path(p).name for p in (spec.fc_relmat, spec.sc_relmat, spec.volumes)
                        if isdefined(p)],
            "Provenance": _jsonable(table.attrs.get("provenance", {})),
        }
        return runtime


def _jsonable(value):
    """Provenance dicts may hold numpy scalars/arrays; JSON needs plain types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value
