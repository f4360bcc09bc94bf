"""A Nipype workflow that carries its own methods text.

Each factory sets ``wf.__desc__`` (what it did, with citation keys such as
``[@nipype1]``); :func:`collect_methods` walks the graph and joins the texts in
execution order for ``logs/CITATION.md``.
"""

from __future__ import annotations

from nipype.pipeline import engine as pe


class Workflow(pe.Workflow):
    """``nipype.pipeline.engine.Workflow`` with a ``__desc__`` methods paragraph."""

    def __init__(self, name: str, base_dir: str | None = None) -> None:
        super().__init__(name, base_dir)
        self.__desc__: str | None = None


def collect_methods(workflow: pe.Workflow) -> list[str]:
    """Methods paragraphs of ``workflow`` and its sub-workflows, outermost first, once each."""
    texts: list[str] = []

    def visit(wf: pe.Workflow) -> None:
        desc = getattr(wf, "__desc__", None)
        if desc and desc not in texts:
            texts.append(desc)
        for node in sorted(wf._graph.nodes(), key=lambda n: n.name):
            if isinstance(node, pe.Workflow):
                visit(node)

    visit(workflow)
    return texts
