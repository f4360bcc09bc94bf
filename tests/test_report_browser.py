"""The HTML reports rendered by headless Chromium: every figure loads, nothing errors.

The browser is driven by ``scripts/screenshot_reports.py`` (DevTools over a pipe, standard
library only); the module is skipped when no Chromium binary is found (Debian package
``chromium``, or ``$CHROMIUM``).
"""

from __future__ import annotations

import importlib.util
import re
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_reports import ATLAS, _atlas_table, build_derivatives

from pipeline import reports
from pipeline.derivatives import write_tsv


def _load_script():
    path = Path(__file__).parents[1] / "scripts" / "screenshot_reports.py"
    spec = importlib.util.spec_from_file_location("screenshot_reports", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


screenshots = _load_script()
pytestmark = pytest.mark.skipif(
    screenshots.find_chromium() is None,
    reason="no Chromium binary (apt-get install chromium, or set $CHROMIUM)")

#: Failures planted in a copy of the subject report: the checker must see every one.
_PLANTED = (
    '<figure><svg width="120" height="60"><image width="10" height="10" '
    'xlink:href="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAE="/>'
    '<path d="M 0 0 L NaN 5"/></svg><figcaption>planted broken figure</figcaption></figure>'
    '<figure><svg width="300" height="0"></svg><figcaption>planted empty figure</figcaption>'
    "</figure>"
    "<p>mean FD NaN mm</p>"
    '<script>console.error("planted console error"); planted_undefined_call();</script>'
)


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("browser") / "out"
    build_derivatives(root, np.random.default_rng(7))
    # a session the patient missed: the maintenance value of one metric is n/a
    path = root / "sub-01" / "sub-01_desc-trajectories_metrics.tsv"
    table = reports._read_tsv(path)
    table.loc[(table["metric"] == "hippocampal_volume") & (table["role"] == "maintenance"),
              ["value", "se"]] = np.nan
    # a metric name too long for its card must wrap, not widen the page
    long_name = table[table["metric"] == "hippocampal_volume"].assign(
        metric="sc_fc_multilinear_r2adj_with_a_deliberately_long_name", network_a="DefaultMode")
    write_tsv(path, pd.concat([table, long_name], ignore_index=True))
    subject = reports.write_subject_report(root, "01", atlas_tables={ATLAS: _atlas_table()})
    group = reports.write_group_report(root)
    text = subject.read_text()
    anchor = '<section class="page" id="trajectories">'
    broken = root / "planted.html"
    broken.write_text(text.replace(anchor, _PLANTED + anchor, 1))
    with screenshots.Browser() as browser:
        results = {p.name: screenshots.check_page(browser, p) for p in (subject, group, broken)}
    return root, results


def _assert_clean(result: dict) -> None:
    assert result["broken"] == []
    assert result["console"] == []
    assert result["empty_figures"] == []
    assert result["bad_text"] == []
    assert result["overflow_px"] <= 0  # nothing wider than a 1280 px window


def test_subject_report_renders_in_chromium(checked):
    root, results = checked
    result = results["sub-01.html"]
    _assert_clean(result)
    # the figures of test_reports: 6 (preECT) + 6 (postECT) + 1 (maint) + 4 trajectories,
    # each an SVG the browser drew; rasters: slices, contours, carpet and matrices
    text = (root / "sub-01.html").read_text()
    assert result["figures"] == text.count("<svg") == 17
    assert "maint: n/a" in text  # the missed session: n/a, not NaN
    assert result["rasters"] == len(re.findall(r"data:image/png;base64,", text)) >= 27


def test_group_report_renders_in_chromium(checked):
    _, results = checked
    result = results["group.html"]
    _assert_clean(result)
    assert result["figures"] == 3


def test_checker_sees_planted_failures(checked):
    _, results = checked
    result = results["planted.html"]
    assert any("planted broken figure" in b and "cannot be decoded" in b
               for b in result["broken"])
    assert any("planted empty figure" in e for e in result["empty_figures"])
    assert result["bad_text"] == ["NaN"]
    console = "\n".join(result["console"])
    assert "planted console error" in console
    assert "planted_undefined_call is not defined" in console
    assert 'attribute d: Expected number, "M 0 0 L NaN 5"' in console


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_screenshot_script(checked, tmp_path):
    root, _ = checked
    pd.DataFrame({"participant_id": ["sub-c1", "sub-01"], "group": ["control", "patient"]}
                 ).to_csv(root / "participants.tsv", sep="\t", index=False)
    assert screenshots.main([str(root), "--docs", str(tmp_path), "--height", "600"]) == 0
    for name in ("report_session.png", "report_trajectories.png"):
        data = (tmp_path / name).read_bytes()
        width, height = _png_size(data)
        assert 1000 < width <= 1280 and 100 < height <= 600  # the body column
        assert len(data) < screenshots.MAX_PNG_BYTES
    assert not list(tmp_path.glob(".*"))  # no temporary left
