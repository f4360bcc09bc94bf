"""Issue-6 must-show on a simulated study run through the app (functional path).

Simulates ``--patients`` patients and ``--controls`` controls x 3 sessions (pre-ECT,
post-ECT, maintenance) with ``trajectome-simulate ... --fmriprep``, runs the participant
level (``--modalities func --fmriprep-dir ...``, ``--sloppy`` on request) and the group
level through the real ``trajectome`` command line, then scores the group outputs against
the planted truth (``derivatives/groundtruth``)::

    nice -n 10 python bench/bench_study.py --root /tmp/study300 --volumes 300
    nice -n 10 python bench/bench_study.py --root /tmp/study --sloppy   # 122-volume runs

What the simulator plants (:mod:`pipeline.simulate.effects`), on the FC side:

* DMN loading ``w_dmn`` falls by ~0.2 after ECT (mean FC within ``DefaultMode`` drops);
* the Salience/FrontoParietal shared factor ``rho_se`` rises by ~0.4 (mean FC between
  ``FrontoParietal`` and ``Salience`` rises);
* the DMN bundle factor ``kappa`` rises (SC-FC coupling within the DMN, planted on the
  scale of the Pearson correlation over DMN pairs; with ``--modalities dwi``, scored on
  ``sc_fc_within_pearson``), and the hippocampus grows (with ``--modalities anat``; left
  and right hippocampus modelled apart);
* at maintenance each patient keeps ``1 + f`` of the acute change, ``f`` = -0.7
  (regression), 0 (stabilisation) or +0.5 (continued remodelling), classes dealt in turn;
* controls: nothing changes.

Scoring, all on FC metrics of the modelled scopes (global, network, network_pair,
anchor_network) of ``group/desc-lme_stats.tsv``:

* **planted**: the two FC effects above (and Visual-within, planted ``no``), for every
  contrast, against the mean over patients of the realised planted values
  (``sub-*_desc-planted_effects.tsv``): detected = q < 0.05 with the planted sign;
* **population truth of every metric**: the same metric code (:func:`pipeline.metrics.
  network_metrics`) on each patient's *population* FC (``desc-population`` relmat) gives
  the change the model implies for every metric.  ``null`` = exactly no change (e.g. FC
  within/between networks other than DMN, Salience, FrontoParietal); ``implied`` = a
  change at least ``--implied-sd`` within-subject residual SDs (side effects of the planted
  changes, e.g. DMN strength); ``negligible`` = the rest.  False positives are q < 0.05
  among ``null`` (and, separately, ``negligible``) metrics;
* maintenance classes: the fraction of patients whose class in
  ``sub-*_desc-changes_metrics.tsv`` equals the planted class, per planted metric;
* controls: their own mixed model, every contrast, count of q < 0.05.

Each level is timed in its own process with the peak memory of its whole process tree
(sampled from ``/proc``) and of its largest process (``wait4``).  The dataset, work and
output folders under ``--root`` are reused: a second call re-runs only what changed
(``--score-only`` just re-scores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.simulate.config import SESSION_ROLES

BIN = Path(sys.executable).parent
ATLAS = "Seitzman300"
SCOPES = ("global", "network", "network_pair", "anchor_network", "structure")
#: Contrast -> (role, minus role).
CONTRAST_ROLES = {"post_vs_pre": ("post", "pre"), "maintenance_vs_post": ("maintenance", "post"),
                  "maintenance_vs_pre": ("maintenance", "pre")}
KEY = ["modality", "metric", "scope", "network", "network_b"]
#: Metrics that are means over edges of the signed FC (expected change = population change).
LINEAR_METRICS = ("connectivity", "anchored_connectivity")
#: Planted maintenance class -> the bin of the maintenance/acute ratio it falls in
#: (fraction 0.25, as :func:`pipeline.longitudinal.classify_maintenance`).
RATIO_BINS = {"regression": (-np.inf, -0.25), "stabilisation": (-0.25, 0.25),
              "continued_remodelling": (0.25, np.inf)}


def _in_bin(ratio: float, klass: str) -> bool:
    """Whether a maintenance / acute ratio falls in ``klass``'s bin of :data:`RATIO_BINS`."""
    low, high = RATIO_BINS[klass]
    return bool(low <= ratio < high)
Q = 0.05


# --------------------------------------------------------------------------- running


@dataclass
class Level:
    """Resources of one command."""

    name: str
    wall_s: float
    cpu_s: float
    peak_tree_mb: float
    peak_process_mb: float
    returncode: int


def _tree_rss_mb(root_pid: int) -> float:
    """Resident memory of ``root_pid`` and all its descendants (MB), from ``/proc``."""
    parent, rss = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:  # the process ended meanwhile
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        pid = int(entry.name)
        parent[pid] = int(fields.get("PPid", "0").strip())
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) if "VmRSS" in fields else 0
    total, stack = 0, [root_pid]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += children.get(pid, [])
    return total / 1024


def run_level(name: str, cmd: list[str], log: Path) -> Level:
    """Run ``cmd`` (output to ``log``), sampling its process tree's memory every 0.5 s."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
    peak = [0.0]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                peak[0] = max(peak[0], _tree_rss_mb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    level = Level(name, wall, usage.ru_utime + usage.ru_stime, peak[0], usage.ru_maxrss / 1024,
                  proc.returncode)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: exit {level.returncode} in {wall:.0f} s "
          f"(log {log})", flush=True)
    return level


def subjects_of(n_patients: int, n_controls: int) -> list[str]:
    """Labels the simulator gives (``pat01..``, ``ctl01..``)."""
    return ([f"pat{i + 1:02d}" for i in range(n_patients)]
            + [f"ctl{i + 1:02d}" for i in range(n_controls)])


def dataset_complete(bids: Path, labels: list[str]) -> bool:
    """Whether a simulated dataset with fMRIPrep outputs is there for every subject/session."""
    if not (bids / "participants.tsv").exists():
        return False
    fmriprep = bids / "derivatives" / "fmriprep"
    for label in labels:
        effects = bids / "derivatives" / "groundtruth" / f"sub-{label}" / \
            f"sub-{label}_desc-planted_effects.tsv"
        if not effects.exists():
            return False
        for ses in SESSION_ROLES:
            folder = fmriprep / f"sub-{label}" / f"ses-{ses}" / "func"
            if not (list(folder.glob("*_desc-preproc_bold.nii.gz"))
                    and list(folder.glob("*_desc-confounds_timeseries.tsv"))):
                return False
    return True


def simulate(args: argparse.Namespace, bids: Path, labels: list[str]) -> Level | None:
    """Simulate the study unless a complete one with the same subjects and seed is there."""
    description = bids / "dataset_description.json"
    if description.exists() and (bids / "participants.tsv").exists():
        made = json.loads(description.read_text())["GeneratedBy"][0]["Description"]
        participants = pd.read_csv(bids / "participants.tsv", sep="\t")["participant_id"]
        if (f"seed={args.seed}" not in made.split()
                or sorted(participants) != sorted(f"sub-{s}" for s in labels)):
            raise SystemExit(f"{bids} holds another study ({made}, {len(participants)} "
                             "subjects); use another --root or delete that folder.")
    if dataset_complete(bids, labels):
        bold = next((bids / "derivatives" / "fmriprep").rglob("*_desc-preproc_bold.nii.gz"))
        found = nb.load(bold).shape[3]
        if args.volumes and found != args.volumes:
            raise SystemExit(f"{bids} has {found}-volume runs, not --volumes {args.volumes}; "
                             "use another --root or delete that folder.")
        print(f"reusing the simulated study in {bids} ({found}-volume runs)")
        return None
    volumes = ["--volumes", str(args.volumes)] if args.volumes else []
    level = run_level("simulate (trajectome-simulate --fmriprep)", [
        str(BIN / "trajectome-simulate"), str(bids), "--subjects", str(args.patients),
        "--controls", str(args.controls), "--seed", str(args.seed), "--fmriprep", *volumes],
        args.root / "simulate.log")
    if level.returncode or not dataset_complete(bids, labels):
        raise SystemExit(f"simulation failed or incomplete; see {args.root / 'simulate.log'}")
    return level


# --------------------------------------------------------------------------- truth


def _planted_table(bids: Path, label: str) -> pd.DataFrame:
    return pd.read_csv(bids / "derivatives" / "groundtruth" / f"sub-{label}"
                       / f"sub-{label}_desc-planted_effects.tsv", sep="\t")


def planted_effects(bids: Path, labels: list[str], modality: str = "func") -> pd.DataFrame:
    """Every subject's ``modality`` rows of ``sub-X_desc-planted_effects.tsv``, with the key."""
    frames = []
    for label in labels:
        table = _planted_table(bids, label)
        table = table[table["modality"] == modality].copy()
        table.insert(0, "subject", label)
        frames.append(table)
    out = pd.concat(frames, ignore_index=True)
    # the metric tables name a network pair in sorted order
    pair = np.sort(out[["network_a", "network_b"]].to_numpy(str), axis=1)
    out["network"], out["network_b_key"] = pair[:, 0], pair[:, 1]
    return out


def _population_metrics(path: Path, nodes: pd.DataFrame, seed: int) -> pd.DataFrame:
    from pipeline import metrics

    matrix = pd.read_csv(path, sep="\t", index_col=0).to_numpy(float)
    table = metrics.network_metrics(matrix, nodes, seed=seed, n_consensus=10)
    return table[table["scope"].isin(SCOPES)]


def population_changes(bids: Path, patients: list[str], cache: Path, seed: int,
                       desc: str = "population") -> pd.DataFrame:
    """Mean over patients of each FC metric's change on the planted FC, per contrast.

    ``desc="population"``: the model's population FC (no sampling noise; controls' is the
    same at every session, so only the patients are computed); ``desc="planted"``: the
    realised FC of the latent series (sampling noise as a perfect pipeline would see it).
    Cached in ``cache`` (the metric code is the app's).
    """
    if cache.exists():
        return pd.read_csv(cache, sep="\t", keep_default_na=False, na_values=["n/a"])
    from pipeline.simulate.mni import load_mni_model

    nodes = load_mni_model(2).table
    rows = []
    for label in patients:
        values = {}
        for ses, role in SESSION_ROLES.items():
            gt = bids / "derivatives" / "groundtruth" / f"sub-{label}" / f"ses-{ses}" / "func"
            path = next(gt.glob(f"*_atlas-{ATLAS}_desc-{desc}_stat-pearsoncorrelation_"
                                "relmat.tsv"))
            values[role] = _population_metrics(path, nodes, seed).set_index(
                ["metric", "scope", "network", "network_b"])["value"]
        for contrast, (plus, minus) in CONTRAST_ROLES.items():
            delta = (values[plus] - values[minus]).rename("delta").reset_index()
            rows.append(delta.assign(subject=label, contrast=contrast))
    table = pd.concat(rows, ignore_index=True)
    table = (table.groupby(["metric", "scope", "network", "network_b", "contrast"])["delta"]
             .agg(pop_delta="mean", pop_max_abs=lambda d: float(np.abs(d).max()))
             .reset_index())
    table.insert(0, "modality", "fc")
    table.to_csv(cache, sep="\t", index=False, na_rep="n/a")
    return table


# --------------------------------------------------------------------------- scoring


def read_lme(out: Path, modality: str = "fc") -> pd.DataFrame:
    """``modality`` rows of the modelled scopes of ``group/desc-lme_stats.tsv``."""
    lme = pd.read_csv(out / "group" / "desc-lme_stats.tsv", sep="\t", keep_default_na=False,
                      na_values=["n/a", ""], dtype={"network": str, "network_b": str,
                                                    "node": str, "skipped": str})
    for column in ("network", "network_b", "node", "skipped"):
        lme[column] = lme[column].fillna("")
    return lme[(lme["modality"] == modality) & lme["scope"].isin(SCOPES)
               & (lme["atlas"] == ATLAS)].copy()


def score_planted(lme: pd.DataFrame, effects: pd.DataFrame) -> pd.DataFrame:
    """One row per planted FC effect x contrast: planted mean change vs the patient model."""
    rows = []
    for (effect, net_a, net_b), part in effects.groupby(["effect", "network", "network_b_key"]):
        pat = part[part["subject"].str.startswith("pat")]  # the simulator's patient labels
        planted = bool((part["planted"] == "yes").any())
        key = ((lme["metric"] == "connectivity") & (lme["scope"] == "network_pair")
               & (lme["network"] == net_a) & (lme["network_b"] == net_b))
        for contrast, (plus, minus) in CONTRAST_ROLES.items():
            expected = float((pat[plus] - pat[minus]).mean())
            fit = {m: lme[key & (lme["model"] == m) & (lme["contrast"] == contrast)]
                   for m in ("patient", "control", "patient_minus_control")}
            row = fit["patient"].iloc[0]
            sign_ok = np.sign(row["estimate"]) == np.sign(expected)
            rows.append({
                "effect": effect, "metric": f"{net_a}-{net_b}", "planted": planted,
                "contrast": contrast, "planted_change": expected,
                "estimate": row["estimate"], "t": row["t"], "q": row["q"],
                "detected": bool(row["q"] < Q and sign_ok) if planted else bool(row["q"] < Q),
                "q_control": float(fit["control"]["q"].iloc[0]),
                "q_difference": float(fit["patient_minus_control"]["q"].iloc[0]),
            })
    return pd.DataFrame(rows)


def classify_truth(lme: pd.DataFrame, pop: pd.DataFrame, realised: pd.DataFrame,
                   implied_sd: float) -> pd.DataFrame:
    """Patient-model rows with their expected change (``reference``) and truth class.

    Means over edges of the signed FC (:data:`LINEAR_METRICS`) are linear in the FC, so
    their expected change is the population change: ``null`` when it is exactly 0 for
    every patient, else ``implied`` (at least ``implied_sd`` within-subject residual SDs)
    or ``negligible``.  Graph measures keep only positive weights (and Louvain modules),
    so the noiseless population FC does not predict them: a planted shift of edges that
    are negative in the population (e.g. SomatomotorDorsal-DefaultMode, -0.03 -> -0.02)
    leaves them unchanged there but moves them on any noisy FC, where half those edges are
    positive.  Their reference is the change on the realised FC of the latent series
    (``desc-planted``: what a perfect pipeline measures) and their class ``graph``.
    """
    realised = realised.rename(columns={"pop_delta": "realised_delta",
                                        "pop_max_abs": "realised_max_abs"})
    pat = (lme[lme["model"] == "patient"].merge(pop, on=[*KEY, "contrast"], how="left")
           .merge(realised, on=[*KEY, "contrast"], how="left"))
    resid_sd = np.sqrt(pat["residual_var"].astype(float))
    linear = pat["metric"].isin(LINEAR_METRICS)
    unchanged = pat["pop_max_abs"].fillna(0.0) <= 1e-9
    big = pat["pop_delta"].abs() >= implied_sd * resid_sd
    pat["truth"] = np.select([linear & unchanged, linear & big, linear],
                             ["null", "implied", "negligible"], "graph")
    pat["reference"] = pat["pop_delta"].where(linear, pat["realised_delta"])
    pat["modelled"] = pat["skipped"] == ""
    return pat


def truth_summary(pat: pd.DataFrame) -> pd.DataFrame:
    """Per contrast and truth class: metrics modelled, q < 0.05, hits with the expected sign."""
    pat = pat[pat["modelled"]]
    hit = pat["q"] < Q
    right = hit & (np.sign(pat["estimate"]) == np.sign(pat["reference"]))
    return (pat.assign(hit=hit, right=right)
            .groupby(["contrast", "truth"])
            .agg(n_metrics=("hit", "size"), q_lt_05=("hit", "sum"), right_sign=("right", "sum"),
                 p_lt_05=("p", lambda p: int((p < Q).sum())))
            .reset_index())


def score_classes(out: Path, effects: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Maintenance class per patient and planted metric vs the planted class."""
    planted = effects[effects["planted"] == "yes"]
    rows = []
    for label, part in planted.groupby("subject"):
        path = out / f"sub-{label}" / f"sub-{label}_desc-changes_metrics.tsv"
        changes = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["n/a"],
                              dtype={"network": str, "network_b": str, "node": str})
        changes = changes[(changes["modality"] == "fc") & (changes["metric"] == "connectivity")
                          & (changes["scope"] == "network_pair")
                          & (changes["is_last"].astype(str).str.lower() == "true")]
        for row in part.itertuples(index=False):
            match = changes[(changes["network"] == row.network)
                            & (changes["network_b"] == row.network_b_key)]
            got = match.iloc[0]
            a_true = row.post - row.pre
            rows.append({
                "subject": label, "effect": row.effect, "planted_class": row.maintenance_class,
                "called": got["maintenance_class"], "correct":
                    got["maintenance_class"] == row.maintenance_class,
                "planted_ratio": (row.maintenance - row.post) / a_true,
                "measured_ratio": got["maintenance_change"] / got["acute_change"],
                "acute_z": got["acute_change"] / got["se_acute"],
                "maint_z": got["maintenance_change"] / got["se_maintenance_change"],
                "ratio_in_bin": _in_bin(got["maintenance_change"] / got["acute_change"],
                                        row.maintenance_class),
                "class_probability": got["class_probability"],
                "qc_flag": got["qc_flag"],
            })
    detail = pd.DataFrame(rows)
    summary = (detail.groupby("effect")
               .agg(n_patients=("correct", "size"), n_correct=("correct", "sum"),
                    n_ratio_in_bin=("ratio_in_bin", "sum"))
               .reset_index())
    summary["fraction"] = summary["n_correct"] / summary["n_patients"]
    summary["fraction_ratio_in_bin"] = summary["n_ratio_in_bin"] / summary["n_patients"]
    return summary, detail


#: Planted effect outside FC -> (modality, metric, scope, network, nodes summed).
STRUCTURE_EFFECTS = {
    "hippocampal_volume": ("anat", "volume_mm3", "structure", "",
                           ("hippocampus_L", "hippocampus_R")),
    # planted as the Pearson SC-FC correlation over all DMN pairs: the all-pairs within-
    # network coupling measures that; the rank coupling over connected edges and the
    # regional (Baum) DMN mean are scored beside it
    "dmn_sc_fc_coupling": ("coupling", "sc_fc_within_pearson", "network", "DefaultMode",
                           ("",)),
    "dmn_sc_fc_coupling_rank": ("coupling", "sc_fc_within_spearman", "network", "DefaultMode",
                                ("",)),
    "dmn_sc_fc_coupling_regional": ("coupling", "sc_fc_spearman", "network", "DefaultMode",
                                    ("",)),
}


def _planted_effect(effect: str) -> str:
    """The planted effect a :data:`STRUCTURE_EFFECTS` entry measures."""
    return effect.removesuffix("_regional").removesuffix("_rank")


def _structure_effect(planted: pd.DataFrame, changes: pd.DataFrame, effect: str
                      ) -> tuple[pd.Series, pd.DataFrame]:
    """The planted row of a :data:`STRUCTURE_EFFECTS` entry and its measured change rows."""
    modality, metric, scope, network, nodes = STRUCTURE_EFFECTS[effect]
    truth = planted[planted["effect"] == _planted_effect(effect)].iloc[0]
    got = changes[(changes["modality"] == modality) & (changes["metric"] == metric)
                  & (changes["scope"] == scope) & (changes["network"] == network)
                  & changes["node"].isin(nodes)]
    return truth, got


def _changes(out: Path, label: str) -> pd.DataFrame:
    path = out / f"sub-{label}" / f"sub-{label}_desc-changes_metrics.tsv"
    changes = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["n/a"],
                          dtype={"network": str, "network_b": str, "node": str})
    return changes[changes["is_last"].astype(str).str.lower() == "true"]


def score_structure(out: Path, bids: Path, labels: list[str]) -> tuple[pd.DataFrame,
                                                                        pd.DataFrame]:
    """Hippocampal volume and DMN coupling: group model per contrast, and per patient.

    Group rows: the patient and control models of each summed node (left and right
    hippocampus are modelled apart).  Per patient: the planted change post - pre of the
    effect (``sub-X_desc-planted_effects.tsv``) against the measured acute change of the
    same quantity (left + right for the hippocampus) in ``sub-X_desc-changes_metrics.tsv``,
    and the maintenance class called against the planted one.
    """
    lme = pd.concat([read_lme(out, m) for m in {v[0] for v in STRUCTURE_EFFECTS.values()}])
    rows = []
    for effect, (modality, metric, scope, network, nodes) in STRUCTURE_EFFECTS.items():
        for node in nodes:
            key = ((lme["modality"] == modality) & (lme["metric"] == metric)
                   & (lme["scope"] == scope) & (lme["network"] == network)
                   & (lme["node"] == node))
            for contrast in CONTRAST_ROLES:
                fit = {m: lme[key & (lme["model"] == m) & (lme["contrast"] == contrast)]
                       for m in ("patient", "control")}
                if fit["patient"].empty:
                    continue
                row = fit["patient"].iloc[0]
                rows.append({"effect": effect, "node": node or network, "contrast": contrast,
                             "estimate": row["estimate"], "t": row["t"], "q": row["q"],
                             "q_control": float(fit["control"]["q"].iloc[0])
                             if not fit["control"].empty else np.nan})
    group = pd.DataFrame(rows)
    detail = []
    for label in labels:
        planted = _planted_table(bids, label)
        changes = _changes(out, label)
        for effect, (modality, _, _, _, nodes) in STRUCTURE_EFFECTS.items():
            truth, got = _structure_effect(planted, changes, effect)
            if len(got) != len(nodes):
                continue
            pre, post = float(got["value_pre"].sum()), float(got["value_post"].sum())
            detail.append({
                "subject": label, "effect": effect,
                "planted_change": truth["post"] - truth["pre"],
                "measured_change": post - pre,
                "planted_pct": 100 * (truth["post"] / truth["pre"] - 1)
                if modality == "anat" else np.nan,
                "measured_pct": 100 * (post / pre - 1) if modality == "anat" else np.nan,
                "planted_class": truth["maintenance_class"] if label.startswith("pat") else "",
                "called": got["maintenance_class"].iloc[0] if len(nodes) == 1 else "",
            })
    detail = pd.DataFrame(detail)
    if not detail.empty:
        detail["recovered"] = detail["measured_change"] / detail["planted_change"]
    return group, detail


def score_structure_classes(out: Path, bids: Path, patients: list[str]) -> tuple[pd.DataFrame,
                                                                                 pd.DataFrame]:
    """Maintenance class of every node of the structure effects vs the planted class.

    The planted class of a patient applies to all its effects, so the left and the right
    hippocampus are each scored against it.
    """
    rows = []
    for label in patients:
        planted = _planted_table(bids, label)
        changes = _changes(out, label)
        for effect, (_, _, _, network, _) in STRUCTURE_EFFECTS.items():
            truth, found = _structure_effect(planted, changes, effect)
            planted_ratio = ((truth["maintenance"] - truth["post"])
                             / (truth["post"] - truth["pre"]))
            for _, got in found.iterrows():
                rows.append({
                    "subject": label, "effect": effect, "node": got["node"] or network,
                    "planted_class": truth["maintenance_class"],
                    "called": got["maintenance_class"],
                    "correct": got["maintenance_class"] == truth["maintenance_class"],
                    "planted_ratio": planted_ratio,
                    # the realised truth's own ratio in the class's bin: the ceiling
                    "planted_in_bin": _in_bin(planted_ratio, truth["maintenance_class"]),
                    "measured_ratio": got["maintenance_change"] / got["acute_change"],
                    "acute_z": got["acute_change"] / got["se_acute"],
                    "class_probability": got["class_probability"],
                })
    detail = pd.DataFrame(rows)
    if detail.empty:
        return detail, detail
    summary = (detail.groupby(["effect", "node"])
               .agg(n_patients=("correct", "size"), n_correct=("correct", "sum"),
                    n_planted_in_bin=("planted_in_bin", "sum"))
               .reset_index())
    summary["fraction"] = summary["n_correct"] / summary["n_patients"]
    return summary, detail


def volume_se_calibration(out: Path, controls: list[str]) -> pd.DataFrame:
    """Controls' volume changes in units of their stated error (ideally SD 1, mean 0).

    Nothing changes in a control, so ``(post - pre) / se_acute`` (and likewise for the
    maintenance contrasts) measures how well ``volume_se_mm3`` matches the real
    session-to-session error, over the four hippocampus/amygdala sums (the change tables
    follow structures, not single parcels).
    """
    rows = []
    for label in controls:
        changes = _changes(out, label)
        vol = changes[(changes["modality"] == "anat") & (changes["metric"] == "volume_mm3")
                      & changes["node"].str.match(r"(hippocampus|amygdala)_")]
        for contrast, change, se in (("post_vs_pre", "acute_change", "se_acute"),
                                     ("maintenance_vs_post", "maintenance_change",
                                      "se_maintenance_change")):
            z = (vol[change] / vol[se]).replace([np.inf, -np.inf], np.nan)
            rows += [{"contrast": contrast, "nodes": "hippocampus/amygdala", "z": v}
                     for v in z.dropna()]
    z = pd.DataFrame(rows)
    if z.empty:
        return z
    return (z.groupby(["contrast", "nodes"])["z"]
            .agg(n="size", mean="mean", sd="std",
                 within_2=lambda v: float((v.abs() < 2).mean()))
            .reset_index())


def control_summary(lme: pd.DataFrame) -> pd.DataFrame:
    """Control model: modelled metrics and q < 0.05 (p < 0.05) per contrast."""
    ctl = lme[(lme["model"] == "control") & (lme["skipped"] == "")]
    return (ctl.assign(hit=ctl["q"] < Q, nominal=ctl["p"] < Q)
            .groupby("contrast").agg(n_metrics=("hit", "size"), q_lt_05=("hit", "sum"),
                                     p_lt_05=("nominal", "sum"))
            .reset_index())


def qc_summary(out: Path) -> str:
    """Sessions left out of the group statistics (QC flags), from the group table."""
    path = out / "group" / "desc-excluded_sessions.tsv"
    if not path.exists():
        return "excluded sessions: table missing"
    table = pd.read_csv(path, sep="\t", keep_default_na=False)
    if table.empty:
        return "excluded sessions (QC): none"
    return "excluded sessions (QC): " + ", ".join(
        f"sub-{r.subject} ses-{r.session}" for r in table.itertuples(index=False))


# --------------------------------------------------------------------------- main


def _print(title: str, table: pd.DataFrame) -> None:
    print(f"\n{title}")
    with pd.option_context("display.width", 200, "display.max_columns", 30,
                           "display.max_rows", 200, "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    """Simulate, run both levels, score and print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/study"),
                        help="scratch folder: bids/, work/, out/, logs (reused)")
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--controls", type=int, default=5)
    parser.add_argument("--seed", type=int, default=20261122, help="simulator seed")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--volumes", type=int,
                        help="BOLD volumes per run (simulator default: 122, ~4 min)")
    parser.add_argument("--sloppy", action="store_true",
                        help="participant level with --sloppy (20 bootstrap resamples for the "
                             "FC standard errors instead of 100)")
    parser.add_argument("--implied-sd", type=float, default=0.1,
                        help="population change (in within-subject residual SDs) from which "
                             "a metric counts as implied by the planted effects")
    parser.add_argument("--modalities", nargs="+", choices=("func", "anat", "dwi"),
                        default=["func"],
                        help="participant-level modalities (anat + dwi add the hippocampal "
                             "and coupling effects; FC always from the simulated fMRIPrep)")
    parser.add_argument("--streamlines", type=int, default=100_000,
                        help="streamlines per session when dwi is run")
    parser.add_argument("--score-only", action="store_true",
                        help="score the existing outputs without running anything")
    args = parser.parse_args(argv)
    if args.patients < 10 or args.controls < 5:
        print("note: issue 6 asks for at least 10 patients and 5 controls", file=sys.stderr)
    args.root.mkdir(parents=True, exist_ok=True)
    bids, out, work = args.root / "bids", args.root / "out", args.root / "work"
    labels = subjects_of(args.patients, args.controls)
    levels: list[Level] = []
    if not args.score_only:
        sim = simulate(args, bids, labels)
        levels += [sim] if sim else []
        fmriprep = bids / "derivatives" / "fmriprep"
        common = [str(BIN / "trajectome"), str(bids), str(out)]
        sloppy = ["--sloppy"] if args.sloppy else []
        modalities = sorted(set(args.modalities) | {"func"})
        tracking = (["--streamlines", str(args.streamlines)] if "dwi" in modalities else [])
        levels.append(run_level(
            f"participant ({'+'.join(modalities)}, fMRIPrep{', sloppy' if sloppy else ''})", [
                *common, "participant", "--modalities", *modalities, "--fmriprep-dir",
                str(fmriprep), *tracking, *sloppy, "--nprocs", str(args.nprocs),
                "-w", str(work)],
            args.root / "participant.log"))
        levels.append(run_level("group", [*common, "group"], args.root / "group.log"))
        failed = [lv.name for lv in levels if lv.returncode]
        if failed:
            print(f"failed: {failed}; scoring what exists", file=sys.stderr)

    effects = planted_effects(bids, labels)
    patients = [s for s in labels if s.startswith("pat")]
    start = time.perf_counter()
    pop = population_changes(bids, patients, args.root / "population_changes.tsv", seed=42)
    realised = population_changes(bids, patients, args.root / "realised_changes.tsv", seed=42,
                                  desc="planted")
    pop_s = time.perf_counter() - start
    lme = read_lme(out)
    planted = score_planted(lme, effects)
    truth = classify_truth(lme, pop, realised, args.implied_sd)
    summary = truth_summary(truth)
    classes, detail = score_classes(out, effects)
    controls = control_summary(lme)

    print(f"\nstudy: {args.patients} patients + {args.controls} controls x "
          f"{len(SESSION_ROLES)} sessions, seed {args.seed}, root {args.root}")
    print(qc_summary(out))
    _print("Planted FC effects (patient model; detected = q < 0.05 with the planted sign; "
           "visual_within_fc is the unplanted control: detected = q < 0.05)", planted)
    _print(f"Every modelled FC metric (null: FC mean unchanged in the planted model; implied/"
           f"negligible: FC mean changed by >= / < {args.implied_sd} residual SD; graph: graph "
           "measure, expected sign from the realised planted FC; right_sign: q < 0.05 with the "
           "expected sign)", summary)
    hits = truth[truth["modelled"] & (truth["q"] < Q)]
    null = truth[truth["modelled"] & (truth["truth"] == "null")]
    n_means = len(null[KEY].drop_duplicates())
    print(f"\nfalse positives (q < 0.05) among the {n_means} null FC means over "
          f"{null['contrast'].nunique()} contrasts ({len(null)} tests): "
          f"{int((null['q'] < Q).sum())}")
    if not hits.empty:
        _print("Every q < 0.05 (pop_delta: population change; realised_delta: change on the "
               "realised planted FC)", hits[[*KEY[1:], "contrast", "estimate", "q", "pop_delta",
                                             "realised_delta", "truth"]])
    _print("Maintenance classes, planted metrics (last maintenance session; ratio_in_bin: the "
           "measured maintenance/acute ratio alone falls in the planted class's bin)", classes)
    _print("Per patient", detail)
    _print("Controls (own mixed model): q < 0.05 per contrast over every modelled FC metric",
           controls)
    if {"anat", "dwi"} & set(args.modalities):
        group, per_subject = score_structure(out, bids, labels)
        _print("Hippocampal volume and DMN structure-function coupling (within-network "
               "all-pairs Pearson and rank, regional Spearman): "
               "patient model per contrast, q_control from the control model", group)
        _print("Per subject: planted vs measured post - pre (left + right hippocampus), "
               "maintenance class", per_subject)
        if not per_subject.empty:
            hipp = per_subject[(per_subject["effect"] == "hippocampal_volume")
                               & per_subject["subject"].str.startswith("pat")]
            print(f"\nhippocampal change recovered (measured / planted post - pre), patients: "
                  f"mean {hipp['recovered'].mean():.2f}, median {hipp['recovered'].median():.2f}, "
                  f"range {hipp['recovered'].min():.2f}-{hipp['recovered'].max():.2f}, "
                  f"right sign {int((hipp['recovered'] > 0).sum())}/{len(hipp)}")
        node_classes, node_detail = score_structure_classes(out, bids, patients)
        _print("Maintenance classes of the structure effects, per node (the patient's planted "
               "class)", node_classes)
        _print("Per patient and node", node_detail)
        _print("Volume error calibration in controls: change / its standard error (ideal: "
               "mean 0, SD 1, 95 % within 2)",
               volume_se_calibration(out, [s for s in labels if s.startswith("ctl")]))
        for modality in ("anat", "sc", "coupling"):
            ctl = control_summary(read_lme(out, modality))
            if not ctl.empty:
                _print(f"Controls, {modality}: q < 0.05 per contrast", ctl)
    print("\nResources (load average at the end: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())})")
    print(f"{'level':<44}{'wall s':>9}{'CPU s':>9}{'peak tree MB':>14}{'peak proc MB':>14}")
    for lv in levels:
        print(f"{lv.name:<44}{lv.wall_s:>9.0f}{lv.cpu_s:>9.0f}{lv.peak_tree_mb:>14.0f}"
              f"{lv.peak_process_mb:>14.0f}")
    print(f"{'truth metrics (bench only, cached)':<44}{pop_s:>9.0f}")
    return 1 if any(lv.returncode for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
