"""Checks on the input files of a session, before any processing.

Each check loads the file completely (a truncated ``.nii.gz`` only fails when its
data are read) and raises :class:`InputFileError` naming the file and what to do.
Problems the pipeline can work around are returned as warnings instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np

#: Fewest BOLD volumes for which a correlation matrix means anything.
MIN_BOLD_VOLUMES = 20
#: Tolerance on b-vector norms (dcm2niix writes 4-6 decimals).
BVEC_NORM_TOLERANCE = 0.05
#: b-values at or under this count as b=0 (scanners report small non-zero b0s).
B0_THRESHOLD = 50.0


class InputFileError(ValueError):
    """An input file that cannot be used; the message names it and the fix."""


@dataclass
class InputSummary:
    """What a check found out about one input file."""

    path: str
    modality: str
    shape: tuple[int, ...]
    zooms: tuple[float, ...]
    n_volumes: int = 1
    repetition_time: float | None = None
    n_b0: int | None = None
    shells: tuple[float, ...] | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def float32_gb(path: str | Path) -> float:
    """Size of an image's data as float32, in GB, from its header alone.

    Memory estimates for the scheduler scale with it (a node that holds the image and
    two working copies needs about three times this much).
    """
    shape = nb.load(str(path)).shape
    return float(np.prod(shape, dtype=np.float64)) * 4 / 1e9


def load_image_data(path: str | Path) -> tuple[nb.Nifti1Image, np.ndarray]:
    """Load a NIfTI image with its data, turning every read failure into :class:`InputFileError`."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: file not found.")
    if path.stat().st_size == 0:
        raise InputFileError(
            f"{path}: the file is empty (0 bytes); re-export it from the scanner data."
        )
    try:
        img = nb.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for corrupt files
        raise InputFileError(
            f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err}); "
            "the file is corrupt or "
            "truncated - re-copy or re-convert it."
        ) from err
    return img, data


def _finite_warnings(path: Path, data: np.ndarray) -> list[str]:
    if not np.issubdtype(data.dtype, np.floating):
        return []
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad == 0:
        return []
    if bad == data.size:
        raise InputFileError(
            f"{path}: every voxel is NaN or Inf; the image holds no data. Re-convert it from "
            "the scanner data, or exclude it with --bids-filter-file."
        )
    return [f"{path.name}: {bad} NaN/Inf voxel values will be treated as 0."]


def check_t1w(path: str | Path) -> InputSummary:
    """Check a T1w image: readable, 3-D, finite."""
    path = Path(path)
    img, data = load_image_data(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputFileError(
            f"{path}: a T1w must be a 3-D image, this one has shape {data.shape}; keep one "
            "volume (re-convert it), or exclude it with --bids-filter-file."
        )
    warnings = _finite_warnings(path, data)
    return InputSummary(
        str(path),
        "anat",
        data.shape,
        tuple(map(float, img.header.get_zooms()[:3])),
        warnings=warnings,
    )


def _check_4d(path: Path, data: np.ndarray, what: str) -> None:
    if data.ndim != 4:
        raise InputFileError(
            f"{path}: a {what} series must be 4-D (x, y, z, time), this one has shape "
            f"{data.shape}; re-convert it with every volume, or exclude it with "
            "--bids-filter-file."
        )


def check_bold(path: str | Path, metadata: dict[str, Any]) -> InputSummary:
    """Check a BOLD run: readable, 4-D, long enough, with a usable RepetitionTime."""
    path = Path(path)
    img, data = load_image_data(path)
    _check_4d(path, data, "BOLD")
    n_volumes = data.shape[3]
    if n_volumes < MIN_BOLD_VOLUMES:
        raise InputFileError(
            f"{path}: only {n_volumes} volumes; at least {MIN_BOLD_VOLUMES} are needed for a "
            "functional connectome. Exclude this run with --bids-filter-file."
        )
    tr = metadata.get("RepetitionTime")
    if tr is None:
        raise InputFileError(
            f"{path}: RepetitionTime is missing from the JSON sidecar; add it (in seconds)."
        )
    warnings = _finite_warnings(path, data)
    pixdim_tr = float(img.header.get_zooms()[3]) if len(img.header.get_zooms()) > 3 else 0.0
    if img.header.get_xyzt_units()[1] == "msec":
        pixdim_tr /= 1000.0
    if pixdim_tr > 0 and abs(pixdim_tr - float(tr)) > 1e-3:
        warnings.append(
            f"{path.name}: NIfTI header TR {pixdim_tr:g} s differs from sidecar RepetitionTime "
            f"{float(tr):g} s; the sidecar value is used."
        )
    zooms = tuple(map(float, img.header.get_zooms()[:3]))
    return InputSummary(
        str(path), "func", data.shape, zooms, n_volumes, float(tr), warnings=warnings
    )


def read_gradients(bval: str | Path, bvec: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read FSL-style ``.bval``/``.bvec`` files; bvecs returned as (N, 3)."""
    for gradient_file in (bval, bvec):
        if not Path(gradient_file).is_file():
            raise InputFileError(
                f"{gradient_file}: not found, cannot read the gradient table; put the .bval and "
                ".bvec files next to the DWI image (same name), or exclude the run with "
                "--bids-filter-file."
            )
    try:
        bvals = np.loadtxt(bval, ndmin=1, dtype=float)
        bvecs = np.loadtxt(bvec, ndmin=2, dtype=float)
    except (OSError, ValueError) as err:
        raise InputFileError(
            f"{bval} / {bvec}: cannot read the gradient table ({err}); they must be plain-text "
            "FSL files (one value per volume; 3 rows of b-vectors)."
        ) from err
    if bvecs.shape[0] != 3 and bvecs.shape[1] == 3:
        bvecs = bvecs.T
    if bvecs.shape[0] != 3:
        raise InputFileError(
            f"{bvec}: b-vectors must have 3 rows (x, y, z), found shape {bvecs.shape}; "
            "re-export the gradient table (FSL format, e.g. with dcm2niix)."
        )
    return bvals.ravel(), bvecs.T


def _orientation_model_warnings(path: Path, bvals: np.ndarray, bvecs: np.ndarray) -> list[str]:
    """Say now, not hours later, when the directions force a fallback from CSD."""
    from pipeline.models import choose_model, summarize_acquisition

    acquisition = summarize_acquisition(bvals, bvecs, b0_threshold=B0_THRESHOLD)
    try:
        choice = choose_model(acquisition)
    except ValueError as err:  # < 6 directions: no orientation model at all
        return [f"{path.name}: {err}."]
    return [f"{path.name}: {choice.reason}."] if choice.model == "csa" else []


def check_dwi(path: str | Path, bval: str | Path, bvec: str | Path) -> InputSummary:
    """Check a DWI run: readable, 4-D, gradients matching the volumes, unit b-vectors, a b0."""
    path = Path(path)
    img, data = load_image_data(path)
    _check_4d(path, data, "DWI")
    bvals, bvecs = read_gradients(bval, bvec)
    n_volumes = data.shape[3]
    if not len(bvals) == len(bvecs) == n_volumes:
        raise InputFileError(
            f"{path}: {n_volumes} volumes but {len(bvals)} b-values ({Path(bval).name}) and "
            f"{len(bvecs)} b-vectors ({Path(bvec).name}); the gradient files must have one "
            "entry per volume."
        )
    b0 = bvals <= B0_THRESHOLD
    if not b0.any():
        raise InputFileError(
            f"{path}: no b=0 volume (all b-values > {B0_THRESHOLD:g}); a b0 is needed for "
            f"registration and the diffusion models. Check {Path(bval).name} (b=0 written as a "
            "large value?) or exclude the run with --bids-filter-file."
        )
    norms = np.linalg.norm(bvecs[~b0], axis=1)
    if np.any(norms < 1e-6):
        raise InputFileError(
            f"{bvec}: {int(np.sum(norms < 1e-6))} diffusion-weighted volume(s) have an all-zero "
            "b-vector; fix the gradient table or remove those volumes."
        )
    warnings = _finite_warnings(path, data)
    if np.any(np.abs(norms - 1) > BVEC_NORM_TOLERANCE):
        warnings.append(f"{Path(bvec).name}: b-vectors are not unit norm; they are normalised.")
    warnings += _orientation_model_warnings(path, bvals, bvecs)
    shells = tuple(sorted({float(round(b, -2)) for b in bvals[~b0]}))
    zooms = tuple(map(float, img.header.get_zooms()[:3]))
    return InputSummary(
        str(path),
        "dwi",
        data.shape,
        zooms,
        n_volumes,
        n_b0=int(b0.sum()),
        shells=shells,
        warnings=warnings,
    )


@dataclass(frozen=True)
class InputProblem:
    """An input file left out of processing, and why."""

    subject: str
    session: str | None
    path: str
    message: str


def preflight_session(session: Any) -> tuple[Any, list[InputProblem], list[InputSummary]]:
    """Check every input file of a session; return the session without unusable files.

    Parameters
    ----------
    session : pipeline.bids.Session
        As collected from the dataset.

    Returns
    -------
    usable : pipeline.bids.Session
        The same session with the files that failed their check removed.
    problems : list of InputProblem
        One per removed file, with the message naming it and the fix.
    summaries : list of InputSummary
        What was learnt about every usable file (including warnings).
    """
    from dataclasses import replace

    problems: list[InputProblem] = []
    summaries: list[InputSummary] = []

    def keep(item: Any, check: Any) -> bool:
        try:
            summaries.append(check())
        except InputFileError as err:
            path = getattr(item, "path", item)
            problems.append(InputProblem(session.subject, session.label, str(path), str(err)))
            return False
        return True

    t1w = tuple(p for p in session.t1w if keep(p, lambda p=p: check_t1w(p)))
    bold = tuple(r for r in session.bold if keep(r, lambda r=r: check_bold(r.path, r.metadata)))
    dwi = tuple(r for r in session.dwi if keep(r, lambda r=r: check_dwi(r.path, r.bval, r.bvec)))
    return replace(session, t1w=t1w, bold=bold, dwi=dwi), problems, summaries
