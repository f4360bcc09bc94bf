"""Native spaces: scanner grids, rigid head positions and the subject's MNI warp.

Chain of coordinates (all in mm)::

    scanner (image world) --H--> subject --B^-1, (id+e)^-1, (id+h)^-1--> MNI

* ``H`` is the session's rigid head position (scanner -> subject).
* The subject's anatomy is ``psi(y) = B(g(y) + e(g(y)))`` with ``g = id + h``: ``B`` an affine
  (rotation, translation, global scale), ``e`` a smooth random displacement (a few mm) and
  ``h`` a local radial expansion around the hippocampi (zero unless an effect is planted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Head centre in MNI coordinates; maps near the scanner origin.
HEAD_CENTRE = np.array([0.0, -16.0, 4.0])
#: Bounding box of the padded MNI domain the warp is defined on.
MNI_BOX = (np.array([-122.0, -158.0, -96.0]), np.array([122.0, 122.0, 140.0]))
FIELD_SPACING = 4.0
HIPP_SIGMA = 5.0


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` and voxel-to-world ``affine``."""

    shape: tuple[int, ...]
    affine: np.ndarray

    def world(self, ijk: np.ndarray) -> np.ndarray:
        """World coordinates of voxel indices ``(N, 3)``."""
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def all_points(self) -> np.ndarray:
        """World coordinates of every voxel centre, C order, ``(N, 3)``."""
        ijk = np.indices(self.shape[:3], dtype=np.float64).reshape(3, -1).T
        return self.world(ijk)


def scanner_grid(res: float, fov_mm: tuple[float, float, float]) -> Grid:
    """An LAS grid (negative x step, like most scanner exports) centred on the scanner origin.

    LAS storage makes FSL-convention b-vectors equal to voxel-axis components, so every
    DWI tool reads them the same way.
    """
    shape = tuple(int(np.ceil(f / res)) for f in fov_mm)
    affine = np.diag([-res, res, res, 1.0])
    affine[:3, 3] = [res * (shape[0] - 1) / 2, -res * (shape[1] - 1) / 2, -res * (shape[2] - 1) / 2]
    return Grid(shape, affine)


def rigid_matrix(params: np.ndarray) -> np.ndarray:
    """4x4 matrix of ``(trans_x, trans_y, trans_z [mm], rot_x, rot_y, rot_z [rad])``.

    ``R = Rz @ Ry @ Rx``, applied about the world origin, then translated.
    """
    tx, ty, tz, rx, ry, rz = params
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rot_z @ rot_y @ rot_x
    out[:3, 3] = [tx, ty, tz]
    return out


def random_rigid(rng: np.random.Generator, max_rot_deg: float, max_trans_mm: float) -> np.ndarray:
    """Rigid parameters: rotations uniform in +-``max_rot_deg``, translation norm <= max."""
    rot = np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg, 3))
    direction = rng.normal(size=3)
    trans = direction / np.linalg.norm(direction) * rng.uniform(0, max_trans_mm)
    return np.concatenate([trans, rot])


def _field_grid() -> Grid:
    lo, hi = MNI_BOX
    shape = tuple(int(n) for n in np.round((hi - lo) / FIELD_SPACING) + 1)
    affine = np.diag([FIELD_SPACING] * 3 + [1.0])
    affine[:3, 3] = lo
    return Grid(shape, affine)


def _interp(field: np.ndarray, grid: Grid, points: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of a ``(C, X, Y, Z)`` field at world ``points`` -> ``(N, C)``."""
    ijk = (points - grid.affine[:3, 3]) / np.diag(grid.affine)[:3]
    return np.stack(
        [ndimage.map_coordinates(c, ijk.T, order=1, mode="nearest") for c in field], axis=1
    )


@dataclass
class SubjectWarp:
    """The subject-specific MNI -> subject transform (without head position).

    Attributes
    ----------
    affine : ndarray (4, 4)
        ``B``: MNI -> subject (rotation, translation, global scale).
    field : ndarray (3, X, Y, Z)
        Forward smooth displacement ``e`` (mm) on the 4 mm MNI field grid.
    inverse : ndarray (3, X, Y, Z)
        ``e_inv`` with ``(id + e)^-1(u) = u + e_inv(u)``.
    hipp_centres : ndarray (K, 3)
        MNI centres of the hippocampal expansion.
    """

    affine: np.ndarray
    field: np.ndarray
    inverse: np.ndarray
    hipp_centres: np.ndarray
    _grads: np.ndarray | None = None

    @property
    def grid(self) -> Grid:
        """The 4 mm grid ``field`` and ``inverse`` live on."""
        return _field_grid()

    # -- hippocampal expansion h(y) = s (y - c) exp(-|y - c|^2 / 2 sigma^2), summed over c
    def _hipp(self, y: np.ndarray, scale: float) -> np.ndarray:
        out = np.zeros_like(y)
        if scale == 0:
            return out
        for c in self.hipp_centres:
            d = y - c
            out += scale * d * np.exp(-(d**2).sum(1) / (2 * HIPP_SIGMA**2))[:, None]
        return out

    def _hipp_jac_det(self, y: np.ndarray, scale: float) -> np.ndarray:
        jac = np.broadcast_to(np.eye(3), (len(y), 3, 3)).copy()
        if scale != 0:
            for c in self.hipp_centres:
                d = y - c
                gauss = np.exp(-(d**2).sum(1) / (2 * HIPP_SIGMA**2))
                outer = d[:, :, None] * d[:, None, :] / HIPP_SIGMA**2
                jac += scale * gauss[:, None, None] * (np.eye(3) - outer)
        return np.linalg.det(jac)

    def mni_to_subject(self, y: np.ndarray, hipp_scale: float = 0.0) -> np.ndarray:
        """``psi(y)``: MNI points ``(N, 3)`` -> subject space."""
        g = y + self._hipp(y, hipp_scale)
        u = g + _interp(self.field, self.grid, g)
        return u @ self.affine[:3, :3].T + self.affine[:3, 3]

    def subject_to_mni(self, x: np.ndarray, hipp_scale: float = 0.0) -> np.ndarray:
        """``psi^-1(x)``: subject points ``(N, 3)`` -> MNI."""
        inv_b = np.linalg.inv(self.affine)
        u = x @ inv_b[:3, :3].T + inv_b[:3, 3]
        z = u + _interp(self.inverse, self.grid, u)
        if hipp_scale == 0:
            return z
        # (id + h)^-1 by fixed point; only points near a hippocampus move
        near = np.zeros(len(z), bool)
        for c in self.hipp_centres:
            near |= ((z - c) ** 2).sum(1) < (5 * HIPP_SIGMA) ** 2
        y = z[near].copy()
        for _ in range(30):
            y = z[near] - self._hipp(y, hipp_scale)
        out = z.copy()
        out[near] = y
        return out

    def jacobian_det(self, y: np.ndarray, hipp_scale: float = 0.0) -> np.ndarray:
        """``det d psi / dy`` at MNI points ``(N, 3)`` (volume change MNI -> subject)."""
        g = y + self._hipp(y, hipp_scale)
        if self._grads is None:  # d e_i / d y_j on the field grid, flattened row-major
            grads = [np.gradient(c, FIELD_SPACING) for c in self.field]
            self._grads = np.stack([g_ij for g_i in grads for g_ij in g_i])
        jac_e = _interp(self._grads, self.grid, g).reshape(-1, 3, 3) + np.eye(3)
        return (
            np.linalg.det(self.affine[:3, :3])
            * np.linalg.det(jac_e)
            * self._hipp_jac_det(y, hipp_scale)
        )


def random_subject_warp(
    rng: np.random.Generator, hipp_centres: np.ndarray, *, disp_mm: float = 1.5
) -> SubjectWarp:
    """Draw ``B`` (+-4 deg, +-5 mm, scale 0.94-1.06) and a smooth field (std ``disp_mm``)."""
    grid = _field_grid()
    rigid = rigid_matrix(random_rigid(rng, 4.0, 5.0))
    scale = rng.uniform(0.94, 1.06)
    affine = rigid @ np.diag([scale, scale, scale, 1.0])
    affine[:3, 3] += affine[:3, :3] @ -HEAD_CENTRE
    noise = rng.normal(size=(3, *grid.shape))
    field = np.stack([ndimage.gaussian_filter(c, 20.0 / FIELD_SPACING) for c in noise])
    field *= disp_mm / field.std()
    # invert id + e by fixed point on the grid: y = u - e(y)
    u = grid.all_points()
    y = u.copy()
    for _ in range(25):
        y = u - _interp(field, grid, y)
    inverse = (y - u).T.reshape(3, *grid.shape)
    return SubjectWarp(affine, field.astype(np.float64), inverse, np.asarray(hipp_centres, float))


@dataclass
class SessionSpace:
    """A session's native (scanner) space: subject warp + rigid head position ``H``."""

    warp: SubjectWarp
    head: np.ndarray
    hipp_scale: float

    def scanner_to_mni(self, x: np.ndarray) -> np.ndarray:
        """Scanner/world points ``(N, 3)`` -> MNI."""
        subj = x @ self.head[:3, :3].T + self.head[:3, 3]
        return self.warp.subject_to_mni(subj, self.hipp_scale)

    def mni_to_scanner(self, y: np.ndarray) -> np.ndarray:
        """MNI points ``(N, 3)`` -> scanner/world."""
        inv_h = np.linalg.inv(self.head)
        subj = self.warp.mni_to_subject(y, self.hipp_scale)
        return subj @ inv_h[:3, :3].T + inv_h[:3, 3]

    def linear_mni_to_scanner(self) -> np.ndarray:
        """3x3 linear part of MNI -> scanner (``H^-1 B``), to rotate fibre directions."""
        return np.linalg.inv(self.head)[:3, :3] @ self.warp.affine[:3, :3]
