"""Methods text cites only keys that CITATION.bib can resolve."""

from pathlib import Path

import pytest

from pipeline import citations

BIB = """@article{a1,
  title = {First}
}

@misc{b2,
  title = {Second}
}
"""


def test_select_keeps_citation_order_and_drops_uncited():
    text = "Done with B [@b2] and A [@a1; @b2]; mail me at x@y.org."
    out = citations.select_bibtex(text, BIB)
    assert citations.cited_keys(text) == ["b2", "a1"]
    assert out.index("{b2,") < out.index("{a1,") and out.count("@") == 2


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(KeyError, match="nope"):
        citations.select_bibtex("see [@nope]", BIB)


def test_every_key_cited_by_a_workflow_or_strategy_is_bundled():
    root = Path(__file__).parents[1]
    cited = set()
    for source in [*(root / "workflows").rglob("*.py"),
                   *(root / "pipeline" / "data" / "denoise").glob("*.yml")]:
        text = source.read_text()
        cited |= {k for k in citations.cited_keys(text) if f"[@{k}" in text or f"; @{k}" in text}
    bundled = citations.split_entries(citations.bundled_bibtex())
    assert cited, "no citation found in workflows/"
    assert sorted(cited - set(bundled)) == []
