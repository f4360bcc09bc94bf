"""Group-level runtime, peak memory and error rates on a synthetic cohort of metric tables.

Builds the long metric table of ``--patients + --controls`` subjects x 3 sessions with the
row layout :func:`pipeline.metrics.network_metrics` gives for an ``--parcels`` atlas of 14
networks (FC and SC: global, network-pair, anchored, per-network and per-node rows; SC-FC
coupling per node and network; regional volumes), plants a post-ECT change in a fraction
of the modelled (non-node) metrics of the patients, and times each group stage in its own
forked process (:mod:`bench.measure`; the peak memory includes the inherited input table)::

    python bench/bench_group.py --patients 70 --controls 30 --parcels 300

It also reports detection of the planted effects and false positives among the null
metrics (q < 0.05 and p < 0.05, patient model, post_vs_pre).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import StageResult, print_table, run_stage
from pipeline import groupstats, longitudinal

NETWORKS = ("Auditory", "CinguloOpercular", "DefaultMode", "DorsalAttention", "FrontoParietal",
            "MedialTemporalLobe", "ParietoMedial", "Reward", "Salience", "SomatomotorDorsal",
            "SomatomotorLateral", "VentralAttention", "Visual", "unassigned")
NODE_METRICS = ("strength", "clustering", "local_efficiency", "module", "participation",
                "module_degree_zscore", "participation_atlas", "module_degree_zscore_atlas")
GLOBAL_METRICS = ("global_efficiency", "modularity", "n_modules", "n_nodes_dropped")
ROLES = (("preECT", "pre", 0.0), ("postECT", "post", 28.0), ("maintenance", "maintenance", 182.0))


def metric_keys(n_parcels: int) -> pd.DataFrame:
    """One session's metric keys (modality, metric, scope, network, network_b, node)."""
    nodes = [f"parcel{i:03d}" for i in range(n_parcels)]
    node_net = [NETWORKS[i % len(NETWORKS)] for i in range(n_parcels)]
    rows = []
    for modality in ("fc", "sc"):
        rows += [(modality, m, "global", "", "", "") for m in GLOBAL_METRICS]
        rows += [(modality, "connectivity", "network_pair", a, b, "")
                 for i, a in enumerate(NETWORKS) for b in NETWORKS[i:]]
        rows += [(modality, "anchored_connectivity", "anchor_network", anchor, b, "")
                 for anchor in ("hippocampus", "amygdala", "subgenual_cingulate")
                 for b in NETWORKS]
        for metric in NODE_METRICS:
            if metric != "module":
                rows += [(modality, metric, "network", n, "", "") for n in NETWORKS]
            rows += [(modality, metric, "node", net, "", node)
                     for net, node in zip(node_net, nodes, strict=True)]
    rows += [("coupling", "sc_fc_coupling", "network", n, "", "") for n in NETWORKS]
    rows += [("coupling", "sc_fc_coupling", "node", net, "", node)
             for net, node in zip(node_net, nodes, strict=True)]
    rows += [("anat", "volume", "node", net, "", node)
             for net, node in zip(node_net, nodes, strict=True)]
    return pd.DataFrame(rows, columns=["modality", "metric", "scope", "network", "network_b",
                                       "node"])


def synthetic_cohort(n_pat: int, n_ctl: int, n_parcels: int, planted_fraction: float,
                     effect: float, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Long table and the boolean 'planted' flag per metric key.

    Values: subject effect N(0, 1) + session noise N(0, 0.5) (+ ``effect`` at post and
    maintenance for patients in the planted metrics); SE column 0.5.
    """
    rng = np.random.default_rng(seed)
    keys = metric_keys(n_parcels)
    n_keys = len(keys)
    modelled = np.flatnonzero(keys["scope"].to_numpy() != "node")
    planted = np.zeros(n_keys, bool)
    n_planted = round(planted_fraction * len(modelled))
    planted[rng.choice(modelled, n_planted, replace=False)] = True
    frames = []
    for s in range(n_pat + n_ctl):
        group = "patient" if s < n_pat else "control"
        base = rng.normal(0, 1, n_keys)
        for session, role, time in ROLES:
            value = base + rng.normal(0, 0.5, n_keys)
            if group == "patient" and role != "pre":
                value = value + effect * planted
            frame = keys.copy()
            frame.insert(0, "subject", f"{group[:3]}{s:03d}")
            frame.insert(1, "session", session)
            frame.insert(2, "role", role)
            frame.insert(3, "order", ROLES.index((session, role, time)) + 1)
            frame.insert(4, "time", time)
            frame.insert(5, "group", group)
            frame["atlas"] = "Seitzman300"
            frame["value"], frame["se"], frame["qc_flag"] = value, 0.5, False
            frames.append(frame)
    long = pd.concat(frames, ignore_index=True)
    # one failed session, to exercise the QC exclusion
    long.loc[(long["subject"] == "pat000") & (long["role"] == "maintenance"), "qc_flag"] = True
    return long, planted


def stage_prepare(long: pd.DataFrame) -> int:
    return len(longitudinal.prepare_long_table(long))


def stage_changes(long: pd.DataFrame) -> pd.Series:
    changes = longitudinal.change_table(long)
    return changes["maintenance_class"].value_counts()


def stage_classes(long: pd.DataFrame) -> int:
    return len(groupstats.class_counts(longitudinal.change_table(long)))


def stage_lme(long: pd.DataFrame) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return groupstats.lme_table(long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=70)
    parser.add_argument("--controls", type=int, default=30)
    parser.add_argument("--parcels", type=int, default=300)
    parser.add_argument("--planted-fraction", type=float, default=0.1)
    parser.add_argument("--effect", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    results: list[StageResult] = [run_stage(
        "synthesise cohort", lambda: len(synthetic_cohort(
            args.patients, args.controls, args.parcels, args.planted_fraction, args.effect,
            args.seed)[0]))]
    long, planted = synthetic_cohort(args.patients, args.controls, args.parcels,
                                     args.planted_fraction, args.effect, args.seed)
    keys = metric_keys(args.parcels)
    print(f"{args.patients + args.controls} subjects x 3 sessions, {len(keys)} metric rows per "
          f"session, {len(long)} rows; {int(planted.sum())} planted of "
          f"{int((keys['scope'] != 'node').sum())} modelled metrics")
    results.append(run_stage("prepare long table", stage_prepare, long))
    results.append(run_stage("change table (all metrics)", stage_changes, long))
    results.append(run_stage("changes + class counts", stage_classes, long))
    results.append(run_stage("LME (non-node metrics)", stage_lme, long))
    print_table(results)

    lme = results[-1].value
    post = lme[(lme["model"] == "patient") & (lme["contrast"] == "post_vs_pre")]
    flag = pd.Series(planted, index=pd.MultiIndex.from_frame(
        keys.assign(atlas="Seitzman300")[list(longitudinal.KEY_COLUMNS)]))
    is_planted = flag.reindex(pd.MultiIndex.from_frame(
        post[list(longitudinal.KEY_COLUMNS)])).to_numpy()
    n_fits = int((lme["model"] != "patient_minus_control").sum() / len(groupstats.CONTRASTS))
    print(f"\nfits: {n_fits}; {results[-1].wall_s / max(n_fits, 1) * 1000:.0f} ms wall per fit; "
          f"skipped: {int((post['skipped'] != '').sum())}; fits with warnings: "
          f"{int((lme['warnings'] != '').sum() / len(groupstats.CONTRASTS))}; singular: "
          f"{int(lme['singular'].sum() / len(groupstats.CONTRASTS))}")
    q, p = post["q"].to_numpy(), post["p"].to_numpy()
    print(f"planted detected (q < 0.05): {int((q[is_planted] < 0.05).sum())}/"
          f"{int(is_planted.sum())}")
    nulls = ~is_planted
    print(f"null metrics: {int(nulls.sum())}; q < 0.05: {int((q[nulls] < 0.05).sum())}; "
          f"p < 0.05: {int((p[nulls] < 0.05).sum())} "
          f"({(p[nulls] < 0.05).mean():.3f}, nominal 0.05)")
    ctl = lme[(lme["model"] == "control") & (lme["contrast"] == "post_vs_pre")]
    print(f"controls (nothing planted): p < 0.05 in {(ctl['p'] < 0.05).mean():.3f} of metrics")
    print("maintenance classes over all subject x metric rows:")
    print(results[2].value.to_string())


if __name__ == "__main__":
    main()
