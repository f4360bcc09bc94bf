"""Diffusion-weighted images from planted fibre bundles (multi-tensor signal)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from dipy.core.sphere import HemiSphere, disperse_charges

from pipeline.simulate.anat import map_grid, rician
from pipeline.simulate.bundles import bundle_field
from pipeline.simulate.func import BOLD_FOV_MM, draw_motion, move_volume, noise_region
from pipeline.simulate.mni import MniModel
from pipeline.simulate.space import Grid, SessionSpace, scanner_grid

S0 = {"csf": 400.0, "gm": 300.0, "wm": 240.0, "scalp": 0.0}  # fat-suppressed scalp
D_FREE, D_TISSUE = 3.0e-3, 0.8e-3  # mm2/s: free water, isotropic tissue
LAMBDA_PAR, LAMBDA_PERP = 1.7e-3, 0.3e-3  # bundle tensor (FA ~ 0.8)
FIBRE_FRACTION = 0.8  # share of tissue signal from bundles at a tube's core
NOISE_SIGMA = 8.0
QUANTUM = 12.0  # stored step (uint8 with scl_slope), 1.5 noise std


def dwi_grid(res: float) -> Grid:
    """The session's DWI grid (same coverage as BOLD, LAS)."""
    return scanner_grid(res, BOLD_FOV_MM)


def gradient_scheme(
    rng: np.random.Generator, n_dirs: int, n_b0: int, bval: int
) -> tuple[np.ndarray, np.ndarray]:
    """``bvals (N,)`` and unit ``bvecs (N, 3)``: ``n_dirs`` electrostatically spread
    directions (``disperse_charges``) with the b0s spread evenly through the run."""
    start = rng.normal(size=(n_dirs, 3))
    hemi, _ = disperse_charges(HemiSphere(xyz=start / np.linalg.norm(start, axis=1)[:, None]),
                               2000, const=0.05)
    dirs = hemi.vertices
    n = n_dirs + n_b0
    b0_at = set(np.round(np.linspace(0, n, n_b0, endpoint=False)).astype(int).tolist())
    bvals, bvecs, k = np.zeros(n, int), np.zeros((n, 3)), 0
    for i in range(n):
        if i not in b0_at:
            bvals[i], bvecs[i] = bval, dirs[k]
            k += 1
    return bvals, bvecs


def simulate_dwi(
    rng: np.random.Generator, model: MniModel, space: SessionSpace, grid: Grid,
    bundles: pd.DataFrame, counts: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray,
) -> tuple[Iterator[np.ndarray], np.ndarray]:
    """DWI volumes (iterator) and the fibre-weight map ``(X, Y, Z)`` (sum over bundles).

    ``bvecs`` are in the voxel frame (FSL convention for an LAS image). Fibre directions are
    mapped from MNI by the linear part of MNI -> scanner, then into voxel axes.
    """
    y = map_grid(space, grid)
    gm, wm, csf, brain, head = (model.sample(n, y) for n in ("gm", "wm", "csf", "brain", "head"))
    scalp = np.clip(head - brain, 0, 1)
    inside = np.flatnonzero(brain > 0.01)
    weights, tangents = bundle_field(bundles, counts, y[inside])
    to_vox = np.linalg.inv(grid.affine[:3, :3]) @ space.linear_mni_to_scanner()
    dirs = tangents @ to_vox.T
    dirs /= np.maximum(np.linalg.norm(dirs, axis=2, keepdims=True), 1e-12)
    total = weights.sum(1)
    fib = FIBRE_FRACTION * np.minimum(1.0, total)
    shares = np.where(total[:, None] > 0, weights / np.maximum(total, 1e-12)[:, None], 0)
    tissue = S0["gm"] * gm[inside] + S0["wm"] * wm[inside]
    fibre_map = np.zeros(len(y), np.float32)
    fibre_map[inside] = total
    n_vol = len(bvals)
    motion, _ = draw_motion(rng, n_vol, 0, 0, drift=0.5)
    noise_mask = noise_region(brain.reshape(grid.shape))

    def volumes() -> Iterator[np.ndarray]:
        for n in range(n_vol):
            b, g = float(bvals[n]), bvecs[n]
            e_iso = np.exp(-b * D_TISSUE)
            signal = S0["csf"] * csf * np.exp(-b * D_FREE) + S0["scalp"] * scalp * e_iso
            cos2 = (dirs @ g) ** 2
            e_fib = (shares * np.exp(-b * (LAMBDA_PERP + (LAMBDA_PAR - LAMBDA_PERP) * cos2))).sum(1)
            signal[inside] += tissue * ((1 - fib) * e_iso + fib * e_fib)
            vol = move_volume(signal.reshape(grid.shape), grid, motion[n])
            yield np.where(noise_mask, rician(rng, vol, NOISE_SIGMA), 0.0).astype(np.float32)

    return volumes(), fibre_map.reshape(grid.shape)


def fsl_bvecs(bvecs: np.ndarray) -> np.ndarray:
    """``(3, N)`` rows for the ``.bvec`` file (voxel-frame components; LAS image)."""
    return bvecs.T
