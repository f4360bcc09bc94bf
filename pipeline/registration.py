"""Image registration with ANTs (ANTsPy), kept free of Nipype.

Everything here takes and returns nibabel images; ANTs images only live inside
the functions.  Transforms are files on disk (ANTs ``.mat`` affines and
``Warp.nii.gz`` displacement fields) wrapped in :class:`Transform`, which knows
how to apply, invert and chain them.

Conventions
-----------
* A :class:`Transform` from space *A* to space *B* resamples an image defined in
  *A* onto a grid of *B* (``apply_transform(image_in_A, t, reference_in_B)``).
  Internally (ANTs/ITK) this is the point map B -> A; ``forward`` is the ANTs
  transform list for that, ``inverse`` the list for B -> A.
* Determinism: every call fixes ``--random-seed`` and the thread count (ITK
  partitions sums by thread, so the thread count is part of the result).
* Speed/accuracy presets live in :data:`REGISTRATION_SETTINGS`
  (``"default"`` and ``"sloppy"``), a table rather than branches.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np

#: Seed handed to every ANTs call that samples randomly.
DEFAULT_SEED = 20240601

#: ITK sizes its thread pool from this once, at a process's first ITK call (an image write
#: counts), and multithreaded ANTs is not reproducible: one thread unless already chosen.
ITK_THREADS = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
os.environ.setdefault(ITK_THREADS, "1")

#: ITK's LPS world <-> nibabel's RAS world.
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Presets per ``--sloppy`` level.  Iterations/shrink/smoothing are per level (coarse first);
#: smoothing sigmas are in voxels.  ``sampling`` is the fraction of voxels the linear
#: metric uses on a regular grid (1.0 = dense, no randomness at all).
REGISTRATION_SETTINGS: dict[str, dict[str, dict]] = {
    "default": {
        "rigid": {
            "metric": "MI", "bins": 32, "sampling": 0.25, "step": 0.1,
            "iterations": (1000, 500, 250, 100), "shrink": (8, 4, 2, 1), "smooth": (3, 2, 1, 0),
        },
        "affine": {
            "metric": "MI", "bins": 32, "sampling": 0.25, "step": 0.1,
            "iterations": (1000, 500, 250, 100), "shrink": (8, 4, 2, 1), "smooth": (3, 2, 1, 0),
        },
        "syn": {
            "metric": "CC", "param": 4, "step": 0.1, "update_sigma": 3.0, "total_sigma": 0.0,
            "iterations": (100, 70, 50, 20), "shrink": (8, 4, 2, 1), "smooth": (3, 2, 1, 0),
        },
        # brain extraction: CC radius 2 instead of 4 took its SyN on the 2 mm copy of a 1 mm
        # T1w from 583 to 189 s, and brain-mask Dice vs simulated truth from 0.982 to 0.987
        "syn_brain": {
            "metric": "CC", "param": 2, "step": 0.1, "update_sigma": 3.0, "total_sigma": 0.0,
            "iterations": (100, 70, 50, 20), "shrink": (8, 4, 2, 1), "smooth": (3, 2, 1, 0),
        },
        # within-subject SyN: same contrast after differential bias correction, so mean
        # squares; no total-field smoothing (it shrank the planted +4.8 % hippocampal change
        # to +1 % on ds-ect); 30 full-resolution iterations let sub-voxel changes converge
        "syn_longitudinal": {
            "metric": "MeanSquares", "param": 0, "step": 0.25, "update_sigma": 3.0,
            "total_sigma": 0.0, "iterations": (30, 30, 30), "shrink": (4, 2, 1),
            "smooth": (2, 1, 0),
        },
        # interpolation: sessions go onto the template grid with a windowed sinc, as linear
        # interpolation blurs each session by its own sub-voxel offset (seen as volume change);
        # dbc_sigma_mm: width of the differential bias correction (Lewis & Fox 2004)
        "template": {"iterations": 4, "interpolation": "lanczosWindowedSinc",
                     "dbc_sigma_mm": 10.0},
        "n4": {"shrink": 4, "iterations": (50, 50, 50, 50), "spline_mm": 100},
        "convergence": {"threshold": 1e-6, "window": 10},
    },
    "sloppy": {
        "rigid": {
            "metric": "MI", "bins": 32, "sampling": 0.25, "step": 0.15,
            "iterations": (100, 50), "shrink": (4, 2), "smooth": (2, 1),
        },
        "affine": {
            "metric": "MI", "bins": 32, "sampling": 0.25, "step": 0.15,
            "iterations": (100, 50), "shrink": (4, 2), "smooth": (2, 1),
        },
        "syn": {
            "metric": "MI", "param": 32, "step": 0.2, "update_sigma": 3.0, "total_sigma": 0.0,
            "iterations": (30, 20, 10), "shrink": (4, 2, 1), "smooth": (2, 1, 0),
        },
        "syn_longitudinal": {
            "metric": "MeanSquares", "param": 0, "step": 0.25, "update_sigma": 3.0,
            "total_sigma": 0.0, "iterations": (30, 30, 30), "shrink": (4, 2, 1),
            "smooth": (2, 1, 0),
        },
        "template": {"iterations": 3, "interpolation": "lanczosWindowedSinc",
                     "dbc_sigma_mm": 10.0},
        "n4": {"shrink": 2, "iterations": (20, 20), "spline_mm": 100},
        "convergence": {"threshold": 1e-6, "window": 10},
    },
}


def get_settings(settings: str | dict) -> dict:
    """Return a preset from :data:`REGISTRATION_SETTINGS` (or pass a dict through)."""
    if isinstance(settings, dict):
        return settings
    try:
        return REGISTRATION_SETTINGS[settings]
    except KeyError:
        raise ValueError(
            f"Unknown registration settings {settings!r}; choose one of "
            f"{sorted(REGISTRATION_SETTINGS)}."
        ) from None


@contextlib.contextmanager
def ants_threads(n_threads: int | None) -> Iterator[None]:
    """Set ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` for the duration of the block.

    Takes effect only if the block holds the process's first ITK call (see
    :data:`ITK_THREADS`); the app sets the variable before its workers start.
    """
    key = ITK_THREADS
    old = os.environ.get(key)
    if n_threads is not None:
        os.environ[key] = str(int(n_threads))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


# --------------------------------------------------------------------------- conversion


def _as_image(image: nb.Nifti1Image | str | os.PathLike) -> nb.Nifti1Image:
    return image if isinstance(image, nb.spatialimages.SpatialImage) else nb.load(image)


def to_ants(image: nb.Nifti1Image | str | os.PathLike, *, dtype: type = np.float32):
    """Convert a 3-D nibabel image (or path) to an ANTs image with the same world geometry.

    The RAS affine is split into origin, spacing and a direction matrix in ITK's LPS
    world; oblique and flipped axes are kept exactly.

    Raises
    ------
    ValueError
        When the image is not 3-D or its affine has shear (ITK cannot represent it).
    """
    import ants

    img = _as_image(image)
    name = img.get_filename() or "<in-memory image>"
    data = np.asarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{name}: expected a 3-D image, got shape {data.shape}.")
    lps = _LPS @ img.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"{name}: the affine has a zero-length voxel axis; fix the header.")
    direction = lps[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-5):
        raise ValueError(
            f"{name}: the affine has shear, which ANTs cannot represent; "
            "reslice the image to an orthogonal grid first."
        )
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=dtype),
        origin=[float(v) for v in lps[:3, 3]],
        spacing=[float(v) for v in spacing],
        direction=direction.astype(np.float64),
    )


def from_ants(
    aimg, *, like: nb.Nifti1Image | None = None, dtype: type | None = None
) -> nb.Nifti1Image:
    """Convert an ANTs image to nibabel, rebuilding the RAS affine from ITK geometry.

    ``like`` copies header fields (units, codes) from a reference image; ``dtype``
    casts the data (labels come back as floats from ANTs, so round them before).
    """
    data = aimg.numpy()
    if dtype is not None:
        data = data.astype(dtype)
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(aimg.direction, dtype=float) * np.asarray(aimg.spacing, float)
    affine[:3, 3] = aimg.origin
    affine = _LPS @ affine
    header = like.header.copy() if like is not None else None
    out = nb.Nifti1Image(data, affine, header=header)
    out.set_sform(affine, code=1)
    out.set_qform(affine, code=1)
    out.header.set_xyzt_units("mm")
    if dtype is not None:
        out.set_data_dtype(dtype)
    return out


# --------------------------------------------------------------------------- transforms

_LABEL_INTERPOLATORS = ("nearestNeighbor", "genericLabel", "multiLabel")

TransformList = tuple[tuple[str, bool], ...]


@dataclass(frozen=True)
class Transform:
    """Resampling from ``source`` space to ``target`` space as ANTs transform files.

    Attributes
    ----------
    forward : tuple of (path, invert)
        ANTs ``transformlist``/``whichtoinvert`` that resamples a source-space image
        onto a target grid.
    inverse : tuple of (path, invert)
        The list that resamples a target-space image onto a source grid.
    source, target : str
        Free-text space names, for messages and provenance.
    """

    forward: TransformList
    inverse: TransformList
    source: str = "source"
    target: str = "target"
    files: tuple[str, ...] = field(default=(), compare=False)

    def inverted(self) -> Transform:
        """The transform from ``target`` to ``source``."""
        return Transform(self.inverse, self.forward, self.target, self.source, self.files)

    def then(self, other: Transform) -> Transform:
        """Chain ``self`` (A -> B) with ``other`` (B -> C) into A -> C."""
        return Transform(
            forward=other.forward + self.forward,
            inverse=self.inverse + other.inverse,
            source=self.source,
            target=other.target,
            files=self.files + other.files,
        )


def save_transform(transform: Transform, path: str | os.PathLike) -> Path:
    """Write a :class:`Transform` as JSON (file paths and inversion flags), atomically."""
    from pipeline.derivatives import write_json

    return write_json(path, {
        "forward": [[p, inv] for p, inv in transform.forward],
        "inverse": [[p, inv] for p, inv in transform.inverse],
        "source": transform.source,
        "target": transform.target,
        "files": list(transform.files),
    })


def load_transform(path: str | os.PathLike) -> Transform:
    """Read a :class:`Transform` written by :func:`save_transform`; its files must still exist."""
    import json

    data = json.loads(Path(path).read_text())
    transform = Transform(
        forward=tuple((p, bool(inv)) for p, inv in data["forward"]),
        inverse=tuple((p, bool(inv)) for p, inv in data["inverse"]),
        source=data["source"],
        target=data["target"],
        files=tuple(data.get("files", ())),
    )
    missing = [p for p, _ in transform.forward + transform.inverse if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"{path}: transform files are gone: {missing}")
    return transform


def affine_to_ants_file(matrix_lps: np.ndarray, path: str | os.PathLike) -> str:
    """Write a 4x4 LPS point map (fixed -> moving, ITK convention) as an ANTs ``.mat``."""
    import ants

    tx = ants.create_ants_transform(
        transform_type="AffineTransform",
        precision="double",
        dimension=3,
        matrix=np.asarray(matrix_lps[:3, :3], float),
        translation=np.asarray(matrix_lps[:3, 3], float),
        center=np.zeros(3),
    )
    ants.write_transform(tx, str(path))
    return str(path)


def ants_file_to_affine(path: str | os.PathLike) -> np.ndarray:
    """Read an ANTs/ITK affine file as a 4x4 LPS point map (fixed -> moving)."""
    import ants

    tx = ants.read_transform(str(path))
    params = np.asarray(tx.parameters, float)
    center = np.asarray(tx.fixed_parameters, float)
    matrix = params[:9].reshape(3, 3)
    translation = params[9:12]
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = translation + center - matrix @ center
    return out


def identity_transform(work_dir: str | os.PathLike, *, source: str = "source",
                       target: str = "target") -> Transform:
    """An identity :class:`Transform` (an identity ``.mat`` written into ``work_dir``)."""
    path = affine_to_ants_file(np.eye(4), Path(work_dir) / f"identity_{source}_to_{target}.mat")
    return Transform(((path, False),), ((path, True),), source, target, (path,))


def apply_transform(
    image: nb.Nifti1Image | str | os.PathLike,
    transform: Transform,
    reference: nb.Nifti1Image | str | os.PathLike,
    *,
    interpolation: str = "linear",
    n_threads: int | None = 1,
) -> nb.Nifti1Image:
    """Resample ``image`` (source space) onto the grid of ``reference`` (target space).

    ``interpolation`` is an ANTs interpolator (``linear``, ``nearestNeighbor``,
    ``genericLabel``, ``bSpline``...).  Label images come back as their original
    integer dtype.
    """
    import ants

    img = _as_image(image)
    ref = _as_image(reference)
    labels = interpolation in _LABEL_INTERPOLATORS
    with ants_threads(n_threads):
        out = ants.apply_transforms(
            fixed=to_ants(ref),
            moving=to_ants(img),
            transformlist=[p for p, _ in transform.forward],
            whichtoinvert=[inv for _, inv in transform.forward],
            interpolator=interpolation,
        )
    if labels:
        data = np.rint(out.numpy()).astype(img.get_data_dtype())
        return nb.Nifti1Image(data, from_ants(out).affine)
    return from_ants(out, dtype=np.float32)


def displacement_field(
    transform: Transform, reference: nb.Nifti1Image, work_dir: str | os.PathLike,
    *, n_threads: int | None = 1,
) -> np.ndarray:
    """Compose ``transform`` into one displacement field on the ``reference`` grid.

    Returns an array ``(X, Y, Z, 3)`` of LPS displacements (mm) such that the
    target-space point ``p`` corresponds to the source-space point ``p + u(p)``.
    """
    import ants

    prefix = str(Path(work_dir) / "composed_")
    ref = to_ants(reference)
    with ants_threads(n_threads):
        path = ants.apply_transforms(
            fixed=ref, moving=ref,
            transformlist=[p for p, _ in transform.forward],
            whichtoinvert=[inv for _, inv in transform.forward],
            compose=prefix,
        )
    return np.asarray(ants.image_read(path).numpy(), dtype=np.float64)


def jacobian_determinant(
    transform: Transform, reference: nb.Nifti1Image, work_dir: str | os.PathLike,
    *, n_threads: int | None = 1,
) -> nb.Nifti1Image:
    """Jacobian determinant of the target -> source point map on the ``reference`` grid.

    A value of 1.05 at a target-space voxel means the tissue there occupies 5 % more
    volume in the source space; integrating it over a target-space parcel gives the
    parcel volume in source (e.g. native) space.  Includes the affine part.
    """
    disp = displacement_field(transform, reference, work_dir, n_threads=n_threads)
    lps = _LPS @ reference.affine
    inv_vox = np.linalg.inv(lps[:3, :3])
    # d u_c / d index_a, central differences; then chain rule to physical coordinates
    grads = np.stack(
        [np.stack(np.gradient(disp[..., c], axis=(0, 1, 2)), -1) for c in range(3)], -2
    )
    jac = np.eye(3) + grads @ inv_vox
    det = np.linalg.det(jac).astype(np.float32)
    return nb.Nifti1Image(det, reference.affine)


# --------------------------------------------------------------------------- registration


def _stage_args(kind: str, stage: dict, fixed: str, moving: str, conv: dict,
                masks: str) -> list[str]:
    levels = "x".join(str(i) for i in stage["iterations"])
    shrink = "x".join(str(s) for s in stage["shrink"])
    smooth = "x".join(str(s) for s in stage["smooth"]) + "vox"
    if kind == "syn":
        # param: radius for CC, bins for MI, ignored by MeanSquares
        metric = f"{stage['metric']}[{fixed},{moving},1,{stage['param']}]"
        transform = f"SyN[{stage['step']},{stage['update_sigma']},{stage['total_sigma']}]"
    else:
        metric = (
            f"{stage['metric']}[{fixed},{moving},1,{stage['bins']},Regular,{stage['sampling']}]"
        )
        transform = f"{kind.capitalize()}[{stage['step']}]"
    return [
        "--transform", transform,
        "--metric", metric,
        "--convergence", f"[{levels},{conv['threshold']},{conv['window']}]",
        "--shrink-factors", shrink,
        "--smoothing-sigmas", smooth,
        "--masks", masks,
    ]


def itk_affine_text(matrix_lps: np.ndarray) -> str:
    """An ITK ``AffineTransform_double_3_3`` text file of a 4x4 LPS point map (centre 0).

    For a rigid moving -> T1w registration it maps T1w (fixed) points to moving points, so
    ``antsApplyTransforms`` with it resamples the moving image onto the T1w grid, like
    fMRIPrep's ``from-boldref_to-T1w_mode-image_desc-coreg_xfm.txt``.  Unlike the
    :class:`Transform` JSON, which names files in a work directory, it is self-contained.
    """
    m = np.asarray(matrix_lps, dtype=float)
    params = [*m[:3, :3].ravel(), *m[:3, 3]]
    return ("#Insight Transform File V1.0\n#Transform 0\n"
            "Transform: AffineTransform_double_3_3\n"
            f"Parameters: {' '.join(f'{v:.12g}' for v in params)}\n"
            "FixedParameters: 0 0 0\n")


def register(
    fixed: nb.Nifti1Image | str | os.PathLike,
    moving: nb.Nifti1Image | str | os.PathLike,
    *,
    stages: Sequence[str] = ("rigid", "affine", "syn"),
    fixed_mask: nb.Nifti1Image | None = None,
    moving_mask: nb.Nifti1Image | None = None,
    initial: Transform | str | None = "com",
    settings: str | dict = "default",
    work_dir: str | os.PathLike | None = None,
    prefix: str = "reg_",
    seed: int = DEFAULT_SEED,
    n_threads: int | None = 1,
    source: str = "moving",
    target: str = "fixed",
) -> tuple[Transform, nb.Nifti1Image]:
    """Register ``moving`` onto ``fixed`` with antsRegistration.

    Parameters
    ----------
    fixed, moving : nibabel image or path
    stages : sequence of {"rigid", "affine", "syn"}
        Run in this order; each starts from the previous result.
    fixed_mask, moving_mask : nibabel image, optional
        Metric masks, used by every stage.
    initial : Transform, "com", "identity" or None
        ``"com"`` aligns centres of mass; a :class:`Transform` (moving -> fixed) is used as is.
    settings : str or dict
        Key of :data:`REGISTRATION_SETTINGS` (``"default"``, ``"sloppy"``) or a preset dict.
    work_dir : path, optional
        Where the transform files go (a new temporary folder when omitted).
    prefix : str
        File-name prefix for this registration's outputs inside ``work_dir``.
    seed : int
        ``--random-seed`` for metric sampling.
    n_threads : int, optional
        ITK threads; fixed so the result is reproducible.

    Returns
    -------
    transform : Transform
        ``moving`` space -> ``fixed`` space.
    warped : nibabel.Nifti1Image
        ``moving`` resampled on the ``fixed`` grid.
    """
    import ants

    conf = get_settings(settings)
    unknown = set(stages) - {"rigid", "affine", "syn"}
    if unknown or not stages:
        raise ValueError(f"stages must be a non-empty subset of rigid/affine/syn, got {stages}.")
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="trajreg_"))
    work.mkdir(parents=True, exist_ok=True)
    out_prefix = str(work / prefix)
    scratch = Path(tempfile.mkdtemp(prefix="in_", dir=work))
    fixed_img, moving_img = _as_image(fixed), _as_image(moving)
    paths = {}
    for key, img in (("fixed", fixed_img), ("moving", moving_img),
                     ("fmask", fixed_mask), ("mmask", moving_mask)):
        if img is not None:
            paths[key] = str(scratch / f"{key}.nii.gz")
            dtype = np.float32 if key in ("fixed", "moving") else np.uint8
            data = np.asarray(_as_image(img).dataobj)
            if key in ("fmask", "mmask"):
                data = data > 0
            ants.image_write(to_ants(nb.Nifti1Image(data.astype(dtype), _as_image(img).affine),
                                     dtype=np.float32), paths[key])
    masks = f"[{paths.get('fmask', 'NA')},{paths.get('mmask', 'NA')}]"

    args = ["--dimensionality", "3", "--float", "1", "--collapse-output-transforms", "1",
            "--output", f"[{out_prefix},{out_prefix}Warped.nii.gz]",
            "--interpolation", "Linear", "--use-histogram-matching", "0",
            "--winsorize-image-intensities", "[0.005,0.995]",
            "--random-seed", str(int(seed))]
    if isinstance(initial, Transform):
        for path, inv in initial.forward:
            args += ["--initial-moving-transform", f"[{path},{int(inv)}]"]
    elif initial == "com":
        args += ["--initial-moving-transform", f"[{paths['fixed']},{paths['moving']},1]"]
    elif initial not in (None, "identity"):
        raise ValueError(f"initial must be a Transform, 'com', 'identity' or None, got {initial!r}")
    for kind in stages:
        args += _stage_args(kind, conf[kind], paths["fixed"], paths["moving"],
                            conf["convergence"], masks)

    with ants_threads(n_threads):
        ants.registration(args, None)

    affine = f"{out_prefix}0GenericAffine.mat"
    warp = f"{out_prefix}1Warp.nii.gz"
    inv_warp = f"{out_prefix}1InverseWarp.nii.gz"
    if "syn" in stages and not Path(affine).exists():
        # SyN only with no initial transform: collapsed output has just the warp
        warp, inv_warp = f"{out_prefix}0Warp.nii.gz", f"{out_prefix}0InverseWarp.nii.gz"
        forward, inverse = ((warp, False),), ((inv_warp, False),)
        files = (warp, inv_warp)
    elif "syn" in stages:
        forward = ((warp, False), (affine, False))
        inverse = ((affine, True), (inv_warp, False))
        files = (affine, warp, inv_warp)
    else:
        forward, inverse, files = ((affine, False),), ((affine, True),), (affine,)
    warped = from_ants(ants.image_read(f"{out_prefix}Warped.nii.gz"), dtype=np.float32)
    for path in scratch.iterdir():
        path.unlink()
    scratch.rmdir()
    return Transform(forward, inverse, source, target, files), warped


def transform_affine(transform: Transform) -> np.ndarray:
    """4x4 LPS point map (target -> source) of a purely linear :class:`Transform`."""
    out = np.eye(4)
    # ANTs maps a target point through the list in order: first entry first
    for path, inv in transform.forward:
        if not path.endswith(".mat"):
            raise ValueError(f"{path}: not a linear transform file.")
        mat = ants_file_to_affine(path)
        out = (np.linalg.inv(mat) if inv else mat) @ out
    return out


# --------------------------------------------------------------------------- subject template

#: Values of ``--anat-reference``.
ANAT_REFERENCE_MODES = ("unbiased", "first", "sessionwise")


@dataclass(frozen=True)
class SubjectTemplate:
    """A within-subject reference and each session's transform to it.

    Attributes
    ----------
    mode : str
        One of :data:`ANAT_REFERENCE_MODES`.
    image : nibabel.Nifti1Image or None
        The template (``None`` for ``sessionwise``: every session is its own reference).
    mask : nibabel.Nifti1Image or None
        Brain mask of the template (majority vote of the session masks), if masks were given.
    transforms : list of Transform
        Session native space -> template space, in input order (identity for ``sessionwise``).
    """

    mode: str
    image: nb.Nifti1Image | None
    mask: nb.Nifti1Image | None
    transforms: list[Transform]


def _centroid(img: nb.Nifti1Image, mask: nb.Nifti1Image | None) -> np.ndarray:
    data = np.asarray(mask.dataobj) > 0 if mask is not None else np.asarray(img.dataobj)
    weights = data.astype(np.float64)
    ijk = np.argwhere(weights > 0)
    w = weights[tuple(ijk.T)]
    return nb.affines.apply_affine(img.affine, (ijk * w[:, None]).sum(0) / w.sum())


def _template_grid(images: Sequence[nb.Nifti1Image], shifts: Sequence[np.ndarray],
                   margin_mm: float = 6.0,
                   masks: Sequence[nb.Nifti1Image | None] | None = None) -> nb.Nifti1Image:
    """Axis-aligned (RAS) grid covering every session after ``shifts``; finest voxel size.

    Built from all sessions symmetrically so that no session's grid is privileged.  With
    ``masks``, the grid covers the brains (plus ``margin_mm``, which also absorbs the
    rotations the template iterations find) instead of whole fields of view: the
    images are skull-stripped, and the smaller grid halves the cost of every SyN.
    """
    corners = []
    masks = list(masks) if masks is not None else [None] * len(images)
    for img, shift, msk in zip(images, shifts, masks, strict=True):
        if msk is not None and (np.asarray(msk.dataobj) > 0).any():
            ijk = np.argwhere(np.asarray(msk.dataobj) > 0)
            lo, hi = ijk.min(0), ijk.max(0)
            box = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1).T
            corners.append(nb.affines.apply_affine(msk.affine, box) - shift)
            continue
        shape = np.asarray(img.shape[:3]) - 1
        box = np.array(np.meshgrid(*[[0, n] for n in shape], indexing="ij")).reshape(3, -1).T
        corners.append(nb.affines.apply_affine(img.affine, box) - shift)
    corners = np.concatenate(corners)
    voxel = float(min(min(img.header.get_zooms()[:3]) for img in images))
    lo = corners.min(0) - margin_mm
    hi = corners.max(0) + margin_mm
    shape = np.ceil((hi - lo) / voxel).astype(int) + 1
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = lo
    return nb.Nifti1Image(np.zeros(shape, np.float32), affine)


def _affine_transform(matrix_lps: np.ndarray, path: Path, source: str, target: str) -> Transform:
    file = affine_to_ants_file(matrix_lps, path)
    return Transform(((file, False),), ((file, True),), source, target, (file,))


def _normalised(img: nb.Nifti1Image, mask: nb.Nifti1Image | None) -> nb.Nifti1Image:
    """Scale intensities by the median inside the brain so sessions average fairly."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    inside = np.asarray(mask.dataobj) > 0 if mask is not None else data > 0
    scale = float(np.median(data[inside])) if inside.any() else 1.0
    return nb.Nifti1Image(data / (scale if scale > 0 else 1.0), img.affine)


def _mean_rigid(matrices: Sequence[np.ndarray]) -> np.ndarray:
    """Log-Euclidean mean of 4x4 rigid/affine matrices (exact for commuting ones)."""
    from scipy.linalg import expm, logm

    logs = [np.real(logm(m)) for m in matrices]
    return np.real(expm(np.mean(logs, axis=0)))


def build_subject_template(
    images: Sequence[nb.Nifti1Image | str | os.PathLike],
    masks: Sequence[nb.Nifti1Image | str | os.PathLike] | None = None,
    *,
    mode: str = "unbiased",
    nonlinear: bool = True,
    settings: str | dict = "default",
    iterations: int | None = None,
    work_dir: str | os.PathLike | None = None,
    seed: int = DEFAULT_SEED,
    n_threads: int | None = 1,
    names: Sequence[str] | None = None,
) -> SubjectTemplate:
    """Build a within-subject anatomical reference from all sessions.

    ``unbiased`` (default): sessions are first aligned on their brain centroids and
    averaged; then, ``iterations`` times, every session is rigidly registered to the
    current average (all but the last time without the finest level), the
    log-Euclidean mean of the session transforms is removed
    (so the template sits at the centre of the sessions, none privileged) and the
    template is re-averaged.  Finally, when ``nonlinear``, each session is resampled
    once on the template grid (windowed sinc), its residual bias matched to the template
    (:func:`differential_bias_correction`), and given a SyN warp to the template, which
    carries the within-subject anatomical change.

    ``first``: the first session is the template (transforms of the others are
    rigid + SyN to it; the first gets the identity).  ``sessionwise``: no common
    template; each session is its own reference (identity transforms).

    Parameters
    ----------
    images : sequence of nibabel images or paths
        Bias-corrected, skull-stripped T1w of each session (same subject).
    masks : sequence, optional
        Brain masks, used as registration metric masks and for intensity scaling.
    mode : {"unbiased", "first", "sessionwise"}
    nonlinear : bool
        Add a per-session SyN stage after the rigid alignment.
    settings : str or dict
        :data:`REGISTRATION_SETTINGS` key.
    iterations : int, optional
        Rigid template iterations (preset value when omitted).
    work_dir : path, optional
        Where transforms are written (they must outlive the call).
    seed, n_threads : int
        Determinism controls, see :func:`register`.
    names : sequence of str, optional
        Session labels for file names (``ses-<i>`` by default).

    Returns
    -------
    SubjectTemplate
    """
    if mode not in ANAT_REFERENCE_MODES:
        raise ValueError(f"mode must be one of {ANAT_REFERENCE_MODES}, got {mode!r}.")
    imgs = [_as_image(i) for i in images]
    if not imgs:
        raise ValueError("build_subject_template needs at least one session image.")
    msks = [_as_image(m) for m in masks] if masks is not None else [None] * len(imgs)
    if len(msks) != len(imgs):
        raise ValueError(f"got {len(imgs)} images but {len(msks)} masks.")
    names = list(names) if names is not None else [f"ses-{i + 1}" for i in range(len(imgs))]
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="trajtpl_"))
    work.mkdir(parents=True, exist_ok=True)
    conf = get_settings(settings)
    common = dict(settings=conf, work_dir=work, seed=seed, n_threads=n_threads)
    interpolation = conf["template"].get("interpolation", "linear")

    if mode == "sessionwise":
        transforms = [identity_transform(work, source=n, target=n) for n in names]
        return SubjectTemplate(mode, None, None, transforms)

    norm = [_normalised(i, m) for i, m in zip(imgs, msks, strict=True)]
    if mode == "first":
        template = norm[0]
        tmask = msks[0]
        resampled = None
        rigid = [identity_transform(work, source=names[0], target="template")]
        for k in range(1, len(imgs)):
            tx, _ = register(template, norm[k], stages=("rigid",), fixed_mask=tmask,
                             moving_mask=msks[k], prefix=f"{names[k]}_rigid_",
                             source=names[k], target="template", **common)
            rigid.append(tx)
    else:
        centroids = [_centroid(i, m) for i, m in zip(norm, msks, strict=True)]
        mean_c = np.mean(centroids, axis=0)
        grid = _template_grid(norm, [c - mean_c for c in centroids], margin_mm=12.0,
                              masks=msks)
        # template point y (RAS) -> session point y + c_i - mean_c; stored in LPS
        matrices = []
        for c in centroids:
            shift = np.eye(4)
            shift[:3, 3] = _LPS[:3, :3] @ (c - mean_c)
            matrices.append(shift)
        n_iter = iterations if iterations is not None else conf["template"]["iterations"]
        levels = len(conf["rigid"]["shrink"])
        # a two-level preset (sloppy) left with its coarse level alone steered badly
        coarse = conf if levels < 3 else {**conf, "rigid": {**conf["rigid"], **{
            key: conf["rigid"][key][:-1] for key in ("iterations", "shrink", "smooth")}}}
        tmask = None
        for it in range(n_iter + 1):
            rigid = [
                _affine_transform(m, work / f"{n}_to_template.mat", n, "template")
                for m, n in zip(matrices, names, strict=True)
            ]
            # intermediate averages only steer the rigid fits: linear is enough there, and the
            # windowed sinc (~10x slower) is kept for the final average the warps use
            final = it == n_iter
            template, tmask, resampled = _average(norm, msks, rigid, grid, n_threads,
                                                  interpolation if final else "linear")
            if final:
                break
            matrices = []
            # only the last rigid fit decides the template; earlier ones skip the full-resolution
            # level (1 mm T1w: 6.4 s instead of 24.6 s per fit, within 0.03 mm of it)
            steer = common if it == n_iter - 1 else {**common, "settings": coarse}
            for k in range(len(imgs)):
                tx, _ = register(template, norm[k], stages=("rigid",), initial=rigid[k],
                                 fixed_mask=tmask, moving_mask=msks[k],
                                 prefix=f"{names[k]}_it{it}_", source=names[k],
                                 target="template", **steer)
                matrices.append(transform_affine(tx))
            # recentre: the mean session transform becomes the identity
            centre = np.linalg.inv(_mean_rigid(matrices))
            matrices = [m @ centre for m in matrices]

    if not nonlinear:
        return SubjectTemplate(mode, template, tmask, rigid)
    transforms = []
    for k, tx in enumerate(rigid):
        if mode == "first" and k == 0:
            transforms.append(tx)
            continue
        transforms.append(longitudinal_warp(
            norm[k], tx, template, tmask, on_template=resampled[k] if resampled else None,
            settings=conf, work_dir=work, seed=seed, n_threads=n_threads, name=names[k]))
    return SubjectTemplate(mode, template, tmask, transforms)


def longitudinal_warp(
    image: nb.Nifti1Image | str | os.PathLike,
    rigid: Transform,
    template: nb.Nifti1Image | str | os.PathLike,
    template_mask: nb.Nifti1Image | str | os.PathLike | None,
    *,
    mask: nb.Nifti1Image | str | os.PathLike | None = None,
    on_template: nb.Nifti1Image | None = None,
    settings: str | dict = "default",
    work_dir: str | os.PathLike | None = None,
    seed: int = DEFAULT_SEED,
    n_threads: int | None = 1,
    name: str = "session",
) -> Transform:
    """One session's SyN warp onto its subject template, chained after its rigid transform.

    The session is resampled once on the template grid (the template preset's
    interpolation), its residual bias matched to the template
    (:func:`differential_bias_correction`) and registered with the
    ``syn_longitudinal`` preset, so that the warp carries anatomy only.  Sessions are
    independent here, which lets a workflow run them side by side.

    Parameters
    ----------
    image : nibabel image or path
        The session's skull-stripped T1w; intensity-scaled like the template unless
        ``mask`` is given (then scaled here by its median inside the mask).
    rigid : Transform
        Session -> template rigid transform (from :func:`build_subject_template` with
        ``nonlinear=False``).
    template, template_mask : nibabel image or path
        The subject template and its brain mask.
    mask : nibabel image or path, optional
        The session's brain mask, to scale ``image`` as the template build did.
    on_template : nibabel image, optional
        ``image`` already resampled on the template grid (skips that step).
    settings, work_dir, seed, n_threads
        As for :func:`register`.
    name : str
        Session label, for file names.

    Returns
    -------
    Transform
        Session -> template (rigid then SyN).
    """
    conf = get_settings(settings)
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="trajsyn_"))
    template = _as_image(template)
    tmask = _as_image(template_mask) if template_mask is not None else None
    moved = on_template
    if moved is None:
        img = _as_image(image)
        if mask is not None:
            img = _normalised(img, _as_image(mask))
        moved = apply_transform(img, rigid, template,
                                interpolation=conf["template"].get("interpolation", "linear"),
                                n_threads=n_threads)
    dbc_sigma = conf["template"].get("dbc_sigma_mm", 0.0)
    if dbc_sigma > 0 and tmask is not None:
        moved = differential_bias_correction(moved, template, tmask, sigma_mm=dbc_sigma)
    warp, _ = register(template, moved, stages=("syn",), initial=None, fixed_mask=tmask,
                       moving_mask=tmask, prefix=f"{name}_syn_", source=name, target="template",
                       settings={**conf, "syn": conf["syn_longitudinal"]}, work_dir=work,
                       seed=seed, n_threads=n_threads)
    return rigid.then(warp)


def differential_bias_correction(
    image: nb.Nifti1Image, reference: nb.Nifti1Image, mask: nb.Nifti1Image,
    *, sigma_mm: float = 10.0,
) -> nb.Nifti1Image:
    """Scale ``image`` by the smooth ratio ``reference / image`` inside ``mask``.

    Both images share one grid (a session rigidly resampled on its subject template).
    The ratio of their Gaussian-smoothed (normalised convolution within the mask)
    intensities removes the residual bias-field difference N4 leaves between sessions,
    which a mean-squares warp would otherwise explain as volume change (the
    differential bias correction of Lewis & Fox, 2004).
    """
    from scipy import ndimage

    if image.shape[:3] != reference.shape[:3] or image.shape[:3] != mask.shape[:3]:
        raise ValueError("differential_bias_correction: image, reference and mask must share "
                         "one grid; resample them first.")
    inside = (np.asarray(mask.dataobj) > 0).astype(np.float64)
    sigma = sigma_mm / np.asarray(image.header.get_zooms()[:3], float)
    weight = np.maximum(ndimage.gaussian_filter(inside, sigma), 1e-3)
    data = np.asarray(image.dataobj, np.float64)
    ref = np.asarray(reference.dataobj, np.float64)
    smooth_img = ndimage.gaussian_filter(data * inside, sigma) / weight
    smooth_ref = ndimage.gaussian_filter(ref * inside, sigma) / weight
    ratio = np.where(smooth_img > 1e-6, smooth_ref / np.maximum(smooth_img, 1e-6), 1.0)
    return nb.Nifti1Image((data * ratio).astype(np.float32), image.affine)


def _average(images, masks, transforms, grid, n_threads, interpolation="linear"):
    """Mean of the sessions resampled on ``grid``, majority vote of their masks, and the
    resampled sessions themselves (reused as the inputs of the longitudinal warps)."""
    total = np.zeros(grid.shape, np.float64)
    votes = np.zeros(grid.shape, np.float64)
    resampled = []
    for img, msk, tx in zip(images, masks, transforms, strict=True):
        resampled.append(apply_transform(img, tx, grid, interpolation=interpolation,
                                         n_threads=n_threads))
        total += np.asarray(resampled[-1].dataobj)
        if msk is not None:
            warped = apply_transform(nb.Nifti1Image(
                (np.asarray(msk.dataobj) > 0).astype(np.float32), msk.affine), tx, grid,
                n_threads=n_threads)
            votes += np.asarray(warped.dataobj)
    template = nb.Nifti1Image((total / len(images)).astype(np.float32), grid.affine)
    if all(m is None for m in masks):
        return template, None, resampled
    mask = nb.Nifti1Image((votes / len(images) >= 0.5).astype(np.uint8), grid.affine)
    return template, mask, resampled


# --------------------------------------------------------------------------- MNI and atlases


def register_to_mni(
    image: nb.Nifti1Image | str | os.PathLike,
    mask: nb.Nifti1Image | None = None,
    *,
    resolution: int = 2,
    settings: str | dict = "default",
    work_dir: str | os.PathLike | None = None,
    prefix: str = "to_mni_",
    seed: int = DEFAULT_SEED,
    n_threads: int | None = 1,
    source: str = "template",
) -> Transform:
    """Rigid + affine + SyN registration of a skull-stripped T1w to the bundled MNI template.

    Returns the ``source`` -> ``MNI152NLin2009aSym`` :class:`Transform`.
    """
    from pipeline.templates import load_template

    mni = load_template(resolution)
    img = _as_image(image)
    if mask is not None:
        # zero the background so the skull-stripped template matches
        img = nb.Nifti1Image(np.asarray(img.dataobj, np.float32)
                             * (np.asarray(_as_image(mask).dataobj) > 0), img.affine)
    tx, _ = register(mni.t1w, img, stages=("rigid", "affine", "syn"), settings=settings,
                     work_dir=work_dir, prefix=prefix, seed=seed, n_threads=n_threads,
                     source=source, target=mni.name)
    return tx


def atlas_to_native(
    atlas_image: nb.Nifti1Image | str | os.PathLike,
    native_to_mni: Transform,
    native_reference: nb.Nifti1Image | str | os.PathLike,
    *,
    n_threads: int | None = 1,
) -> nb.Nifti1Image:
    """Bring an MNI-space label image onto a native grid (nearest-neighbour labels).

    ``native_to_mni`` is typically ``session_to_template.then(template_to_mni)``.
    """
    atlas = _as_image(atlas_image)
    src = nb.Nifti1Image(np.asarray(atlas.dataobj).astype(np.int16), atlas.affine)
    return apply_transform(src, native_to_mni.inverted(), native_reference,
                           interpolation="nearestNeighbor", n_threads=n_threads)
