"""Running a workflow graph: Nipype plugin set-up, progress lines, and a failure summary."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import scipy.sparse as ssp
from nipype.pipeline import engine as pe
from nipype.pipeline.plugins import multiproc
from nipype.pipeline.plugins.multiproc import MultiProcPlugin
from threadpoolctl import threadpool_limits

from pipeline.registration import ITK_THREADS

LOGGER = logging.getLogger("trajectome")
_SUBJECT = re.compile(r"(?:^|\.)sub_([0-9A-Za-z]+)_wf")
_SESSION = re.compile(r"[._]ses_([0-9A-Za-z]+)(?=$|[._])")
#: Thread-pool size of OpenMP code (DIPY's tracker), set from ``--omp-nthreads``.
THREAD_VARIABLES = ("OMP_NUM_THREADS",)
#: numpy/scipy BLAS pools: one thread per worker.  Every node that leans on BLAS declares
#: one thread to the scheduler, and a larger pool spins against the other workers
#: (MP-PCA beside another busy process: 51-86 CPU-s with 2 BLAS threads, 17-18 with 1;
#: bench/bench_dwi_steps.py).
BLAS_VARIABLES = ("MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: Seconds between two samples of a node's memory and CPU under ``--resource-monitor``.
MONITOR_INTERVAL_S = 0.5


class _ColumnSummingLil(ssp.lil_matrix):
    """Nipype's dependency matrix, with sums taken through CSR.

    The scheduler sums its columns at every poll (every 0.05 s) to find ready nodes; a LIL
    sum goes through a Python-level transpose: 14 ms on a 15-subject graph (5,520 nodes),
    two per poll, ~40 % of a core.  Through CSR: 0.2 ms.  Row edits stay LIL.
    """

    def sum(self, axis: Any = None, dtype: Any = None, out: Any = None) -> Any:
        return self.tocsr().sum(axis=axis, dtype=dtype, out=out)


@contextlib.contextmanager
def _young_generation_collections() -> Iterator[None]:
    """Make the MultiProc module's ``gc.collect()`` collect generation 0 only."""
    full = multiproc.gc
    multiproc.gc = SimpleNamespace(collect=lambda generation=0: gc.collect(0))
    try:
        yield
    finally:
        multiproc.gc = full


class ThriftyMultiProc(MultiProcPlugin):
    """Nipype's MultiProc, without its idle loop's cost and with critical-path-first order.

    Every poll in which a processor is free, MultiProc's submission pass runs
    ``gc.collect()`` even when no ready node fits; on a subject's graph that kept the
    scheduler at ~95 % of a core while one long node (the subject template) ran.  The pass
    now runs only when some ready node fits the free processors and memory.

    Ready nodes are offered in order of how many nodes wait on them (most first) instead
    of graph order: the anatomical chain, which every atlas, BOLD resampling and
    tractography waits for, then starts before the diffusion preprocessing that graph
    order put first (the subject template started 56 min into a realistic run).

    Finding the ready nodes (a column sum of the dependency matrix, every poll) no longer
    costs a Python-level pass over the matrix (:class:`_ColumnSummingLil`).

    MultiProc also runs a full ``gc.collect()`` after every node it settles in the main
    process (cached nodes, sinks) and before every submission pass.  Each walked every
    object the run holds (the graph, and the inputs and results loaded into its nodes): on
    the 15-subject study's resumed run 93-97 % of the scheduler's samples were in those
    calls and the two workers sat at ~12 %.  During the run those calls collect the
    youngest generation only, where a settled node's debris is; the interpreter's own
    thresholds still trigger the older generations' collections.  A resumed run with
    nothing to redo (3,465 nodes): graph part 18.5 min -> 2.3 min, same peak memory.
    """

    def run(self, graph: Any, config: Any, updatehash: bool = False) -> Any:
        with _young_generation_collections():
            return super().run(graph, config, updatehash=updatehash)

    def _generate_dependency_list(self, graph: Any) -> None:
        import networkx as nx

        super()._generate_dependency_list(graph)
        self.depidx = _ColumnSummingLil(self.depidx)
        self._waiting_on = np.array([len(nx.descendants(graph, node)) for node in self.procs])

    def _sort_jobs(self, jobids: Any, scheduler: str = "tsort") -> Any:
        if scheduler == "mem_thread":
            return super()._sort_jobs(jobids, scheduler=scheduler)
        return sorted(jobids, key=lambda job: -self._waiting_on[job])

    def _send_procs_to_workers(self, updatehash: bool = False, graph: Any = None) -> None:
        ready = np.flatnonzero(~self.proc_done & (self.depidx.sum(axis=0) == 0).__array__())
        free_gb, free_procs, _ = self._check_resources(self.pending_tasks)
        fits = any(
            min(self.procs[j].n_procs, self.processors) <= free_procs
            and min(self.procs[j].mem_gb, self.memory_gb) <= free_gb
            for j in ready
        )
        if fits:
            super()._send_procs_to_workers(updatehash=updatehash, graph=graph)


@dataclass(frozen=True)
class Failure:
    """A node that crashed, where it belongs, and why."""

    subject: str | None
    session: str | None
    node: str
    message: str

    def describe(self) -> str:
        """One line for the end-of-run summary."""
        return f"[{_where(self.subject, self.session)}] {self.node}: {self.message}"


def _where(subject: str | None, session: str | None) -> str:
    parts = [f"sub-{subject}" if subject else "", f"ses-{session}" if session else ""]
    return " ".join(p for p in parts if p) or "run"


def locate(fullname: str) -> tuple[str | None, str | None, str]:
    """Subject, session and short node path from a Nipype full node name."""
    subject = _SUBJECT.search(fullname)
    session = _SESSION.search(fullname)
    short = fullname.split("_wf.")[-1]
    return (subject.group(1) if subject else None, session.group(1) if session else None, short)


class ProgressLogger:
    """Nipype status callback: one line per finished or failed node, with its wall time."""

    def __init__(self) -> None:
        self._started: dict[str, float] = {}

    def __call__(self, node: pe.Node, status: str) -> None:
        name = node.fullname
        if status == "start":
            self._started[name] = time.monotonic()
            return
        started = self._started.pop(name, None)
        elapsed = f" in {time.monotonic() - started:.1f} s" if started is not None else ""
        subject, session, short = locate(name)
        verb = "done" if status == "end" else "FAILED"
        LOGGER.info("[%s] %s: %s%s", _where(subject, session), short, verb, elapsed)


def read_crash_files(crash_dir: Path) -> list[Failure]:
    """Failures described by Nipype's text crash files in ``crash_dir``."""
    failures = []
    for crash in sorted(crash_dir.glob("crash-*.txt")):
        text = crash.read_text(errors="replace")
        node_match = re.search(r"^Node: (.+)$", text, flags=re.MULTILINE)
        fullname = node_match.group(1).strip() if node_match else crash.name
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        message = next(
            (
                line
                for line in reversed(lines)
                if re.match(r"^[A-Za-z_.]+(Error|Exception)\b", line)
            ),
            lines[-1] if lines else "unknown error",
        )
        # "pipeline.inputs.InputFileError: msg" -> "InputFileError: msg"
        message = re.sub(r"^(?:\w+\.)+(\w+:)", r"\1", message)
        subject, session, short = locate(fullname)
        failures.append(Failure(subject, session, short, message))
    return failures


def run_workflow(
    workflow: pe.Workflow,
    *,
    work_dir: Path,
    crash_dir: Path,
    plugin: str = "MultiProc",
    plugin_args: dict[str, Any] | None = None,
    nprocs: int = 1,
    mem_gb: float | None = None,
    omp_nthreads: int | None = None,
    registration_nthreads: int | None = None,
    resource_monitor: bool = False,
) -> list[Failure]:
    """Run ``workflow`` and return the failed nodes (empty when everything succeeded).

    Nodes that do not depend on a failed node still run (``stop_on_first_crash`` off),
    so one bad session never stops the others.  Results are cached in ``work_dir``:
    a rerun only recomputes what is unfinished.  With ``resource_monitor`` every node's
    result file (``result_<node>.pklz``) also records ``runtime.mem_peak_gb``,
    ``runtime.cpu_percent`` (both the maxima of samples every :data:`MONITOR_INTERVAL_S`
    seconds) and the samples themselves (``runtime.prof_dict``); the run then goes on in
    ``work_dir/resource_monitor``, so node inputs must be absolute paths.
    """
    work_dir, crash_dir = Path(work_dir).absolute(), Path(crash_dir).absolute()
    crash_dir.mkdir(parents=True, exist_ok=True)
    if omp_nthreads:
        # inherited by the worker processes: OpenMP pools (DIPY's tracker) as the scheduler expects
        os.environ.update({name: str(omp_nthreads) for name in THREAD_VARIABLES})
    os.environ.update({name: "1" for name in BLAS_VARIABLES})
    # MultiProc forks its workers from this process, whose BLAS pools were sized when numpy
    # was imported: the variables above no longer reach them, the live pools must shrink
    threadpool_limits(limits=1, user_api="blas")
    if registration_nthreads:
        # ITK reads this once, when a process first uses it: later changes are ignored,
        # so it must be set before any worker starts (multithreaded ANTs is not reproducible)
        os.environ[ITK_THREADS] = str(registration_nthreads)
    quiet_nipype()
    workflow.base_dir = str(work_dir)
    workflow.config["execution"].update(
        {
            "crashdump_dir": str(crash_dir),
            "crashfile_format": "txt",
            "stop_on_first_crash": False,
            "hash_method": "content",
            "remove_unnecessary_outputs": False,
            "poll_sleep_duration": 0.05,
        }
    )
    args: dict[str, Any] = {"status_callback": ProgressLogger()}
    if plugin in {"MultiProc", "LegacyMultiProc"}:
        args |= {"n_procs": nprocs, "raise_insufficient": False}
        if mem_gb:
            args["memory_gb"] = mem_gb
    args |= plugin_args or {}
    previous = monitoring_settings()
    cwd = Path.cwd()
    if resource_monitor:
        enable_resource_monitor()
        # Nipype's monitor leaves a sample file per node run in the process's working
        # directory (workers inherit it): keep them in the work directory, not the user's
        cwd = work_dir / "resource_monitor"
        cwd.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.chdir(cwd):
            # made here: a plugin's resource monitor writes into the working directory
            runner: Any = ThriftyMultiProc(plugin_args=args) if plugin == "MultiProc" else plugin
            workflow.run(plugin=runner, plugin_args=args)
    except RuntimeError as err:
        failures = read_crash_files(crash_dir)
        if not failures:
            raise
        LOGGER.debug("workflow raised: %s", err)
        return sorted(failures, key=lambda f: (f.subject or "", f.session or "", f.node))
    finally:
        # Nipype's config is process-global: leave it as found for whatever runs next
        restore_monitoring(previous)
    return read_crash_files(crash_dir)


_MONITOR_KEYS = (("monitoring", "sample_frequency"), ("execution", "resource_monitor_frequency"))


def monitoring_settings() -> tuple[bool, dict[tuple[str, str], str]]:
    """Nipype's current resource-monitor switch and sampling intervals (default 1 s)."""
    from nipype import config as nipype_config

    values = {key: str(nipype_config.get(*key, "1")) for key in _MONITOR_KEYS}
    return bool(nipype_config.resource_monitor), values


def enable_resource_monitor(interval_s: float = MONITOR_INTERVAL_S) -> None:
    """Turn on Nipype's per-node memory/CPU sampling (in this process and forked workers).

    Raises
    ------
    RuntimeError
        When Nipype cannot monitor (psutil missing): install psutil.
    """
    from nipype import config as nipype_config

    nipype_config.enable_resource_monitor()
    if not nipype_config.resource_monitor:
        raise RuntimeError("--resource-monitor: Nipype could not enable its resource monitor "
                           "(psutil>=5 missing); pip install psutil.")
    # [monitoring] sample_frequency is the documented name; Nipype 1.x interfaces read
    # [execution] resource_monitor_frequency, so both are set
    for section, key in _MONITOR_KEYS:
        nipype_config.set(section, key, str(interval_s))


def restore_monitoring(settings: tuple[bool, dict[tuple[str, str], str]]) -> None:
    """Put back what :func:`monitoring_settings` returned."""
    from nipype import config as nipype_config

    enabled, values = settings
    for (section, key), value in values.items():
        nipype_config.set(section, key, value)
    if enabled:
        nipype_config.enable_resource_monitor()
    else:
        nipype_config.disable_resource_monitor()


def quiet_nipype() -> None:
    """Silence Nipype's per-node log lines; progress and failures are reported by us."""
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    for key in ("workflow_level", "interface_level", "utils_level"):
        nipype_config.set("logging", key, "CRITICAL")
    nipype_logging.update_logging(nipype_config)
