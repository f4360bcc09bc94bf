"""Scheduling set-up of :func:`workflows.run.run_workflow`."""

from __future__ import annotations

import json

import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from workflows.run import run_workflow


def _blas_threads(out_file: str) -> str:
    import json

    import numpy  # noqa: F401  (loads the BLAS whose pool is inspected)
    from threadpoolctl import threadpool_info

    sizes = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    with open(out_file, "w") as handle:
        json.dump(sizes, handle)
    return out_file


def test_forked_workers_get_one_blas_thread(tmp_path):
    # MultiProc forks workers from a process whose BLAS pools were sized at import time,
    # so environment variables set later would not reach them
    workflow = pe.Workflow(name="blas_probe", base_dir=str(tmp_path / "work"))
    probe = pe.Node(niu.Function(function=_blas_threads, input_names=["out_file"],
                                 output_names=["out_file"]), name="probe")
    probe.inputs.out_file = str(tmp_path / "sizes.json")
    workflow.add_nodes([probe])
    failures = run_workflow(workflow, work_dir=tmp_path / "work", crash_dir=tmp_path / "crash",
                            nprocs=2, omp_nthreads=2)
    assert failures == []
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes and all(n == 1 for n in sizes)


def _sleep(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def test_scheduler_idles_while_a_long_node_runs(tmp_path, monkeypatch):
    # a free processor and nothing ready to run: Nipype's submission pass (which runs
    # gc.collect() each time) must not run at every poll; it held a whole core during the
    # subject template of a realistic run
    from nipype.pipeline.plugins.multiproc import MultiProcPlugin

    passes = []
    original = MultiProcPlugin._send_procs_to_workers

    def counted(self, *args, **kwargs):
        passes.append(len(self.pending_tasks))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MultiProcPlugin, "_send_procs_to_workers", counted)
    workflow = pe.Workflow(name="idle_probe", base_dir=str(tmp_path / "work"))
    node = pe.Node(niu.Function(function=_sleep, input_names=["seconds"],
                                output_names=["seconds"]), name="sleep")
    node.inputs.seconds = 3.0
    workflow.add_nodes([node])
    assert run_workflow(workflow, work_dir=tmp_path / "work", crash_dir=tmp_path / "crash",
                        nprocs=2) == []
    # stock MultiProc: one pass per 0.05 s poll while the node sleeps (~60)
    assert passes == [0], passes


def _stamp(label: str, log: str, after: str = "") -> str:
    with open(log, "a") as handle:
        handle.write(label + "\n")
    return label


def test_scheduler_starts_the_node_most_others_wait_on(tmp_path):
    # one processor, two ready nodes: the head of a chain (the anatomy every other stage
    # waits on) must start before a lone node that graph order offers first
    log = str(tmp_path / "order.txt")

    def node(name):
        made = pe.Node(niu.Function(function=_stamp, input_names=["label", "log", "after"],
                                    output_names=["label"]), name=name)
        made.inputs.label, made.inputs.log = name, log
        return made

    workflow = pe.Workflow(name="order_probe", base_dir=str(tmp_path / "work"))
    lone, head, middle, tail = (node(n) for n in ("a_lone", "b_head", "c_middle", "d_tail"))
    workflow.add_nodes([lone])
    workflow.connect([(head, middle, [("label", "after")]), (middle, tail, [("label", "after")])])
    assert run_workflow(workflow, work_dir=tmp_path / "work", crash_dir=tmp_path / "crash",
                        nprocs=1) == []
    order = open(log).read().split()
    assert order.index("b_head") < order.index("a_lone"), order


def test_ready_nodes_found_through_csr_equal_nipypes():
    # the scheduler's per-poll column sum goes through CSR; it must count the same
    # unfinished dependencies as Nipype's LIL matrix, before and after a node finishes
    import networkx as nx
    import numpy as np
    from nipype.pipeline.plugins.base import _graph_to_lil_matrix

    from workflows.run import ThriftyMultiProc

    rng = np.random.default_rng(0)
    graph = nx.DiGraph()
    graph.add_nodes_from(range(200))
    graph.add_edges_from((int(a), int(b)) for a, b in rng.integers(0, 200, (400, 2)) if a < b)
    plugin = ThriftyMultiProc(plugin_args={"n_procs": 1})
    plugin._generate_dependency_list(graph)
    plugin.mapnodesubids = {}  # as Nipype's run() sets it
    reference = _graph_to_lil_matrix(graph, nodelist=plugin.procs)
    assert np.array_equal(np.asarray(plugin.depidx.sum(axis=0)),
                          np.asarray(reference.sum(axis=0)))
    first_ready = int(np.flatnonzero(np.asarray(reference.sum(axis=0)).ravel() == 0)[0])
    plugin.proc_done[first_ready] = True
    plugin._task_finished_cb(first_ready)
    reference[first_ready, :] = 0
    assert np.array_equal(np.asarray(plugin.depidx.sum(axis=0)),
                          np.asarray(reference.sum(axis=0)))
    assert graph.out_degree(first_ready) > 0
    assert int(np.asarray(plugin.depidx.sum()).item()) == len(graph.edges) - graph.out_degree(
        first_ready)


def test_scheduler_collects_only_the_young_generation_during_a_run(monkeypatch):
    # MultiProc calls gc.collect() after every node it settles; during a run that call
    # collects generation 0 only, and the module's gc is back to normal afterwards
    import gc

    from nipype.pipeline.plugins import multiproc

    from workflows.run import ThriftyMultiProc

    generations = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: generations.append(generation))

    def fake_run(self, graph, config, updatehash=False):
        multiproc.gc.collect()
        raise RuntimeError("node crashed")

    monkeypatch.setattr(multiproc.MultiProcPlugin, "run", fake_run)
    with pytest.raises(RuntimeError, match="node crashed"):
        ThriftyMultiProc(plugin_args={"n_procs": 1}).run(None, {})
    assert generations == [0]
    assert multiproc.gc is gc
