"""BOLD head-motion correction: rigid per-volume realignment to a reference volume.

Convention (same as :func:`pipeline.simulate.space.rigid_matrix`)
-----------------------------------------------------------------
Parameters are ``(trans_x, trans_y, trans_z, rot_x, rot_y, rot_z)`` in mm and radians,
fMRIPrep's column order and units.  They define the world-space (scanner mm, the image
affine) matrix ``M = [R | t]`` with ``R = Rz @ Ry @ Rx`` (rotations about the world
origin, right-handed: a positive ``rot_z`` turns +x towards +y), and volume ``t`` shows the
reference at ``M x``::

    volume_t(x) = reference(M_t x)            for every world point x

so a positive ``trans_x`` means the head appears shifted towards -x in the volume (by
``trans_x`` mm) relative to the reference.  ``M`` maps the volume's world coordinates to
the reference's, the direction of FSL/MCFLIRT and of the head-motion transforms fMRIPrep
stores (which rotate about the volume centre instead of the world origin: translations
differ by ``(I - R) c``, rotations are the same).  The realigned volume is
``volume_t(M_t^-1 y)``.

Method
------
Gauss-Newton least squares on the intensity difference, with a global intensity scale and
offset per volume (so non-steady-state or spike volumes that are uniformly brighter do not
bias the fit).  The reference is interpolated with cubic B-splines at the moved positions
of a subsample of brain voxels (every ``stride``-th voxel), coarse-to-fine: first on images
smoothed by a Gaussian of ``2`` voxels with stride 3, then unsmoothed with stride 2.  Each
volume starts from the previous volume's estimate (motion is temporally smooth).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MOTION_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")

#: (Gaussian sigma in voxels, sampling stride, max Gauss-Newton iterations) per level.
DEFAULT_LEVELS = ((2.0, 3, 10), (0.0, 2, 10))


def _rotations(rx: float, ry: float, rz: float) -> tuple[np.ndarray, ...]:
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    dRx = np.array([[0, 0, 0], [0, -sx, -cx], [0, cx, -sx]])
    dRy = np.array([[-sy, 0, cy], [0, 0, 0], [-cy, 0, -sy]])
    dRz = np.array([[-sz, -cz, 0], [cz, -sz, 0], [0, 0, 0]])
    return Rx, Ry, Rz, dRx, dRy, dRz


def rigid_matrix(params: np.ndarray) -> np.ndarray:
    """4x4 world matrix of ``(trans_x, trans_y, trans_z, rot_x, rot_y, rot_z)``.

    ``R = Rz @ Ry @ Rx`` about the world origin, then the translation.
    """
    tx, ty, tz, rx, ry, rz = np.asarray(params, dtype=float)
    Rx, Ry, Rz, *_ = _rotations(rx, ry, rz)
    out = np.eye(4)
    out[:3, :3] = Rz @ Ry @ Rx
    out[:3, 3] = [tx, ty, tz]
    return out


def params_from_matrix(matrix: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rigid_matrix` (rotations in (-pi/2, pi/2) about y)."""
    R = np.asarray(matrix, dtype=float)[:3, :3]
    ry = np.arcsin(-np.clip(R[2, 0], -1, 1))
    rx = np.arctan2(R[2, 1], R[2, 2])
    rz = np.arctan2(R[1, 0], R[0, 0])
    return np.concatenate([np.asarray(matrix, dtype=float)[:3, 3], [rx, ry, rz]])


def move_volume(volume: np.ndarray, affine: np.ndarray, params: np.ndarray, order: int = 3,
                *, inverse: bool = False) -> np.ndarray:
    """Resample ``volume`` so voxel ``v`` shows it at world ``M x`` (``M^-1 x`` if inverse).

    ``move_volume(ref, A, p)`` simulates a volume moved by ``p``;
    ``move_volume(vol, A, p, inverse=True)`` realigns it to the reference.
    """
    M = rigid_matrix(params)
    if inverse:
        M = np.linalg.inv(M)
    mat = np.linalg.inv(affine) @ M @ affine
    return ndimage.affine_transform(
        np.asarray(volume, dtype=np.float64), mat, order=order, mode="constant", cval=0.0
    )


@dataclass
class Realignment:
    """Result of :func:`realign`.

    Attributes
    ----------
    params : ndarray (T, 6)
        ``trans_x .. rot_z`` (mm, rad) of every volume, see the module convention.
    realigned : ndarray (X, Y, Z, T) float32 or None
        Volumes resampled onto the reference (``None`` when not requested).
    reference : ndarray (X, Y, Z)
        The reference volume used in the last pass.
    iterations : ndarray (T,)
        Gauss-Newton iterations at the finest level (convergence diagnostics).
    """

    params: np.ndarray
    realigned: np.ndarray | None
    reference: np.ndarray
    iterations: np.ndarray


class _Level:
    """Precomputed reference data at one resolution level."""

    def __init__(self, ref: np.ndarray, affine: np.ndarray, sample: np.ndarray, sigma: float,
                 stride: int, max_iter: int) -> None:
        self.sigma, self.max_iter = sigma, max_iter
        smooth = ndimage.gaussian_filter(ref, sigma) if sigma > 0 else ref
        self.coef = ndimage.spline_filter(smooth, order=3)
        lin = affine[:3, :3]
        inv_lin_t = np.linalg.inv(lin).T
        grads = np.stack(np.gradient(smooth), axis=0)  # voxel units
        # World-space gradient images: g_w = A^-T g_v.
        self.grads = np.einsum("ij,j...->i...", inv_lin_t, grads)
        keep = np.zeros(ref.shape, bool)
        keep[::stride, ::stride, ::stride] = True
        self.vox = np.argwhere(keep & sample)  # (N, 3) voxel indices
        self.world = self.vox @ lin.T + affine[:3, 3]
        self.inv_affine = np.linalg.inv(affine)

    def observed(self, volume: np.ndarray) -> np.ndarray:
        img = ndimage.gaussian_filter(volume, self.sigma) if self.sigma > 0 else volume
        i, j, k = self.vox.T
        return np.asarray(img[i, j, k], dtype=np.float64)

    def fit(self, observed: np.ndarray, start: np.ndarray, tol: float) -> tuple[np.ndarray, int]:
        """Gauss-Newton for rigid params + intensity scale/offset; returns (params, iters)."""
        p = np.asarray(start, dtype=float).copy()
        a, b = 1.0, 0.0
        x = self.world
        n_iter = 0
        for n_iter in range(1, self.max_iter + 1):  # noqa: B007 - iterations are reported
            Rx, Ry, Rz, dRx, dRy, dRz = _rotations(*p[3:])
            R = Rz @ Ry @ Rx
            y = x @ R.T + p[:3]
            coords = (y @ self.inv_affine[:3, :3].T + self.inv_affine[:3, 3]).T
            f = ndimage.map_coordinates(self.coef, coords, order=3, mode="nearest",
                                        prefilter=False)
            g = np.stack([ndimage.map_coordinates(gc, coords, order=1, mode="nearest")
                          for gc in self.grads], axis=1)
            resid = a * f + b - observed
            J = np.empty((x.shape[0], 8))
            J[:, :3] = a * g
            for c, dR in enumerate((Rz @ Ry @ dRx, Rz @ dRy @ Rx, dRz @ Ry @ Rx)):
                J[:, 3 + c] = a * np.einsum("ij,ij->i", g, x @ dR.T)
            J[:, 6] = f
            J[:, 7] = 1.0
            # Normal equations (much faster than lstsq on N x 8), columns scaled for conditioning.
            scale = np.sqrt(np.einsum("ij,ij->j", J, J))
            scale[scale == 0] = 1.0
            Js = J / scale
            step = np.linalg.lstsq(Js.T @ Js, -(Js.T @ resid), rcond=1e-12)[0] / scale
            p += step[:6]
            a += step[6]
            b += step[7]
            if np.abs(step[:3]).max() < tol and np.abs(step[3:6]).max() < tol * 1e-2:
                break
        return p, n_iter


def _default_sample(ref: np.ndarray) -> np.ndarray:
    # Bright voxels plus a 2-voxel rim (edges carry most of the alignment information).
    thr = 0.1 * np.percentile(ref, 99)
    return ndimage.binary_dilation(ref > thr, iterations=2)


def realign(
    data: np.ndarray,
    affine: np.ndarray,
    *,
    reference: int | np.ndarray = 0,
    mask: np.ndarray | None = None,
    passes: int = 1,
    levels: tuple[tuple[float, int, int], ...] = DEFAULT_LEVELS,
    tol: float = 1e-4,
    resample: bool = True,
    order: int = 1,
) -> Realignment:
    """Rigidly realign every volume of a BOLD run to a reference volume.

    Parameters
    ----------
    data : ndarray (X, Y, Z, T)
        The BOLD run (non-steady-state volumes may be included; they are fitted with their
        own intensity scale).
    affine : ndarray (4, 4)
        Voxel-to-world matrix of the run.
    reference : int or ndarray (X, Y, Z)
        Index of the reference volume, or a reference image on the same grid (e.g. the
        BOLD reference).
    mask : ndarray (X, Y, Z), optional
        Voxels sampled for the fit (default: bright voxels of the reference plus a rim).
    passes : int
        2 realigns again to the mean of the first-pass realigned volumes (SPM's two-pass),
        which lowers the noise of the reference; parameters stay in the reference's frame.
    levels : tuple of (sigma_vox, stride, max_iter)
        Coarse-to-fine schedule.
    tol : float
        Convergence threshold on the translation step in mm (rotation: ``tol / 100`` rad).
    resample : bool
        Also return the realigned volumes.
    order : int
        Spline order of that final resampling (1 = trilinear, fast; 3 = cubic).

    Returns
    -------
    Realignment
    """
    arr = np.asarray(data)
    if arr.ndim != 4:
        raise ValueError(f"BOLD data must be 4-D, got shape {arr.shape}")
    affine = np.asarray(affine, dtype=float)
    n_t = arr.shape[3]
    if isinstance(reference, np.ndarray):
        ref = np.asarray(reference, dtype=np.float64)
        if ref.shape != arr.shape[:3]:
            raise ValueError(f"reference shape {ref.shape} differs from the grid {arr.shape[:3]}")
    else:
        if not 0 <= int(reference) < n_t:
            raise ValueError(f"reference volume {reference} out of range for {n_t} volumes")
        ref = np.asarray(arr[..., int(reference)], dtype=np.float64)
    sample = _default_sample(ref) if mask is None else np.asarray(mask) > 0
    # Keep samples away from the border so moved positions stay inside the grid.
    inner = np.zeros(ref.shape, bool)
    inner[2:-2, 2:-2, 2:-2] = True
    sample &= inner

    params = np.zeros((n_t, 6))
    iters = np.zeros(n_t, int)
    for pass_ in range(max(1, passes)):
        lvls = [_Level(ref, affine, sample, s, st, it) for s, st, it in levels]
        p = np.zeros(6)
        for t in range(n_t):
            vol = np.asarray(arr[..., t], dtype=np.float64)
            for lvl in lvls:
                p, iters[t] = lvl.fit(lvl.observed(vol), p, tol)
            params[t] = p
        if pass_ + 1 < passes:
            ref = np.mean(
                [move_volume(arr[..., t], affine, params[t], order=1, inverse=True)
                 for t in range(n_t)], axis=0)
    realigned = None
    if resample:
        realigned = np.empty(arr.shape, np.float32)
        for t in range(n_t):
            realigned[..., t] = move_volume(arr[..., t], affine, params[t], order=order,
                                            inverse=True)
    return Realignment(params=params, realigned=realigned, reference=ref, iterations=iters)
