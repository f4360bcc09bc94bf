"""One-shot resampling of a BOLD series into template space.

Every output voxel is interpolated once from the raw volume, through the composition of

1. the template -> T1w point map ``phi`` (non-linear; computed once per run),
2. the T1w -> BOLD-reference rigid point map ``C`` (coregistration),
3. the per-volume head motion ``M_t^-1`` (reference world -> volume ``t`` world, see
   :mod:`pipeline.motion` for the convention), and the inverse BOLD affine (world -> voxel).

``phi`` is stored as the T1w world coordinates (RAS mm) of every template voxel, a
``(X, Y, Z, 3)`` "coordinate map"; per volume only the 4x4 affine ``A^-1 M_t^-1 C`` is
applied to it, so memory stays at one coordinate map plus one output volume and the series
is written to disk volume by volume (an uncompressed NIfTI memory map).

Coordinate maps come from a :class:`pipeline.registration.Transform` (ANTs files, through
:func:`pipeline.registration.displacement_field`) or from a ``mode-image`` xfm NIfTI that
holds source coordinates on a coarse grid (what the simulator writes as ground truth).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage

from pipeline.motion import rigid_matrix

#: ITK's LPS world <-> nibabel's RAS world (the same matrix converts both ways).
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def output_resolution(zooms: tuple[float, ...] | np.ndarray, finest: float = 2.0) -> float:
    """Voxel size of the template-space output: the BOLD voxel size, never finer than ``finest``.

    The largest spatial zoom is taken (anisotropic voxels are not up-sampled along their
    coarsest axis) and rounded to 0.01 mm so tiny header jitter does not change the grid.
    """
    size = float(np.max(np.asarray(zooms, dtype=float)[:3]))
    return max(float(finest), round(size, 2))


def template_grid(
    reference: nb.Nifti1Image, resolution: float
) -> tuple[tuple[int, ...], np.ndarray]:
    """A grid covering the field of view of ``reference`` (the template) at ``resolution`` mm.

    The first voxel centre is kept, so a 2 mm request on the 2 mm template returns its own
    grid exactly.

    Returns
    -------
    shape : tuple of int
    affine : ndarray (4, 4)
    """
    aff = np.asarray(reference.affine, dtype=float)
    zooms = np.linalg.norm(aff[:3, :3], axis=0)
    extent = (np.asarray(reference.shape[:3]) - 1) * zooms
    shape = tuple(int(n) for n in np.floor(extent / resolution + 1e-6) + 1)
    out = aff.copy()
    out[:3, :3] = aff[:3, :3] / zooms * resolution
    return shape, out


def grid_points(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World coordinates (RAS mm) of every voxel centre, ``(*shape, 3)``, C order."""
    ijk = np.indices(shape[:3], dtype=np.float64).reshape(3, -1).T
    return (ijk @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape[:3], 3)


def coordinates_from_transform(
    transform, shape: tuple[int, ...], affine: np.ndarray, work_dir: str | os.PathLike,
    *, n_threads: int = 1,
) -> np.ndarray:
    """Source-space world coordinates (RAS mm) of every voxel of a target grid.

    Parameters
    ----------
    transform : pipeline.registration.Transform
        Source (e.g. T1w) -> target (e.g. MNI) transform.
    shape, affine
        The target grid.
    work_dir : path
        Where ANTs writes the composed field (removed afterwards).

    Returns
    -------
    ndarray (*shape, 3)
    """
    from pipeline.registration import displacement_field

    reference = nb.Nifti1Image(np.zeros(shape[:3], np.float32), affine)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    disp = displacement_field(transform, reference, work, n_threads=n_threads)
    for leftover in work.glob("composed_*"):
        leftover.unlink()
    # target point p (LPS) maps to source p + u(p); back to RAS by flipping x and y
    points_lps = grid_points(shape, affine) * np.array([-1.0, -1.0, 1.0])
    return (points_lps + disp.reshape(points_lps.shape)) * np.array([-1.0, -1.0, 1.0])


def coordinates_from_map(
    coordinate_map: nb.Nifti1Image, shape: tuple[int, ...], affine: np.ndarray
) -> np.ndarray:
    """Interpolate a ``mode-image`` coordinate map (linear) onto a target grid.

    ``coordinate_map`` is a ``(x, y, z, 3)`` image on a (coarse) grid of the target space
    whose voxels hold source-space world coordinates (RAS mm).  Points past its last grid
    points take the nearest edge value (such maps only cover the head).
    """
    cmap = np.asarray(coordinate_map.get_fdata(), dtype=np.float64)
    if cmap.ndim == 5 and cmap.shape[3] == 1:
        cmap = cmap[:, :, :, 0, :]
    if cmap.ndim != 4 or cmap.shape[3] != 3:
        raise ValueError(
            f"{coordinate_map.get_filename() or 'coordinate map'}: expected (x, y, z, 3) "
            f"coordinates, got shape {cmap.shape}"
        )
    inv = np.linalg.inv(coordinate_map.affine)
    pts = grid_points(shape, affine).reshape(-1, 3)
    ijk = (pts @ inv[:3, :3].T + inv[:3, 3]).T
    out = np.stack(
        [ndimage.map_coordinates(cmap[..., c], ijk, order=1, mode="nearest") for c in range(3)],
        axis=-1,
    )
    return out.reshape(*shape[:3], 3)


def ras_point_map(matrix_lps: np.ndarray) -> np.ndarray:
    """An ITK (LPS) 4x4 point map expressed in RAS world coordinates."""
    return _LPS @ np.asarray(matrix_lps, dtype=float) @ _LPS


def sample_at(volume: np.ndarray, affine: np.ndarray, points: np.ndarray, *, order: int = 1,
              prefiltered: bool = False) -> np.ndarray:
    """Values of ``volume`` at world ``points`` (``(..., 3)``, RAS mm); 0 outside the grid."""
    inv = np.linalg.inv(affine)
    flat = points.reshape(-1, 3)
    ijk = (flat @ inv[:3, :3].T + inv[:3, 3]).T
    vals = ndimage.map_coordinates(volume, ijk, order=order, mode="constant", cval=0.0,
                                   prefilter=not prefiltered and order > 1)
    return vals.reshape(points.shape[:-1])


def _nifti_memmap(path: Path, shape: tuple[int, ...], affine: np.ndarray, tr: float | None
                  ) -> np.memmap:
    """An uncompressed float32 NIfTI file on disk, opened as a writable Fortran memmap."""
    header = nb.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_sform(affine, code=4)  # 4 = MNI152
    header.set_qform(affine, code=4)
    header.set_xyzt_units("mm", "sec")
    if tr is not None and len(shape) == 4:
        header.set_zooms((*np.linalg.norm(affine[:3, :3], axis=0), float(tr)))
    header.set_data_offset(352)
    with open(path, "wb") as handle:
        header.write_to(handle)
        handle.write(b"\0" * (352 - handle.tell()))
        handle.truncate(352 + int(np.prod(shape)) * 4)
    return np.memmap(path, dtype=np.float32, mode="r+", offset=352, shape=shape, order="F")


def with_margin(mask: np.ndarray, voxels: int = 2) -> np.ndarray:
    """``mask`` dilated by ``voxels`` (face-connected steps): where to interpolate."""
    return ndimage.binary_dilation(np.asarray(mask, bool), iterations=voxels)


def resample_bold(
    bold: nb.Nifti1Image,
    out_file: str | os.PathLike,
    coords: np.ndarray,
    out_affine: np.ndarray,
    *,
    motion: np.ndarray | None = None,
    t1w_to_bold: np.ndarray | None = None,
    order: int = 3,
    where: np.ndarray | None = None,
    block: int = 16,
) -> Path:
    """Resample a BOLD run onto a template grid with one interpolation per volume.

    Parameters
    ----------
    bold : nibabel image (X, Y, Z, T)
        The raw run (not motion corrected).
    out_file : path
        Uncompressed ``.nii`` written volume by volume (float32).
    coords : ndarray (*out_shape, 3)
        T1w world coordinates of every output voxel (:func:`coordinates_from_transform`).
    out_affine : ndarray (4, 4)
        Affine of the output grid.
    motion : ndarray (T, 6), optional
        Head-motion parameters of :func:`pipeline.motion.realign` (volume -> reference);
        ``None`` for an already realigned run.
    t1w_to_bold : ndarray (4, 4), optional
        RAS point map from T1w world to BOLD-reference world (:func:`ras_point_map` of the
        coregistration); identity when ``None``.
    order : int
        Spline order (3: cubic B-spline, as ``antsApplyTransforms --interpolation BSpline``).
    where : ndarray (*out_shape), bool, optional
        Interpolate only these output voxels (e.g. a dilated brain mask); the rest are 0.
        Every voxel when ``None``.
    block : int
        Volumes read from ``bold`` at a time.

    Returns
    -------
    Path of the written file.
    """
    arr = bold.dataobj
    if len(bold.shape) != 4:
        raise ValueError(f"{bold.get_filename()}: BOLD must be 4-D, got shape {bold.shape}")
    n_t = bold.shape[3]
    if motion is not None and np.shape(motion) != (n_t, 6):
        raise ValueError(f"motion must be ({n_t}, 6), got {np.shape(motion)}")
    out_shape = coords.shape[:3]
    C = np.eye(4) if t1w_to_bold is None else np.asarray(t1w_to_bold, dtype=float)
    inv_bold = np.linalg.inv(bold.affine)
    inside = np.ones(out_shape, bool) if where is None else np.asarray(where, bool)
    if inside.shape != out_shape:
        raise ValueError(f"where has shape {inside.shape}, the output grid {out_shape}")
    points = np.ascontiguousarray(coords[inside].T)  # (3, N), as map_coordinates wants
    tr = float(bold.header.get_zooms()[3]) if len(bold.header.get_zooms()) > 3 else None
    out = _nifti_memmap(Path(out_file), (*out_shape, n_t), out_affine, tr)
    volume = np.zeros(out_shape, np.float32)
    for start in range(0, n_t, block):
        # Blocks, not single volumes: each slice of a gzipped file decompresses from the
        # start, so volume-by-volume reading costs O(T^2).
        chunk = np.asarray(arr[..., start:start + block], dtype=np.float64)
        for offset in range(chunk.shape[3]):
            t = start + offset
            move = np.eye(4) if motion is None else np.linalg.inv(rigid_matrix(motion[t]))
            mat = inv_bold @ move @ C
            ijk = mat[:3, :3] @ points + mat[:3, 3:4]
            volume[inside] = ndimage.map_coordinates(
                np.ascontiguousarray(chunk[..., offset]), ijk, order=order, mode="constant",
                cval=0.0)
            out[..., t] = volume
    out.flush()
    del out
    return Path(out_file)


def resample_image(
    image: nb.Nifti1Image, coords: np.ndarray, out_affine: np.ndarray, *, order: int = 1
) -> nb.Nifti1Image:
    """Resample a 3-D image (e.g. a T1w tissue map) at ``coords`` (``order=0`` for labels)."""
    data = np.asarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    labels = np.issubdtype(data.dtype, np.integer) and order == 0
    vals = sample_at(data if labels else data.astype(np.float64), image.affine, coords,
                     order=order)
    out = vals.astype(data.dtype if labels else np.float32)
    img = nb.Nifti1Image(out, out_affine)
    img.header.set_xyzt_units("mm")
    return img


def resample_labels(atlas: nb.Nifti1Image, shape: tuple[int, ...], affine: np.ndarray
                    ) -> nb.Nifti1Image:
    """A label image (same space) on another grid, nearest neighbour."""
    return resample_image(atlas, grid_points(shape, affine), affine, order=0)
