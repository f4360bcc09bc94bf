"""A cheap participant run through the real CLI, for the kill-and-resume test.

    python tests/resume_launcher.py BIDS_DIR OUTPUT_DIR participant -w WORK [options]

Every argument goes to :func:`workflows.cli.main`; only the anatomical workflow factory is
replaced (run with ``--modalities anat``), by a graph shaped like the real one: per session a
``step1`` node, a subject-level ``template`` node joining every session's ``step1``, then per
session ``step2`` and ``step3``. Each is a Nipype ``Function`` node that sleeps, so a run can
be killed between nodes and inside one, and writes a small deterministic TSV that a real
``DerivativesSink`` copies to the outputs. Scheduling (``run_workflow``, MultiProc), the
work-directory cache and the atomic writes are the app's own.

Each time a fake node executes it first appends its working directory to the file named
by the environment variable ``TRAJECTOME_EXEC_LOG`` (when set): the log outlives a kill,
so the test can count how often every node ran across starts.
"""

from __future__ import annotations

import sys

#: Sleep of every fake node (s): long enough to kill a run inside one.
NODE_SECONDS = 1.0
#: Steps per session; the template node runs between step 1 and step 2.
STEPS = 3
EXEC_LOG_VARIABLE = "TRAJECTOME_EXEC_LOG"


def fake_step(tag: str, seconds: float, previous: str | list) -> str:
    """Fake node body: log the execution, sleep, write ``<tag>.tsv`` from the inputs' content.

    Runs in a Nipype worker from its source text, hence the local imports and the
    annotations that need none.
    """
    import hashlib
    import os
    import time
    from pathlib import Path

    log = os.environ.get("TRAJECTOME_EXEC_LOG")
    if log:
        # one short O_APPEND write per execution: lines of parallel workers do not interleave
        with open(log, "a") as handle:
            handle.write(os.getcwd() + "\n")
    time.sleep(seconds)
    files = [previous] if isinstance(previous, str) else list(previous)
    parents = "".join(Path(f).read_text() for f in files)
    digest = hashlib.sha256((parents + tag).encode()).hexdigest()
    out = Path(os.getcwd()) / f"{tag}.tsv"
    out.write_text(f"{parents}{tag}\t{digest}\n")
    return str(out)


def _step_node(name: str, tag: str):
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    node = pe.Node(
        niu.Function(input_names=["tag", "seconds", "previous"], output_names=["out_file"],
                     function=fake_step),
        name=name,
    )
    node.inputs.tag = tag
    node.inputs.seconds = NODE_SECONDS
    return node


def _sink_node(name: str, output_dir, entities: dict, desc: str):
    from nipype.pipeline import engine as pe

    from workflows.interfaces import DerivativesSink

    return pe.Node(
        DerivativesSink(base_directory=str(output_dir), entities={**entities, "desc": desc},
                        suffix="fake", extension=".tsv",
                        meta_dict={"Description": f"fake {desc} output of the resume test"}),
        name=name,
        run_without_submitting=True,  # as the app's own sinks
    )


def fake_anat_wf(**kwargs):
    """Stand-in for :func:`workflows.anat.init_anat_wf` (same keyword arguments)."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from workflows import base
    from workflows.engine import Workflow

    subject, sessions, output_dir = kwargs["subject"], kwargs["sessions"], kwargs["output_dir"]
    workflow = Workflow(name="anat_wf")
    merge = pe.Node(niu.Merge(len(sessions)), name="merge_step1")
    template = _step_node("template", f"sub-{subject}_template")
    workflow.connect([
        (merge, template, [("out", "previous")]),
        (template, _sink_node("ds_template", output_dir, {"subject": subject}, "template"),
         [("out_file", "in_file")]),
    ])  # fmt: skip
    for index, session in enumerate(sessions, start=1):
        key = base._session_key(session)
        previous = None
        for step in range(1, STEPS + 1):
            node = _step_node(f"step{step}_{key}", f"{session.name}_step{step}")
            sink = _sink_node(f"ds_step{step}_{key}", output_dir, session.bids_entities,
                              f"step{step}")
            workflow.connect(node, "out_file", sink, "in_file")
            if step == 1:
                node.inputs.previous = []
                workflow.connect(node, "out_file", merge, f"in{index}")
            elif step == 2:
                workflow.connect(template, "out_file", node, "previous")
            else:
                workflow.connect(previous, "out_file", node, "previous")
            previous = node
    return workflow


def fake_node_count(n_sessions: int) -> int:
    """Number of fake (logging) nodes in the graph of one subject with ``n_sessions``."""
    return n_sessions * STEPS + 1


def install_fakes() -> None:
    """Replace the anatomical workflow and the metrics by the fakes (in this process)."""
    from workflows import base

    base.init_anat_wf = fake_anat_wf
    base._add_session_metrics = lambda *args, **kwargs: None


def main(argv: list[str]) -> int:
    """Install the fakes and run the real command line with ``argv``."""
    install_fakes()
    from workflows import cli

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
