"""Writing BIDS-Derivatives: file names from entities, atomic writes, dataset_description.json.

Every output goes through :func:`atomic_write` (temporary name in the same folder,
then ``os.replace``), so a crash, a kill or a full disk never leaves a half-written
file under its final name, and concurrent runs never see one either.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import pandas as pd

#: Entity keys in BIDS schema order, with the BEP017/BEP016 ones where those proposals put them.
ENTITY_ORDER = (
    ("subject", "sub"),
    ("session", "ses"),
    ("task", "task"),
    ("acquisition", "acq"),
    ("direction", "dir"),
    ("run", "run"),
    ("hemisphere", "hemi"),
    ("from", "from"),
    ("to", "to"),
    ("mode", "mode"),
    ("space", "space"),
    ("atlas", "atlas"),
    ("segmentation", "seg"),
    ("resolution", "res"),
    ("density", "den"),
    ("label", "label"),
    ("model", "model"),
    ("param", "param"),
    ("description", "desc"),
    ("statistic", "stat"),
)
_KEYS = {key: short for key, short in ENTITY_ORDER}
_ALIASES = {short: key for key, short in ENTITY_ORDER} | {"ses": "session", "sub": "subject"}


def _clean_label(key: str, value: object) -> str:
    text = str(value)
    prefix = f"{_KEYS[key]}-"
    text = text.removeprefix(prefix)
    if not text or not text.replace("+", "").isalnum():
        raise ValueError(f"BIDS entity {key}={value!r} must be alphanumeric")
    return text


def build_name(entities: Mapping[str, object], suffix: str, extension: str) -> str:
    """Build a BIDS file name with entities in schema order.

    Parameters
    ----------
    entities : mapping
        Entity values by long name (``subject``) or key (``sub``); ``None`` values are skipped.
    suffix : str
        BIDS suffix, e.g. ``relmat``.
    extension : str
        With the leading dot, e.g. ``.tsv`` or ``.nii.gz``.

    Examples
    --------
    >>> build_name({"sub": "01", "ses": "pre", "atlas": "A", "stat": "mean"}, "timeseries", ".tsv")
    'sub-01_ses-pre_atlas-A_stat-mean_timeseries.tsv'
    """
    known = {_ALIASES.get(k, k): v for k, v in entities.items() if v is not None}
    unknown = set(known) - set(_KEYS)
    if unknown:
        raise ValueError(f"unknown BIDS entities {sorted(unknown)}")
    parts = [
        f"{_KEYS[key]}-{_clean_label(key, known[key])}" for key, _ in ENTITY_ORDER if key in known
    ]
    return "_".join([*parts, suffix]) + extension


def build_path(
    entities: Mapping[str, object], suffix: str, extension: str, datatype: str | None
) -> Path:
    """Relative path of a derivative: ``sub-X/[ses-Y/][datatype/]name``.

    Subject-level results (that span sessions) have no ``session`` and no datatype folder
    unless one is given.
    """
    name = build_name(entities, suffix, extension)
    known = {_ALIASES.get(k, k): v for k, v in entities.items() if v is not None}
    folder = Path()
    if "subject" in known:
        folder /= f"sub-{_clean_label('subject', known['subject'])}"
    if "session" in known:
        folder /= f"ses-{_clean_label('session', known['session'])}"
    if datatype:
        folder /= datatype
    return folder / name


@contextlib.contextmanager
def _replace_on_success(path: Path, suffix: str) -> Iterator[tuple[int, str]]:
    """A temporary file beside ``path``; renamed onto it on success, removed on any error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=suffix,
                               dir=path.parent)
    try:
        yield fd, tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` and move it into place only on success.

    On any exception (including ``OSError: No space left on device``) the temporary
    file is removed and ``path`` is left as it was.
    """
    with _replace_on_success(Path(path), ".tmp") as (fd, _), os.fdopen(fd, mode) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


#: Temporary files older than this are orphans of a killed run (live writes take seconds).
STALE_TEMPORARY_SECONDS = 3600.0
_OWNER_RE = re.compile(r"\.pid(\d+)@([A-Za-z0-9-]+)\.")
#: Names of this module's temporaries: ``.<name>.pid<N>@<host>.<random>.tmp*``.
TEMPORARY_GLOB = ".*.tmp*"


def is_temporary(path: str | Path) -> bool:
    """Whether ``path`` is named like a temporary this module writes before renaming."""
    return fnmatch.fnmatchcase(Path(path).name, TEMPORARY_GLOB)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname().split(".")[0]) or "host"


def _owner() -> str:
    """``pid<pid>@<host>``: lets a rerun tell a dead writer's temporaries from live ones."""
    return f"pid{os.getpid()}@{_host()}"


def _process_is_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False


def remove_stale_temporaries(
    root: str | Path, *, older_than: float = STALE_TEMPORARY_SECONDS
) -> list[Path]:
    """Delete temporary files that killed runs (SIGKILL, node failure) left under ``root``.

    Only files named like this module's temporaries (``.<name>.pid<N>@<host>.<random>.tmp*``)
    are candidates: those whose writing process on this host no longer exists, and any
    not modified for ``older_than`` seconds (writers on other hosts of a shared file
    system), so the live writes of a concurrent run are never touched.

    Returns
    -------
    list of Path
        The removed files.
    """
    import time

    limit, host = time.time() - older_than, _host()
    removed = []
    for path in sorted(Path(root).rglob(TEMPORARY_GLOB)):
        owner = _OWNER_RE.search(path.name)
        with contextlib.suppress(FileNotFoundError):  # another run may clean up too
            if not path.is_file():
                continue
            dead = owner is not None and owner[2] == host and _process_is_dead(int(owner[1]))
            if dead or path.stat().st_mtime < limit:
                path.unlink()
                removed.append(path)
    return removed


def write_with(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Run ``writer(tmp_path)`` on a temporary path, then rename it to ``path``.

    For libraries that insist on opening the file themselves (``nibabel.save``).
    The temporary name keeps the extension so the writer picks the right format.
    """
    path = Path(path)
    suffixes = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    with _replace_on_success(path, f".tmp{suffixes}") as (fd, tmp):
        os.close(fd)
        writer(Path(tmp))
    return path


def json_text(data: Mapping[str, Any]) -> str:
    """The exact text :func:`write_json` writes (sorted keys, fixed indentation)."""
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write JSON deterministically (sorted keys, fixed indentation, trailing newline)."""
    with atomic_write(path) as handle:
        handle.write(json_text(data))
    return Path(path)


def write_tsv(path: str | Path, table: pd.DataFrame, *, float_format: str = "%.10g") -> Path:
    """Write a BIDS TSV (tab-separated, ``n/a`` for missing values, no index)."""
    with atomic_write(path) as handle:
        table.to_csv(
            handle,
            sep="\t",
            index=False,
            na_rep="n/a",
            float_format=float_format,
            lineterminator="\n",
        )
    return Path(path)


def dataset_description(
    *,
    name: str,
    version: str,
    source_datasets: list[str] | None = None,
    container: dict | None = None,
) -> dict[str, Any]:
    """The ``dataset_description.json`` content of a Trajectome derivatives folder."""
    generated_by: dict[str, Any] = {"Name": "Trajectome", "Version": version}
    if container:
        generated_by["Container"] = container
    description: dict[str, Any] = {
        "Name": name,
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
    }
    if source_datasets:
        description["SourceDatasets"] = [{"URL": url} for url in source_datasets]
    return description


def ensure_dataset_description(output_dir: str | Path, description: Mapping[str, Any]) -> Path:
    """Write ``dataset_description.json`` unless an identical one is there.

    Runs for different subjects may start at the same moment on the same output
    folder; the atomic rename means each sees either no file or a complete one.
    """
    path = Path(output_dir) / "dataset_description.json"
    if path.exists():
        try:
            if json.loads(path.read_text()) == json.loads(json.dumps(description, default=str)):
                return path
        except json.JSONDecodeError:
            pass
    return write_json(path, description)


def file_checksums(paths: Iterable[str | Path], root: str | Path) -> pd.DataFrame:
    """SHA-256 and size of each file, named relative to ``root`` (provenance of inputs).

    JSON sidecars next to NIfTI images are included, since their metadata (TR, slice
    timing, phase encoding) changes the results as much as the images do.
    """
    import hashlib

    root = Path(root)
    files: set[Path] = set()
    for path in map(Path, paths):
        files.add(path)
        stem = path.name.split(".")[0]
        sidecar = path.with_name(f"{stem}.json")
        if sidecar.is_file():
            files.add(sidecar)
    rows = []
    for path in sorted(files):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                digest.update(block)
        try:
            name = path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            name = str(path)
        rows.append({"filename": name, "size_bytes": path.stat().st_size,
                     "sha256": digest.hexdigest()})
    return pd.DataFrame(rows, columns=["filename", "size_bytes", "sha256"])
