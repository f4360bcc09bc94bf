"""Byte-reproducible writers: gzip NIfTI without timestamps, sorted JSON, fixed-format TSV."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import nibabel as nb
import numpy as np


def write_nifti(
    path: Path,
    volumes: Iterable[np.ndarray] | np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int],
    dtype: str = "int16",
    *,
    slope: float = 1.0,
    tr: float | None = None,
    intent: str | None = None,
) -> None:
    """Stream ``volumes`` (3D arrays, in order) into a gzipped NIfTI-1 file.

    The gzip header has ``mtime=0`` and no file name, so equal data give equal bytes, and
    volumes are written one at a time so a long 4D run never sits in memory twice.
    Float data are rounded when ``dtype`` is an integer type (stored value = data / slope).
    """
    header = nb.Nifti1Header()
    header.set_data_dtype(np.dtype(dtype))
    header.set_data_shape(tuple(int(s) for s in shape))
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    header["vox_offset"] = 352
    if slope != 1.0:
        header["scl_slope"], header["scl_inter"] = slope, 0.0
    if tr is not None:
        header["pixdim"][4] = tr
    if intent:
        header.set_intent(intent)
    out_dtype = np.dtype(dtype).newbyteorder("<")
    if isinstance(volumes, np.ndarray):
        volumes = [volumes] if volumes.ndim <= 3 else list(np.moveaxis(volumes, -1, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
    ):
        gz.write(header.binaryblock)
        gz.write(b"\x00" * 4)  # no extensions
        for vol in volumes:
            vol = np.asarray(vol)
            if np.issubdtype(out_dtype, np.integer):
                info = np.iinfo(out_dtype)
                vol = np.clip(np.rint(vol / slope), info.min, info.max)
            gz.write(np.asarray(vol, dtype=out_dtype).tobytes(order="F"))


def write_json(path: Path, content: Mapping[str, object]) -> None:
    """Write ``content`` as indented JSON (insertion order kept, newline-terminated)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def fmt(value: object, digits: int = 6) -> str:
    """Format a TSV cell: floats with ``digits`` decimals, NaN/None as ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):
            return "n/a"
        text = f"{float(value):.{digits}f}"
        return "0." + "0" * digits if text == "-0." + "0" * digits else text
    return str(value)


def write_tsv(
    path: Path, header: Sequence[str], rows: Iterable[Sequence[object]], digits: int = 6
) -> None:
    """Write a tab-separated table with fixed float formatting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header)]
    lines += ["\t".join(fmt(v, digits) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def format_array(array: np.ndarray, digits: int) -> str:
    """Rows of a 2D float array as TSV lines with ``digits`` decimals (no negative zeros)."""
    array = np.round(np.asarray(array, float), digits) + 0.0
    template = "\t".join([f"%.{digits}f"] * array.shape[1])
    return "\n".join(template % tuple(row) for row in array) + "\n"


def write_matrix(
    path: Path,
    names: Sequence[str],
    matrix: np.ndarray,
    digits: int = 6,
    index_label: str | None = None,
) -> None:
    """Numeric table with a header of ``names``; with ``index_label``, rows are named too.

    Relationship matrices take ``index_label="Node"`` (first column of row names), as
    XCP-D writes them; time series have no index column.  A ``.tsv.gz`` path is
    gzipped without a timestamp.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    body = format_array(matrix, digits)
    if index_label is not None:
        body = "".join(
            f"{name}\t{line}\n" for name, line in zip(names, body.splitlines(), strict=True)
        )
        names = [index_label, *names]
    text = ("\t".join(names) + "\n" + body).encode()
    if path.name.endswith(".gz"):
        with (
            open(path, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
        ):
            gz.write(text)
    else:
        path.write_bytes(text)
