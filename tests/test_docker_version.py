"""The image's VERSION build argument becomes a PEP 440 version (docker/pep440_version.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from packaging.version import Version

_SPEC = importlib.util.spec_from_file_location(
    "pep440_version", Path(__file__).resolve().parents[1] / "docker" / "pep440_version.py")
pep440 = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(pep440)


@pytest.mark.parametrize("given, expected", [
    ("12da5c4", "0.1.0.dev0+g12da5c4"),               # no tag reachable: a bare hash
    ("12da5c4-dirty", "0.1.0.dev0+g12da5c4.dirty"),
    ("v1.2.0-3-gabc1234", "1.2.1.dev3+gabc1234"),     # 3 commits after v1.2.0
    ("v1.2.0-3-gabc1234-dirty", "1.2.1.dev3+gabc1234.dirty"),
    ("v1.2.0", "1.2.0"),
    ("1.2.0rc1", "1.2.0rc1"),
])
def test_git_describe_outputs_become_pep440(given, expected):
    got = pep440.pep440_version(given)
    assert got == expected and str(Version(got)) == expected


def test_unusable_version_is_refused_with_advice(capsys):
    with pytest.raises(ValueError, match="--build-arg VERSION"):
        pep440.pep440_version("release candidate")
    assert pep440.main(["not a version"]) == 2
    assert "VERSION=" in capsys.readouterr().err
