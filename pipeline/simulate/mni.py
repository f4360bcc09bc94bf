"""The head model in MNI space: template tissues, a synthetic skull/scalp shell and the atlas."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy import ndimage

from pipeline.atlas import build_default_atlas
from pipeline.simulate.space import Grid
from pipeline.templates import load_template

PAD_MM = 24.0
#: Shell layers outside the brain: (outer distance mm, T1 intensity relative to WM ~ 0.86).
SHELL_LAYERS = ((2.0, 0.12), (4.5, 0.05), (6.5, 0.55), (8.5, 0.05), (10.0, 0.35), (14.0, 0.8))
HEAD_DEPTH_MM = 14.0


@dataclass(frozen=True)
class MniModel:
    """Volumes on a padded MNI grid sampled by every simulated image.

    ``t1`` is the template T1 inside the brain and the shell outside; ``head`` marks brain
    plus shell; ``labels`` is the atlas (``table`` rows) on the same grid.
    """

    grid: Grid
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    head: np.ndarray
    labels: np.ndarray
    table: pd.DataFrame
    atlas_grid: Grid
    atlas_labels: np.ndarray

    def sample(self, name: str, points: np.ndarray, order: int = 1) -> np.ndarray:
        """Sample volume ``name`` at MNI ``points`` ``(N, 3)`` (0 outside the grid)."""
        return sample_volume(getattr(self, name), self.grid, points, order)


def sample_volume(volume: np.ndarray, grid: Grid, points: np.ndarray, order: int) -> np.ndarray:
    """Sample ``volume`` on ``grid`` (axis-aligned) at world ``points`` ``(N, 3)``."""
    ijk = (points - grid.affine[:3, 3]) / np.diag(grid.affine)[:3]
    out = np.empty(len(points), dtype=volume.dtype if order == 0 else np.float32)
    ndimage.map_coordinates(volume, ijk.T, output=out, order=order, mode="constant", cval=0)
    return out


def _pad(data: np.ndarray, n: int) -> np.ndarray:
    return np.pad(data, n, mode="constant")


@lru_cache(maxsize=2)
def load_mni_model(resolution: int = 2) -> MniModel:
    """Build the head model at template ``resolution`` (1 or 2 mm); the atlas is always 2 mm."""
    tpl = load_template(resolution)
    n = int(PAD_MM / resolution)
    affine = tpl.t1w.affine.copy()
    affine[:3, 3] -= n * resolution
    grid = Grid(tuple(s + 2 * n for s in tpl.t1w.shape), affine)
    brain = _pad(np.asarray(tpl.brain_mask.dataobj) > 0, n)
    gm, wm, csf = (_pad(np.asarray(i.dataobj, np.float32), n) for i in (tpl.gm, tpl.wm, tpl.csf))
    t1 = _pad(np.asarray(tpl.t1w.dataobj, np.float32), n)
    dist = ndimage.distance_transform_edt(~brain, sampling=resolution)
    shell = np.zeros_like(t1)
    inner = 0.0
    for outer, value in SHELL_LAYERS:
        shell[(dist > inner) & (dist <= outer)] = value
        inner = outer
    shell = ndimage.gaussian_filter(shell, 0.7 / resolution)
    t1 = np.where(brain, t1, shell).astype(np.float32)
    head = (brain | (dist <= HEAD_DEPTH_MM)).astype(np.float32)

    atlas = build_default_atlas(2)
    na = int(PAD_MM / 2)
    a_aff = atlas.image.affine.copy()
    a_aff[:3, 3] -= na * 2
    atlas_grid = Grid(tuple(s + 2 * na for s in atlas.image.shape), a_aff)
    atlas_labels = _pad(np.asarray(atlas.image.dataobj, np.int16), na)
    if resolution == 2:
        labels = atlas_labels
    else:
        labels = sample_volume(atlas_labels, atlas_grid, grid.all_points(), 0).reshape(grid.shape)
    return MniModel(
        grid=grid, t1=t1, gm=gm, wm=wm, csf=csf, brain=brain.astype(np.float32), head=head,
        labels=labels, table=atlas.table, atlas_grid=atlas_grid, atlas_labels=atlas_labels,
    )
