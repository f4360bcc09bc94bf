"""T1w images, native parcellations and planted regional volumes."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from pipeline.simulate.mni import MniModel, sample_volume
from pipeline.simulate.space import Grid, SessionSpace, SubjectWarp, scanner_grid

T1_FOV_MM = (200.0, 240.0, 200.0)
T1_SCALE = 350.0  # white matter (template ~0.86) lands near 300
T1_NOISE = 6.0
CHUNK = 1_000_000


def t1w_grid(res: float) -> Grid:
    """The session's T1w grid (whole head, LAS)."""
    return scanner_grid(res, T1_FOV_MM)


def map_grid(space: SessionSpace, grid: Grid) -> np.ndarray:
    """MNI coordinates of every voxel of ``grid`` (C order), computed in chunks."""
    pts = grid.all_points()
    return np.concatenate(
        [space.scanner_to_mni(pts[i:i + CHUNK]) for i in range(0, len(pts), CHUNK)]
    )


def bias_field(rng: np.random.Generator, grid: Grid, strength: float = 0.08) -> np.ndarray:
    """Smooth multiplicative field: exp of a random quadratic in scanner coordinates."""
    x = grid.all_points() / 100.0
    terms = [x[:, 0], x[:, 1], x[:, 2], x[:, 0] ** 2, x[:, 1] ** 2, x[:, 2] ** 2,
             x[:, 0] * x[:, 1], x[:, 0] * x[:, 2], x[:, 1] * x[:, 2]]
    coef = rng.normal(0, strength, len(terms))
    return np.exp(sum(c * t for c, t in zip(coef, terms, strict=True))).reshape(grid.shape)


def rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of ``signal`` plus complex Gaussian noise of std ``sigma``."""
    real = signal + rng.normal(0, sigma, signal.shape)
    imag = rng.normal(0, sigma, signal.shape)
    return np.sqrt(real**2 + imag**2)


def simulate_t1w(
    rng: np.random.Generator, model: MniModel, space: SessionSpace, grid: Grid
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1w intensities, true atlas labels and true brain mask on ``grid``.

    The T1w has the skull/scalp shell, a bias field and Rician noise; labels are the atlas
    pulled back by nearest neighbour, the mask is the template brain mask (linear, > 0.5).
    """
    y = map_grid(space, grid)
    t1 = model.sample("t1", y).reshape(grid.shape)
    labels = sample_volume(model.atlas_labels, model.atlas_grid, y, 0).reshape(grid.shape)
    brain = (model.sample("brain", y) > 0.5).reshape(grid.shape).astype(np.uint8)
    image = rician(rng, T1_SCALE * t1 * bias_field(rng, grid), T1_NOISE)
    # zero air outside the head: the background noise would dominate the file size
    head = ndimage.binary_dilation(model.sample("head", y).reshape(grid.shape) > 0.05,
                                   iterations=1)
    image = np.where(head, image, 0.0)
    return image.astype(np.float32), labels, brain


def planted_volumes(
    model: MniModel, warp: SubjectWarp, hipp_scale: float
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Parcel volumes (mm3) in the subject's space, integrating the warp's Jacobian.

    Each 2 mm MNI atlas voxel contributes ``8 mm3 * det J(y)``; totals cover left/right
    hippocampus and amygdala and the intracranial (template brain mask) volume.
    """
    lab = model.atlas_labels
    ijk = np.argwhere(lab > 0)
    y = model.atlas_grid.world(ijk.astype(float))
    vox = abs(np.linalg.det(model.atlas_grid.affine[:3, :3]))
    det = warp.jacobian_det(y, hipp_scale)
    table = model.table
    n_lab = int(table["index"].max()) + 1
    sums = np.bincount(lab[tuple(ijk.T)], weights=det * vox, minlength=n_lab)
    volumes = pd.DataFrame({"index": table["index"], "name": table["name"],
                            "volume_mm3": sums[table["index"].to_numpy()]})
    totals: dict[str, float] = {}
    for hemi, side in (("L", "left"), ("R", "right")):
        for anat in ("hippocampus", "amygdala"):
            rows = (table["anatomy"] == anat) & (table["hemisphere"] == hemi)
            totals[f"{side}_{anat}"] = float(volumes.loc[rows.to_numpy(), "volume_mm3"].sum())
    bijk = np.argwhere(model.brain > 0)
    by = model.grid.world(bijk.astype(float))
    bvox = abs(np.linalg.det(model.grid.affine[:3, :3]))
    totals["total_intracranial"] = float((warp.jacobian_det(by, hipp_scale) * bvox).sum())
    return volumes, totals
