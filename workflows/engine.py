"""A Nipype workflow that carries its own methods text.

Each factory sets ``wf.__desc__`` (what it did, with citation keys such as
``[@nipype1]``); :func:`collect_methods` walks the graph and joins the texts in
execution order for ``logs/CITATION.md``.
"""

from __future__ import annotations

import re
from pathlib import Path

from nipype.pipeline import engine as pe


class Workflow(pe.Workflow):
    """``nipype.pipeline.engine.Workflow`` with methods paragraphs.

    ``__desc__`` comes before the sub-workflows' paragraphs, ``__postdesc__`` after them
    (what is computed from their outputs).
    """

    def __init__(self, name: str, base_dir: str | None = None) -> None:
        super().__init__(name, base_dir)
        self.__desc__: str | None = None
        self.__postdesc__: str | None = None


def collect_methods(workflow: pe.Workflow) -> list[str]:
    """Methods paragraphs of ``workflow`` and its sub-workflows, outermost first, once each."""
    texts: list[str] = []

    def add(text: str | None) -> None:
        if text and text not in texts:
            texts.append(text)

    def visit(wf: pe.Workflow) -> None:
        add(getattr(wf, "__desc__", None))
        for node in sorted(wf._graph.nodes(), key=lambda n: n.name):
            if isinstance(node, pe.Workflow):
                visit(node)
        add(getattr(wf, "__postdesc__", None))

    visit(workflow)
    return texts


class SessionSinks:
    """Adds one ``ds_*`` DerivativesSink per output of a session workflow (one datatype).

    The sink's metadata is ``meta`` (fixed), or the ``meta_field`` output of ``meta_node``
    (default: the node giving the file).
    """

    def __init__(self, workflow: pe.Workflow, output_dir: Path, base: dict,
                 datatype: str) -> None:
        self.workflow, self.output_dir, self.base = workflow, str(output_dir), base
        self.datatype, self.count = datatype, 0

    def _entities(self, entities: dict, more: dict) -> dict:
        return {k: v for k, v in {**self.base, **entities, **more}.items() if v is not None}

    def path_of(self, entities: dict, suffix: str, extension: str, **more: str | None) -> str:
        """``bids::`` URI of an output of this session (for ``SpatialReference``)."""
        from pipeline.derivatives import build_path

        path = build_path(self._entities(entities, more), suffix, extension, self.datatype)
        return f"bids::{path.as_posix()}"

    def add(self, node: pe.Node, field: str, entities: dict, suffix: str, extension: str, *,
            meta: dict | None = None, meta_field: str | None = None,
            meta_node: pe.Node | None = None, **more: str | None) -> None:
        """Sink ``node.field`` under the session's entities plus ``entities``/``more``."""
        from workflows.interfaces import DerivativesSink

        entities = self._entities(entities, more)
        self.count += 1
        parts = [str(v) for k, v in entities.items() if k not in ("subject", "session")]
        name = re.sub(r"[^0-9A-Za-z]+", "_",
                      "_".join(["ds", *parts, suffix, extension.strip(".")])).strip("_")
        sink = pe.Node(
            DerivativesSink(base_directory=self.output_dir, entities=entities, suffix=suffix,
                            extension=extension, datatype=self.datatype, meta_dict=meta or {}),
            name=f"{name}_{self.count}", run_without_submitting=True,
        )
        self.workflow.connect(node, field, sink, "in_file")
        if meta_field or meta_node is not None:
            self.workflow.connect(meta_node if meta_node is not None else node,
                                  meta_field or "meta", sink, "meta_dict")
