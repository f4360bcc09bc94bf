"""One realistic subject end to end through the ``trajectome`` command (issue 10).

Simulates the subject unless ``ROOT/bids`` exists (``trajectome-simulate ROOT/bids --preset
realistic --subjects 1 --controls 0 --seed 11``: 3 sessions, 1 mm T1w, 2 mm BOLD of 300
volumes, 2 mm DWI with 64 directions), runs the participant level with ``--resource-monitor``
while sampling the whole process tree every 0.5 s, then reads every node's result file in
``ROOT/work`` and prints:

* the run: wall, CPU (user + sys of every descendant), peak memory of the process tree;
* a table per stage (nodes, summed wall, CPU, largest peak RSS, the scheduler's reservation),
  the first start / last end per modality, the nodes running at the memory peak, the sizes
  of the work and output folders;
* anchors on the run's own intermediate files of one session: parcel extraction against
  the time to read the BOLD and against nilearn's ``NiftiLabelsMasker``; tracking
  throughput against MRtrix3 ``tckgen`` at equal threads (when installed); the workflow's
  own tracking node;
* the issue's targets, each MET / NOT MET.

The same tables go to ``ROOT/bench_subject.md``; the run's own numbers to
``ROOT/bench_subject_run.json`` and every process's memory samples to
``ROOT/bench_subject_samples.tsv.gz``, so ``--anchors-only`` can report them again::

    nice -n 10 python bench/bench_subject.py --root /tmp/real          # long: see bench/README.md
    python bench/bench_subject.py --root /tmp/real --anchors-only      # reuse ROOT/work
    python bench/bench_subject.py --root /tmp/tiny --preset tiny --streamlines 2000 -- --sloppy

Arguments after ``--`` go to ``trajectome`` unchanged.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_dwi import _tckgen, mrtrix_fods
from bench.measure import StageResult, run_stage
from pipeline.derivatives import atomic_write, write_json, write_with

BIN = Path(sys.executable).parent
SAMPLE_S = 0.5
GB = 1024**3
#: Issue 10's targets.
TARGET_WALL_MIN, TARGET_PEAK_GB, TARGET_TRACK_GB, TARGET_WORK_GB = 45.0, 8.0, 1.5, 10.0

#: Interface class -> (modality, stage), in the order the stage table lists them.
STAGES: dict[str, tuple[str, str]] = {
    "PreprocessT1w": ("anat", "N4, brain extraction, tissues"),
    "SubjectTemplate": ("anat", "within-subject template (rigid)"),
    "LongitudinalWarp": ("anat", "session -> template SyN"),
    "RegisterToMNI": ("anat", "registration to MNI"),
    "ComposeTransforms": ("anat", "registration to MNI"),
    "WarpAtlas": ("anat", "atlas to T1w, regional volumes"),
    "RegionalVolumes": ("anat", "atlas to T1w, regional volumes"),
    "FMRIPrepInputs": ("func", "fMRIPrep inputs"),
    "RealignBold": ("func", "realign"),
    "CoregisterBold": ("func", "coregister to T1w"),
    "ResampleToTemplate": ("func", "resample to MNI (one shot)"),
    "BoldConfounds": ("func", "confounds"),
    "ParcelSignals": ("func", "parcel signals"),
    "DenoiseConnectivity": ("func", "denoise, connectivity"),
    "LoadQsiprep": ("dwi", "QSIPrep inputs"),
    "PreprocessDwiRun": ("dwi", "preprocess (MP-PCA, unring, motion)"),
    "ConcatenateDwi": ("dwi", "preprocess (MP-PCA, unring, motion)"),
    "RegisterDwiToT1w": ("dwi", "register to T1w"),
    "FitDiffusionModels": ("dwi", "DTI + fibre model fit"),
    "DetectOutliers": ("dwi", "outliers, QC"),
    "DwiQC": ("dwi", "outliers, QC"),
    "TrackConnectomes": ("dwi", "tracking + connectomes"),
    "SessionMetrics": ("metrics", "network metrics, coupling"),
    "RecordsToTSV": ("metrics", "session tables"),
    "CheckInput": ("inputs", "input checks"),
    "DerivativesSink": ("outputs", "derivative sinks (scheduler process)"),
}
GLUE = ("Merge", "Select", "Split", "IdentityInterface", "Function", "Rename")
_POST_STEP = re.compile(r"\[sub-(\w+)\] (trajectories|report): done in ([\d.]+) s")


# --------------------------------------------------------------------------- tables


@dataclass
class Table:
    """A titled table, printed fixed-width and written as Markdown."""

    title: str
    headers: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    left: int = 1  # leading columns aligned left (text), the rest right (numbers)

    def text(self) -> str:
        cells = [self.headers] + [[str(c) for c in row] for row in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.headers))]
        lines = [f"== {self.title}"]
        for row in cells:
            lines.append("  ".join(c.ljust(w) if i < self.left else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        return "\n".join(lines + [f"  {n}" for n in self.notes])

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.headers) + " |",
                 "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines + ([""] + [f"- {n}" for n in self.notes] if self.notes else []))


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:,.{digits}f}"


# --------------------------------------------------------------------------- the run


@dataclass
class AppRun:
    """Resources of the ``trajectome`` process tree."""

    command: list[str]
    returncode: int
    start_epoch: float
    wall_s: float
    cpu_s: float  # getrusage(RUSAGE_CHILDREN) delta: every descendant that was waited for
    cpu_sampled_s: float  # psutil: last sampled user+sys of every process seen
    peak_rss_gb: float  # summed RSS of the tree (shared pages counted in each process)
    peak_pss_gb: float  # summed PSS (shared pages split): what the tree really held
    peak_at_s: float


def _sample_tree(proc: Any, cpu_seen: dict[tuple[int, float], float],
                 rows: list[tuple[float, int, int, int]], now: float) -> tuple[float, float]:
    """Summed RSS and PSS (bytes) of ``proc`` and its descendants.

    Records each process's CPU time in ``cpu_seen`` and ``(now, pid, ppid, rss)`` in ``rows``.
    """
    import psutil

    rss = pss = 0.0
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    for member in members:
        try:
            with member.oneshot():
                times = member.cpu_times()
                cpu_seen[(member.pid, member.create_time())] = times.user + times.system
                info = member.memory_full_info()
                ppid = member.ppid()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        rows.append((now, member.pid, ppid, info.rss))
    return rss, pss


def run_app(command: list[str], log: Path, samples: Path) -> AppRun:
    """Run ``command`` (output to ``log``), sampling its process tree every 0.5 s.

    Every process's RSS at every sample goes to ``samples`` (TSV: epoch, pid, ppid, rss).
    """
    import psutil

    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(command)}  (log {log})", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seen: dict[tuple[int, float], float] = {}
    rows: list[tuple[float, int, int, int]] = []
    peak_rss = peak_pss = peak_at = 0.0
    start_epoch, start = time.time(), time.perf_counter()
    with open(log, "w") as out:
        proc = psutil.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        while True:
            rss, pss = _sample_tree(proc, cpu_seen, rows, time.time())
            if rss > peak_rss:
                peak_rss, peak_at = rss, time.perf_counter() - start
            peak_pss = max(peak_pss, pss)
            try:
                returncode = proc.wait(timeout=SAMPLE_S)
                break
            except psutil.TimeoutExpired:
                continue
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"[{time.strftime('%H:%M:%S')}] exit {returncode} after {wall:.0f} s", flush=True)
    table = pd.DataFrame(rows, columns=["epoch", "pid", "ppid", "rss"])
    write_with(samples, lambda tmp: table.to_csv(tmp, sep="\t", index=False))
    return AppRun(command, returncode, start_epoch, wall, cpu, sum(cpu_seen.values()),
                  peak_rss / GB, peak_pss / GB, peak_at)


def simulate(root: Path, preset: str, seed: int) -> None:
    """Write ``ROOT/bids`` with the simulator."""
    command = [str(BIN / "trajectome-simulate"), str(root / "bids"), "--preset", preset,
               "--subjects", "1", "--controls", "0", "--seed", str(seed)]
    print(f"simulating: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with open(root / "simulate.log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"trajectome-simulate failed (exit {code}); see {root / 'simulate.log'}")
    print(f"simulated in {time.perf_counter() - start:.0f} s", flush=True)


# --------------------------------------------------------------------------- node results


@dataclass
class NodeRecord:
    """What one node's result file (and its pickled node) says."""

    path: str
    interface: str
    modality: str
    stage: str
    session: str | None
    start: float
    end: float
    duration: float
    mem_peak_gb: float | None
    cpu_percent: float | None
    cpu_s: float | None  # integral of the sampled CPU %
    pid: int | None  # the worker that ran it (from the monitor's file name)
    n_procs: int | None
    mem_gb: float | None  # the scheduler's reservation
    in_scheduler: bool  # run_without_submitting: its monitor saw the whole tree
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    bench_peak_gb: float | None = None  # from this bench's own samples of the worker


def _epoch(stamp: str) -> float:
    moment = datetime.fromisoformat(stamp)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _sampled_cpu_s(prof: dict[str, list[float]] | None) -> float | None:
    """CPU seconds from the monitor's samples: each CPU % covers the interval before it."""
    if not prof or len(prof.get("time", [])) < 2:
        return None
    times, cpus = np.asarray(prof["time"]), np.asarray(prof["cpus"])
    return float(np.sum(cpus[1:] / 100 * np.diff(times)))


def _worker_pid(resmon: str) -> int | None:
    """The pid in the resource monitor's file name (``.proc-<pid>_time-...``)."""
    found = re.search(r"\.proc-(\d+)_", resmon or "")
    return int(found.group(1)) if found else None


def attach_bench_peaks(nodes: list[NodeRecord], samples: Path) -> None:
    """Each node's peak RSS (worker + its children) from this bench's samples.

    Nipype's monitor is a thread in the worker: while a C extension holds the GIL (ANTs
    registration) it takes no sample, so its peak can miss the whole call.  These samples
    come from outside the process.
    """
    if not samples.exists():
        return
    table = pd.read_csv(samples, sep="\t")
    for node in nodes:
        if node.pid is None or node.in_scheduler:
            continue
        window = table[(table["epoch"] >= node.start) & (table["epoch"] <= node.end)]
        own = window[(window["pid"] == node.pid) | (window["ppid"] == node.pid)]
        if not own.empty:
            node.bench_peak_gb = float(own.groupby("epoch")["rss"].sum().max() / GB)


def classify(interface: str, path: str) -> tuple[str, str, str | None]:
    """(modality, stage, session label) of a node from its interface class and path."""
    session = re.search(r"_ses_([0-9A-Za-z]+)_wf", path)
    label = session.group(1) if session else None
    if interface in STAGES:
        return (*STAGES[interface], label)
    if interface in GLUE:
        return "glue", "merge / select / function nodes", label
    return "other", f"other: {interface}", label


def read_results(work: Path) -> list[NodeRecord]:
    """Every ``result_<node>.pklz`` under ``work``."""
    from nipype.utils.filemanip import loadpkl

    records = []
    for result_file in sorted(work.rglob("result_*.pklz")):
        try:
            result = loadpkl(result_file)
        except Exception as err:  # a half-written or foreign file must not stop the report
            print(f"skipping {result_file}: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        runtime = result.runtime
        if isinstance(runtime, list) or getattr(runtime, "startTime", None) is None:
            continue  # MapNode parents and nodes that never ran
        node_file = result_file.parent / "_node.pklz"
        n_procs = mem_gb = None
        in_scheduler = False
        if node_file.exists():
            node = loadpkl(node_file)
            n_procs, mem_gb = node.n_procs, node.mem_gb
            in_scheduler = bool(node.run_without_submitting)
        rel = result_file.parent.relative_to(work).as_posix()
        modality, stage, session = classify(runtime.interface, rel)
        outputs = result.outputs.get() if result.outputs is not None else {}
        records.append(NodeRecord(
            rel, runtime.interface, modality, stage, session, _epoch(runtime.startTime),
            _epoch(runtime.endTime), float(runtime.duration),
            getattr(runtime, "mem_peak_gb", None), getattr(runtime, "cpu_percent", None),
            _sampled_cpu_s(getattr(runtime, "prof_dict", None)),
            _worker_pid(getattr(runtime, "resmon", "")), n_procs, mem_gb,
            in_scheduler, dict(result.inputs or {}), outputs,
        ))
    return records


def stage_table(nodes: list[NodeRecord]) -> Table:
    """Nodes, summed wall, CPU and the largest peak per stage."""
    order = {stage: i for i, stage in enumerate(dict.fromkeys(s for _, s in STAGES.values()))}
    groups: dict[tuple[str, str], list[NodeRecord]] = defaultdict(list)
    for node in nodes:
        groups[(node.modality, node.stage)].append(node)
    table = Table("Per stage (from the nodes' result files)", [
        "modality", "stage", "nodes", "wall s (sum)", "CPU s (sampled)", "CPU s (wall x max%)",
        "peak GB (nipype)", "peak GB (bench)", "reserved GB", "threads"], left=2)
    for (modality, stage), group in sorted(groups.items(),
                                           key=lambda kv: (order.get(kv[0][1], 99), kv[0])):
        own = [n for n in group if not n.in_scheduler]
        peaks = [n.mem_peak_gb for n in own if n.mem_peak_gb is not None]
        outside = [n.bench_peak_gb for n in own if n.bench_peak_gb is not None]
        sampled = [n.cpu_s for n in own if n.cpu_s is not None]
        upper = [n.duration * n.cpu_percent / 100 for n in own if n.cpu_percent is not None]
        reserved = [n.mem_gb for n in group if n.mem_gb is not None]
        threads = [n.n_procs for n in group if n.n_procs is not None]
        table.rows.append([
            modality, stage, len(group), _f(sum(n.duration for n in group)),
            _f(sum(sampled)) if sampled else "n/a", _f(sum(upper)) if upper else "n/a",
            _f(max(peaks), 2) if peaks else "n/a", _f(max(outside), 2) if outside else "n/a",
            _f(max(reserved), 1) if reserved else "n/a",
            max(threads) if threads else "n/a"])
    table.notes = [
        "CPU s (sampled): the monitor's CPU % integrated over its 0.5 s samples; "
        "CPU s (wall x max%): duration x runtime.cpu_percent (the highest sample), an upper "
        "bound that single short samples inflate (they can exceed the core count).",
        "peak GB (nipype): runtime.mem_peak_gb, RSS of the node's process and children from "
        "Nipype's monitor thread, which samples nothing while a C extension holds the GIL "
        "(ANTs registration: often only the start and the end); peak GB (bench): the same "
        "processes sampled from outside by this bench every 0.5 s. Both count the libraries "
        "a forked worker shares with the scheduler (~0.35 GB). Sinks run in the scheduler "
        "process, whose monitor sees the whole tree: their peak and CPU are left out.",
        "reserved GB / threads: the node's mem_gb / n_procs (from _node.pklz), what MultiProc "
        "schedules by.",
    ]
    return table


def timeline_table(nodes: list[NodeRecord], origin: float) -> Table:
    """First start and last end per modality, seconds from the start of the run."""
    table = Table("Timeline (s from the start of the run)",
                  ["modality", "first start", "last end", "span", "wall s (sum)"])
    spans: dict[str, list[NodeRecord]] = defaultdict(list)
    for node in nodes:
        spans[node.modality].append(node)
    for modality in ("anat", "func", "dwi", "metrics", "outputs", "glue", "inputs", "other"):
        if modality not in spans:
            continue
        group = spans[modality]
        first, last = min(n.start for n in group) - origin, max(n.end for n in group) - origin
        table.rows.append([modality, _f(first), _f(last), _f(last - first),
                           _f(sum(n.duration for n in group))])
    return table


def top_nodes(nodes: list[NodeRecord], n: int = 12) -> Table:
    table = Table(f"Longest {n} nodes", ["node", "interface", "wall s", "CPU s (sampled)",
                                         "peak GB (nipype)", "peak GB (bench)", "reserved GB",
                                         "threads"], left=2)
    for node in sorted(nodes, key=lambda x: -x.duration)[:n]:
        table.rows.append([node.path.split("/", 1)[-1], node.interface, _f(node.duration),
                           _f(node.cpu_s), _f(node.mem_peak_gb, 2), _f(node.bench_peak_gb, 2),
                           _f(node.mem_gb, 1),
                           node.n_procs if node.n_procs is not None else "n/a"])
    return table


def post_steps(log: Path) -> list[tuple[str, str, float]]:
    """(subject, step, seconds) of the steps after the workflow, from the app's log."""
    if not log.exists():
        return []
    return [(m.group(1), m.group(2), float(m.group(3)))
            for m in _POST_STEP.finditer(log.read_text(errors="replace"))]


def disk_usage(path: Path) -> int:
    """Bytes on disk under ``path`` (hard links counted once), like ``du -s``."""
    seen, total = set(), 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                stat = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512
    return total


# --------------------------------------------------------------------------- anchor a: parcels


def _timed_read(path: str) -> float:
    start = time.perf_counter()
    # mmap=False: an uncompressed .nii would otherwise map the file and read nothing
    np.asarray(nb.load(path, mmap=False).dataobj)
    return time.perf_counter() - start


def _timed_ours(bold: str, atlas: nb.Nifti1Image, mask: str | None, values: np.ndarray,
                min_coverage: float) -> tuple[float, np.ndarray]:
    """What ParcelSignals does, from opening the file to the parcel means."""
    from pipeline import parcellate

    start = time.perf_counter()
    result = parcellate.parcel_timeseries(
        nb.load(bold, keep_file_open=True), atlas, nb.load(mask) if mask else None,
        label_values=values, min_coverage=min_coverage)
    return time.perf_counter() - start, result.timeseries


def _timed_nilearn(bold: str, atlas: str) -> tuple[float, np.ndarray, list[int]]:
    from nilearn.maskers import NiftiLabelsMasker

    start = time.perf_counter()
    masker = NiftiLabelsMasker(labels_img=atlas, strategy="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 'standardize' default change
        series = masker.fit_transform(bold)
    ids = [int(v) for k, v in masker.region_ids_.items() if k != "background"]
    return time.perf_counter() - start, series, ids


def anchor_parcels(node: NodeRecord) -> tuple[Table, dict[str, float]]:
    """Parcel extraction (as the node calls it) vs reading the BOLD vs nilearn."""
    import nilearn.maskers  # noqa: F401  imported before the forks, not timed in them

    from pipeline import parcellate, resample

    bold, atlas_file = node.inputs["bold"], node.inputs["atlas_image"]
    mask = node.inputs.get("mask")
    values = pd.read_csv(node.inputs["atlas_table"], sep="\t")["index"].to_numpy(np.int64)
    min_coverage = float(node.inputs.get("min_coverage", 0.5))
    bold_img, atlas = nb.load(bold), nb.load(atlas_file)
    if atlas.shape[:3] != bold_img.shape[:3] or not np.allclose(atlas.affine, bold_img.affine,
                                                                 atol=1e-3):
        atlas = resample.resample_labels(atlas, bold_img.shape[:3], bold_img.affine)
    stages: list[StageResult] = [
        run_stage("read BOLD (1st)", _timed_read, bold),
        run_stage("read BOLD (2nd)", _timed_read, bold),
        run_stage("ours: parcellate.parcel_timeseries", _timed_ours, bold, atlas, mask, values,
                  min_coverage),
        run_stage("nilearn NiftiLabelsMasker mean", _timed_nilearn, bold, atlas_file),
    ]
    read1, read2 = stages[0].value, stages[1].value
    ours_s, ours_ts = stages[2].value
    nil_s, nil_ts, nil_ids = stages[3].value
    # agreement on the same inputs: nilearn has no mask here, so neither does ours
    unmasked = parcellate.parcel_timeseries(bold_img, atlas, None, label_values=values,
                                            min_coverage=0.0).timeseries
    column = {v: i for i, v in enumerate(values)}
    shared = [(column[v], j) for j, v in enumerate(nil_ids) if v in column]
    a = unmasked[:, [i for i, _ in shared]]
    b = nil_ts[:, [j for _, j in shared]]
    ok = np.isfinite(a).all(axis=0)
    diff = float(np.max(np.abs(a[:, ok] - b[:, ok]))) if ok.any() else float("nan")
    scale = float(np.mean(np.abs(b[:, ok]))) if ok.any() else float("nan")
    kept = np.isfinite(ours_ts).all(axis=0)
    table = Table(f"Anchor a: parcel extraction, {Path(bold).name}", [
        "what", "s (inside)", "wall s (process)", "peak RSS MB"])
    for stage, seconds in zip(stages, (read1, read2, ours_s, nil_s), strict=True):
        table.rows.append([stage.name, _f(seconds, 3), _f(stage.wall_s, 3),
                           _f(stage.peak_rss_mb, 0)])
    shape = bold_img.shape
    table.notes = [
        f"BOLD {shape} {bold_img.get_data_dtype()}, {Path(bold).stat().st_size / 2**20:.0f} MB "
        f"on disk; atlas {Path(atlas_file).name}; {len(values)} parcels, "
        f"{int(kept.sum())} kept by ours (coverage >= {min_coverage}).",
        "Reads: np.asarray(nib.load(f, mmap=False).dataobj), the whole file into memory; the "
        "page cache was not dropped, so the 1st read may and the 2nd read (and ours and "
        "nilearn after it) do read from a warm cache.",
        "Ours: nib.load + parcellate.parcel_timeseries with the node's mask, label values and "
        "min_coverage (the atlas resampled to the BOLD grid beforehand when needed, untimed).",
        "nilearn: NiftiLabelsMasker(labels_img=atlas, strategy='mean').fit_transform(bold), "
        "no mask, no cleaning.",
        f"ours / read (2nd) = {ours_s / read2:.2f}; ours / read (1st) = {ours_s / read1:.2f}; "
        f"ours / nilearn = {ours_s / nil_s:.2f}.",
        f"Agreement (ours without mask vs nilearn, {int(ok.sum())} parcels): max |difference| "
        f"of the parcel means {diff:.3g} (mean |signal| {scale:.3g}).",
    ]
    return table, {"ours_s": ours_s, "read_s": read2, "read_cold_s": read1,
                   "nilearn_s": nil_s, "max_abs_diff": diff}


# --------------------------------------------------------------------------- anchor b: tracking


def _timed_track(files: dict[str, str], options: Any) -> dict[str, float]:
    """Our tracking loop alone (connectome bookkeeping off), as the node sets it up."""
    from pipeline import tractography

    fod = nb.load(files["fod"])
    maps = {k: np.asarray(nb.load(files[k]).dataobj, np.float64) for k in ("gm", "wm", "csf")}
    fa = np.asarray(nb.load(files["fa"]).dataobj, np.float64)
    options, criterion, seeds = tractography.prepare_tracking(options, fod.affine, fa=fa,
                                                              **maps)
    report = tractography.run_tracking(np.asarray(fod.dataobj, np.float64), fod.affine, seeds,
                                       criterion, options, lambda chunk: None)
    return {"n": report.n_streamlines, "seeds": report.n_seeds, "seconds": report.seconds,
            "step": report.step_size}


def tck_count(path: Path) -> int | None:
    """The ``count`` field of a TCK header."""
    with open(path, "rb") as handle:
        header = handle.read(8192).split(b"\nEND\n")[0].decode(errors="replace")
    found = re.search(r"^count:\s*(\d+)", header, flags=re.MULTILINE)
    return int(found.group(1)) if found else None


def _tckgen_masked(out: str, n: int, options: Any, step: float, seed: int) -> dict[str, float]:
    """tckgen iFOD2 stopping where the FA > threshold mask ends, ours' other settings."""
    flags = {"-algorithm": "iFOD2", "-seed_image": f"{out}/seeds.nii.gz",
             "-mask": f"{out}/fa_mask.nii.gz", "-select": n, "-step": f"{step:g}",
             "-angle": f"{options.max_angle:g}", "-minlength": f"{options.min_length:g}",
             "-maxlength": f"{options.max_length:g}", "-nthreads": options.n_threads}
    command = ["tckgen", f"{out}/fod_mrtrix.mif", f"{out}/tracks_mask.tck",
               *itertools.chain.from_iterable((k, str(v)) for k, v in flags.items()),
               "-force", "-quiet"]
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "MRTRIX_RNG_SEED": str(seed)})
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "count": tck_count(Path(out) / "tracks_mask.tck") or 0}


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    write_with(path, lambda tmp: nb.save(nb.Nifti1Image(data, affine), tmp))


def anchor_tracking(track: NodeRecord, concat: NodeRecord, n: int, out: Path
                    ) -> tuple[Table, dict[str, float]]:
    """Our tracking vs tckgen at equal threads on the session's own maps."""
    from pipeline import tractography

    inputs, report = track.inputs, track.outputs["report"]
    stopping = inputs["stopping"]
    options = tractography.TrackingOptions(
        algorithm=inputs["algorithm"], n_streamlines=n, seed=inputs["seed"],
        chunk_size=inputs["chunk_size"], n_threads=inputs["num_threads"], stopping=stopping,
        threshold=report["fa_threshold"] if stopping == "threshold" else None,
        seeding=inputs["seeding"])
    files = {k: inputs[k] for k in ("fod", "fa", "gm", "wm", "csf")}
    out.mkdir(parents=True, exist_ok=True)
    fa_img = nb.load(files["fa"])
    fa = np.asarray(fa_img.dataobj, np.float64)
    maps = {k: np.asarray(nb.load(files[k]).dataobj, np.float32) for k in ("gm", "wm", "csf")}
    # the seed image ours draws from (prepare_tracking), so tckgen starts from the same voxels
    seeds = tractography.seed_mask_for(options, wm=maps["wm"], gm=maps["gm"], fa=fa)
    _save(out / "seeds.nii.gz", seeds.astype(np.uint8), fa_img.affine)
    table = Table(f"Anchor b: tracking throughput, ses-{track.session}, {n:,} streamlines, "
                  f"{options.n_threads} thread(s)",
                  ["tracker", "streamlines", "s", "streamlines/s", "peak RSS MB"])
    ours = run_stage("ours", _timed_track, files, options)
    ours_rate = ours.value["n"] / ours.value["seconds"]
    table.rows.append([f"ours: DIPY {options.algorithm}, stopping={stopping}"
                       + (f" (FA < {options.threshold:.3f})" if stopping == "threshold" else ""),
                       f"{ours.value['n']:,}", _f(ours.value["seconds"]), _f(ours_rate, 0),
                       _f(ours.peak_rss_mb, 0)])
    result = {"ours_per_s": ours_rate, "tckgen_per_s": float("nan")}
    table.notes = [
        f"Ours: pipeline.tractography.run_tracking with the node's options (seeding "
        f"{options.seeding}, chunk {options.chunk_size}, step {ours.value['step']:.2f} mm, "
        f"angle {options.max_angle:g}, length {options.min_length:g}-{options.max_length:g} "
        f"mm, seed {options.seed}); no connectome bookkeeping; s = the tracking loop, maps "
        "already loaded."]
    if not (shutil.which("tckgen") and shutil.which("dwi2fod")):
        table.notes.append("MRtrix3 tckgen not on PATH: no comparison.")
        return table, result
    prep = run_stage("MRtrix3 FODs", mrtrix_fods, str(out), concat.outputs,
                     options.n_threads)
    version = subprocess.run(["tckgen", "-version"], capture_output=True, text=True).stdout
    version = version.splitlines()[0].strip("= ") if version else "version unknown"
    table.notes.append(f"{version}; "
                       f"FODs from dwi2response tournier + dwi2fod csd on the run's "
                       f"preprocessed DWI ({prep.wall_s:.0f} s, not counted); same seed image, "
                       "-select, step, angle, lengths and threads; s = the whole tckgen "
                       "process (it includes loading the FODs).")
    step = ours.value["step"]
    if stopping == "threshold":
        _save(out / "fa_mask.nii.gz", (fa > options.threshold).astype(np.uint8), fa_img.affine)
        masked = run_stage("tckgen", _tckgen_masked, str(out), n, options, step, options.seed)
        rate = masked.value["count"] / masked.value["seconds"]
        table.rows.append([f"tckgen iFOD2, -mask FA > {options.threshold:.3f}",
                           f"{masked.value['count']:,}", _f(masked.value["seconds"]),
                           _f(rate, 0), _f(masked.peak_rss_mb, 0)])
        result["tckgen_per_s"] = rate
        table.notes.append(
            "Same stopping rule, as near as the tools allow: DIPY's threshold criterion stops "
            "where the trilinearly interpolated FA falls below the threshold; tckgen -mask "
            "stops where the interpolated binary mask (FA > threshold) falls below 0.5. tckgen "
            "also stops at its FOD amplitude cutoff (-cutoff, default), ours ignores FOD peaks "
            "under 10 % of the maximum (pmf_threshold).")
    else:
        table.notes.append(f"Our run used stopping={stopping}: no FA-mask tckgen equivalent.")
    if stopping == "act":
        five = [maps["gm"], np.zeros_like(maps["gm"]), maps["wm"], maps["csf"],
                np.zeros_like(maps["gm"])]
        _save(out / "5tt.nii.gz", np.stack(five, axis=-1), fa_img.affine)
        act = run_stage("tckgen ACT", _tckgen, str(out), n, step, options.n_threads,
                        options.seed)
        table.rows.append(["tckgen iFOD2, -act (same tissue maps)", f"{n:,}",
                           _f(act.value["seconds"]), _f(act.value["per_s"], 0),
                           _f(act.peak_rss_mb, 0)])
        result["tckgen_act_per_s"] = result["tckgen_per_s"] = act.value["per_s"]
    if np.isfinite(result["tckgen_per_s"]):
        table.notes.append(f"ours / tckgen = {ours_rate / result['tckgen_per_s']:.2f} "
                           "(streamlines per second, equal threads).")
    return table, result


def workflow_tracking(tracks: list[NodeRecord]) -> Table:
    """Anchor c: the run's own tracking nodes."""
    table = Table("Anchor c: the workflow's tracking + connectome nodes", [
        "session", "streamlines", "wall s", "tracking s", "streamlines/s (tracking)",
        "peak GB (nipype)", "peak GB (bench)", "CPU s (sampled)"])
    for node in sorted(tracks, key=lambda x: x.session or ""):
        report = node.outputs.get("report") or {}
        table.rows.append([node.session, f"{report.get('n_streamlines', 0):,}",
                           _f(node.duration), _f(report.get("seconds")),
                           _f(report.get("streamlines_per_second"), 0),
                           _f(node.mem_peak_gb, 2), _f(node.bench_peak_gb, 2),
                           _f(node.cpu_s)])
    table.notes = ["wall s: the node (tracking, end-point assignment, connectomes, TSVs); "
                   "tracking s: pipeline.tractography's own timer."]
    return table


# --------------------------------------------------------------------------- report


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("MET" if ok else "NOT MET")


def targets_table(app: AppRun | None, tracks: list[NodeRecord], parcels: dict | None,
                  tracking: dict | None, work_bytes: int, streamlines: int) -> Table:
    track_peaks = [max(p for p in (n.mem_peak_gb, n.bench_peak_gb) if p is not None)
                   for n in tracks if n.mem_peak_gb is not None or n.bench_peak_gb is not None]
    rows: list[list[Any]] = []

    def add(name: str, measured: str, ok: bool | None) -> None:
        rows.append([name, measured, _verdict(ok)])

    finished = app is not None and app.returncode == 0
    add(f"end-to-end wall < {TARGET_WALL_MIN:g} min",
        (f"{app.wall_s / 60:.1f} min" + ("" if finished else f" (exit {app.returncode})"))
        if app else "n/a", app.wall_s / 60 < TARGET_WALL_MIN if finished else None)
    add(f"peak memory < {TARGET_PEAK_GB:g} GB",
        f"{app.peak_rss_gb:.2f} GB RSS ({app.peak_pss_gb:.2f} GB PSS)" if app else "n/a",
        app.peak_rss_gb < TARGET_PEAK_GB if app else None)
    add(f"tracking peak < {TARGET_TRACK_GB:g} GB"
        + (f" ({streamlines:,} streamlines)" if streamlines else ""),
        f"{max(track_peaks):.2f} GB" if track_peaks else "n/a",
        max(track_peaks) < TARGET_TRACK_GB if track_peaks else None)
    rate = (tracking or {}).get("tckgen_per_s", float("nan"))
    ours = (tracking or {}).get("ours_per_s", float("nan"))
    add("tracking throughput >= tckgen",
        f"{ours:.0f} vs {rate:.0f} streamlines/s ({ours / rate:.2f}x)" if np.isfinite(rate)
        else "n/a", ours >= rate if np.isfinite(rate) else None)
    if parcels:
        ratio_read = parcels["ours_s"] / parcels["read_s"]
        ratio_nil = parcels["ours_s"] / parcels["nilearn_s"]
        add("parcel extraction <= 2x read", f"{ratio_read:.2f}x", ratio_read <= 2)
        add("parcel extraction <= nilearn", f"{ratio_nil:.2f}x", ratio_nil <= 1)
    else:
        add("parcel extraction <= 2x read and <= nilearn", "n/a", None)
    add(f"work dir < {TARGET_WORK_GB:g} GB", f"{work_bytes / GB:.2f} GB",
        work_bytes / GB < TARGET_WORK_GB)
    notes = [] if app else ["No end-to-end run recorded (anchors only, no saved run)."]
    if app is not None and app.returncode:
        notes.append(f"The run did not finish (exit {app.returncode}): its wall time is no "
                     "end-to-end measurement.")
    if streamlines and streamlines != 1_000_000:
        notes.append(f"This run tracked {streamlines:,} streamlines per session; the issue's "
                     "tracking target is for 1,000,000.")
    return Table("Targets (issue 10)", ["target", "measured", "verdict"], rows, notes, left=3)


def run_table(app: AppRun | None, nodes: list[NodeRecord], log: Path) -> Table:
    table = Table("Run", ["what", "value"], left=2)
    if app is None:
        table.notes = ["No end-to-end run recorded."]
        return table
    peak_epoch = app.start_epoch + app.peak_at_s
    running = [n.path.rsplit("/", 1)[-1] for n in nodes if n.start <= peak_epoch <= n.end]
    posts = post_steps(log)
    table.rows = [
        ["command", " ".join(Path(app.command[0]).name if i == 0 else c
                             for i, c in enumerate(app.command))],
        ["exit code", app.returncode],
        ["wall", f"{app.wall_s:,.0f} s ({app.wall_s / 60:.1f} min)"],
        ["CPU, all descendants (getrusage)", f"{app.cpu_s:,.0f} s "
                                             f"({app.cpu_s / app.wall_s:.2f} cores on average)"],
        ["CPU, psutil samples (cross-check)", f"{app.cpu_sampled_s:,.0f} s"],
        ["CPU, sum over nodes (monitor samples)",
         f"{sum(n.cpu_s or 0 for n in nodes if not n.in_scheduler):,.0f} s"],
        ["peak memory, process tree", f"{app.peak_rss_gb:.2f} GB summed RSS, "
                                      f"{app.peak_pss_gb:.2f} GB summed PSS"],
        ["peak at", f"{app.peak_at_s:,.0f} s; running: {', '.join(running) or 'none'}"],
        ["nodes with a result", len(nodes)],
        *[[f"sub-{s} {step} (after the workflow)", f"{sec:.1f} s"] for s, step, sec in posts],
    ]
    table.notes = ["Memory sampled every 0.5 s with psutil over the trajectome process and "
                   "all its descendants. RSS counts pages shared by forked workers in each; "
                   "PSS splits them.",
                   "getrusage counts only descendants that were waited for: all of them after "
                   "a normal exit, not the workers of a killed run (then trust psutil's)."]
    return table


def anchor_nodes(nodes: list[NodeRecord], session: str | None
                 ) -> tuple[str | None, NodeRecord | None, NodeRecord | None, NodeRecord | None]:
    """(session, parcel node, track node, concat node) of the session the anchors use."""
    by = defaultdict(dict)
    for node in nodes:
        if node.session and node.interface in ("ParcelSignals", "TrackConnectomes",
                                               "ConcatenateDwi", "LoadQsiprep"):
            by[node.session].setdefault(node.interface, node)
    candidates = [session] if session else sorted(
        by, key=lambda s: ("ParcelSignals" not in by[s] or "TrackConnectomes" not in by[s], s))
    if not candidates or candidates[0] not in by:
        return session, None, None, None
    found = by[candidates[0]]
    concat = found.get("ConcatenateDwi") or found.get("LoadQsiprep")
    return candidates[0], found.get("ParcelSignals"), found.get("TrackConnectomes"), concat


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True,
                        help="holds bids/ (simulated if absent), work/, out/ and the report")
    parser.add_argument("--streamlines", type=int, default=1_000_000)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--omp-nthreads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42, help="trajectome --seed")
    parser.add_argument("--preset", default="realistic", help="simulator preset")
    parser.add_argument("--sim-seed", type=int, default=11, help="simulator seed")
    parser.add_argument("--no-anchors", action="store_true")
    parser.add_argument("--anchors-only", action="store_true",
                        help="no run: report ROOT/work of an earlier run and the anchors")
    parser.add_argument("--anchor-streamlines", type=int, default=100_000)
    parser.add_argument("--anchor-session", help="session label (default: the first with BOLD "
                        "and DWI)")
    parser.add_argument("--resume", action="store_true",
                        help="run even if ROOT/work exists (cached nodes are not rerun, so "
                        "the wall time is not end to end)")
    args = parser.parse_args(argv)
    root = args.root.absolute()
    bids, work, out, log = root / "bids", root / "work", root / "out", root / "trajectome.log"
    saved, samples = root / "bench_subject_run.json", root / "bench_subject_samples.tsv.gz"
    root.mkdir(parents=True, exist_ok=True)
    app: AppRun | None = None
    if args.anchors_only:
        if not any(work.rglob("result_*.pklz")):
            raise SystemExit(f"{work}: no node results; run without --anchors-only first.")
        if saved.exists():
            app = AppRun(**json.loads(saved.read_text()))
    else:
        if work.exists() and not args.resume:
            raise SystemExit(f"{work} exists: delete it (and {out}) for an end-to-end run, or "
                             "pass --resume (not end to end) or --anchors-only.")
        if not bids.exists():
            simulate(root, args.preset, args.sim_seed)
        command = [str(BIN / "trajectome"), str(bids), str(out), "participant", "--work-dir",
                   str(work), "--nprocs", str(args.nprocs), "--omp-nthreads",
                   str(args.omp_nthreads), "--streamlines", str(args.streamlines), "--seed",
                   str(args.seed), "--resource-monitor", *extra]
        app = run_app(command, log, samples)
        write_json(saved, asdict(app))
        if app.returncode:
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
    nodes = read_results(work)
    attach_bench_peaks(nodes, samples)
    origin = app.start_epoch if app else min((n.start for n in nodes), default=0.0)
    tracks = [n for n in nodes if n.interface == "TrackConnectomes"]
    work_bytes, out_bytes = disk_usage(work), disk_usage(out)
    tables = [run_table(app, nodes, log), stage_table(nodes), timeline_table(nodes, origin),
              top_nodes(nodes),
              Table("Disk", ["folder", "GB"], [[str(work), _f(work_bytes / GB, 2)],
                                               [str(out), _f(out_bytes / GB, 2)]])]
    if tracks:
        tables.append(workflow_tracking(tracks))
    parcels = tracking = None
    if not args.no_anchors:
        session, parcel_node, track_node, concat = anchor_nodes(nodes, args.anchor_session)
        if parcel_node is None and track_node is None:
            print(f"no finished parcel or tracking node in {work}: no anchors", flush=True)
        else:
            print(f"anchors on ses-{session} (its own intermediate files in {work})",
                  flush=True)
        if parcel_node is not None:
            table, parcels = anchor_parcels(parcel_node)
            tables.append(table)
            print(f"anchor a: ours {parcels['ours_s']:.2f} s, read {parcels['read_s']:.2f} s, "
                  f"nilearn {parcels['nilearn_s']:.2f} s", flush=True)
        if track_node is not None and concat is not None:
            table, tracking = anchor_tracking(track_node, concat, args.anchor_streamlines,
                                              root / "anchors" / f"ses-{session}")
            tables.append(table)
            print(f"anchor b: ours {tracking['ours_per_s']:.0f} streamlines/s, tckgen "
                  f"{tracking['tckgen_per_s']:.0f}", flush=True)
    streamlines = max((n.inputs.get("n_streamlines", 0) for n in tracks), default=0)
    tables.append(targets_table(app, tracks, parcels, tracking, work_bytes, streamlines))
    print("\n\n".join(t.text() for t in tables))
    with atomic_write(root / "bench_subject.md") as handle:
        handle.write(f"# bench_subject: {root}\n\n"
                     + "\n\n".join(t.markdown() for t in tables) + "\n")
    print(f"\nwritten {root / 'bench_subject.md'}")
    return 0 if app is None or app.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
