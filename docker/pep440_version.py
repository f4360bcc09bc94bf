"""Turn the VERSION build argument into the PEP 440 version setuptools-scm needs.

The image is built without ``.git``, so the version comes in as ``--build-arg VERSION``, and
the documented value is ``git describe --tags --always``: a bare commit hash when no tag is
reachable, ``v1.2.0-3-gabc1234`` after one. setuptools-scm refuses both in
``SETUPTOOLS_SCM_PRETEND_VERSION`` (only PEP 440 is allowed), so map them the way
setuptools-scm names an untagged build (next release, ``.devN``, ``+g<hash>``)::

    python pep440_version.py VERSION [PYPROJECT]     # prints the version, exit 2 if unusable
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

from packaging.version import InvalidVersion, Version

_HASH = re.compile(r"g?(?P<node>[0-9a-f]{7,40})")
_DESCRIBE = re.compile(r"(?P<tag>.+)-(?P<distance>\d+)-g(?P<node>[0-9a-f]{4,40})")


def pep440_version(version: str, fallback: str = "0.1.0.dev0") -> str:
    """Return a PEP 440 version for a tag, a ``git describe`` output or a commit hash.

    Parameters
    ----------
    version : str
        A PEP 440 version (``1.2.0``, ``v1.2.0``), ``git describe --tags --always [--dirty]``
        output (``v1.2.0-3-gabc1234``, ``abc1234``, ``abc1234-dirty``).
    fallback : str, optional
        Version of a build with no tag reachable (pyproject's ``fallback_version``).

    Returns
    -------
    str
        ``1.2.0``; ``1.2.1.dev3+gabc1234`` for 3 commits after ``v1.2.0``;
        ``<fallback>+gabc1234`` for a bare hash; ``.dirty`` is appended to the local part.

    Raises
    ------
    ValueError
        If ``version`` is none of these.
    """
    text = version.strip()
    dirty = text.endswith("-dirty")
    text = text.removesuffix("-dirty")
    local = []
    try:
        if match := _HASH.fullmatch(text):
            base = Version(fallback)
            local.append("g" + match["node"])
        elif match := _DESCRIBE.fullmatch(text):
            tag = Version(match["tag"])  # also accepts a leading "v"
            release = [*tag.release[:-1], tag.release[-1] + 1]
            epoch = f"{tag.epoch}!" if tag.epoch else ""
            base = Version(f"{epoch}{'.'.join(map(str, release))}.dev{match['distance']}")
            local.append("g" + match["node"])
        else:
            base = Version(text)
    except InvalidVersion as err:
        raise ValueError(
            f"VERSION={version!r} is neither a PEP 440 version nor `git describe --tags "
            "--always` output: pass e.g. --build-arg VERSION=1.2.0, or leave it empty"
        ) from err
    if dirty:
        local.append("dirty")
    if base.local:
        local.insert(0, base.local)
    public = base.public
    return public + ("+" + ".".join(local) if local else "")


def main(argv: list[str] | None = None) -> int:
    """Print the PEP 440 form of ``argv[0]``; the fallback comes from ``argv[1]`` (pyproject)."""
    args = sys.argv[1:] if argv is None else argv
    pyproject = Path(args[1] if len(args) > 1 else "pyproject.toml")
    fallback = "0.1.0.dev0"
    if pyproject.is_file():
        with pyproject.open("rb") as fh:
            scm = tomllib.load(fh).get("tool", {}).get("setuptools_scm", {})
        fallback = scm.get("fallback_version", fallback)
    try:
        print(pep440_version(args[0], fallback))
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
