"""Select the BibTeX entries that a methods text cites (``[@key]`` / ``@key`` markers)."""

from __future__ import annotations

import re
from importlib import resources

_CITE_RE = re.compile(r"(?<![\w.])@([A-Za-z][\w-]*)")
_ENTRY_RE = re.compile(r"^@\w+\{([^,\s]+),", re.MULTILINE)


def bundled_bibtex() -> str:
    """The BibTeX database shipped with Trajectome."""
    return (resources.files("pipeline") / "data" / "boilerplate.bib").read_text()


def cited_keys(text: str) -> list[str]:
    """Citation keys in the order they first appear in ``text``."""
    return list(dict.fromkeys(_CITE_RE.findall(text)))


def split_entries(bibtex: str) -> dict[str, str]:
    """Map each entry's key to its full text."""
    starts = [(m.start(), m.group(1)) for m in _ENTRY_RE.finditer(bibtex)]
    ends = [s for s, _ in starts[1:]] + [len(bibtex)]
    return {key: bibtex[start:end].strip() for (start, key), end in zip(starts, ends, strict=True)}


def select_bibtex(text: str, bibtex: str | None = None) -> str:
    """BibTeX entries for the keys ``text`` cites, in citation order.

    Raises
    ------
    KeyError
        If ``text`` cites a key the database lacks (a methods-text bug, caught by tests).
    """
    entries = split_entries(bundled_bibtex() if bibtex is None else bibtex)
    keys = cited_keys(text)
    missing = [k for k in keys if k not in entries]
    if missing:
        raise KeyError(f"methods text cites {missing}, absent from boilerplate.bib")
    return "\n\n".join(entries[k] for k in keys) + "\n"
