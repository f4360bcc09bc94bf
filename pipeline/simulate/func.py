"""Resting-state BOLD: planted parcel signals on tissue baselines, with realistic nuisance."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from scipy import ndimage

from pipeline.simulate.anat import map_grid, rician
from pipeline.simulate.mni import MniModel, sample_volume
from pipeline.simulate.space import Grid, SessionSpace, rigid_matrix, scanner_grid

BOLD_FOV_MM = (170.0, 205.0, 170.0)
#: T2* baselines (CSF bright, GM mid, WM lower) and the scalp.
BASELINE = {"csf": 520.0, "gm": 420.0, "wm": 350.0, "scalp": 0.0}  # fat-suppressed scalp
SIGNAL_PCT = 0.022  # std of the planted signal in pure grey matter (fraction of baseline)
NOISE_SIGMA = 6.0
#: Stored value step (uint8 with scl_slope): 1.5 noise std, still dithered by the noise
#: (adds ~19 % noise variance) and keeps the committed example small.
QUANTUM = 9.0
HEAD_RADIUS_MM = 50.0  # Power framewise displacement


def bold_grid(res: float) -> Grid:
    """The session's BOLD grid (brain coverage, LAS)."""
    return scanner_grid(res, BOLD_FOV_MM)


def draw_motion(
    rng: np.random.Generator, n_t: int, dummies: int, n_spikes: int, drift: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """Per-volume rigid parameters ``(n_t, 6)`` (mm, rad) and the spike indicator.

    Slow smooth wander of ~``drift`` mm / deg plus ``n_spikes`` single-volume jerks of
    1.5-3 mm and 1-2 deg.
    """
    walk = ndimage.gaussian_filter1d(rng.normal(0, 1, (n_t, 6)).cumsum(0), 3, axis=0)
    walk -= walk[dummies]
    walk *= drift / max(1e-9, np.abs(walk).max())
    params = walk * np.array([1, 1, 1, np.pi / 180, np.pi / 180, np.pi / 180])
    spikes = np.zeros(n_t, int)
    candidates = np.arange(dummies + 2, n_t - 1)
    for t in rng.choice(candidates, size=min(n_spikes, len(candidates)), replace=False):
        jerk = np.concatenate([rng.uniform(1.5, 3.0) * _unit(rng), np.deg2rad(rng.uniform(1, 2))
                               * _unit(rng)])
        params[t] += jerk
        spikes[t] = 1
    return params, spikes


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def framewise_displacement(params: np.ndarray) -> np.ndarray:
    """Power FD: sum of absolute parameter differences, rotations as arc on 50 mm."""
    diff = np.abs(np.diff(params, axis=0))
    fd = diff[:, :3].sum(1) + HEAD_RADIUS_MM * diff[:, 3:].sum(1)
    return np.concatenate([[0.0], fd])


def physio_series(rng: np.random.Generator, n_t: int) -> np.ndarray:
    """Broadband nuisance (aliased cardiac/respiratory + slow) with unit std."""
    x = rng.normal(size=n_t) + ndimage.gaussian_filter1d(rng.normal(size=n_t), 4) * 3
    return (x - x.mean()) / x.std()


def noise_region(brain: np.ndarray) -> np.ndarray:
    """Where noise is added: the brain (a zero background keeps the files small)."""
    return brain > 0.05


def move_volume(volume: np.ndarray, grid: Grid, params: np.ndarray) -> np.ndarray:
    """Resample ``volume`` (order 1) so voxel ``v`` shows the reference at ``M(world(v))``."""
    mat = np.linalg.inv(grid.affine) @ rigid_matrix(params) @ grid.affine
    return ndimage.affine_transform(volume, mat, order=1, mode="constant", cval=0.0)


def simulate_bold(
    rng: np.random.Generator, model: MniModel, space: SessionSpace, grid: Grid,
    latents: np.ndarray, table: pd.DataFrame, dummies: int,
) -> tuple[Iterator[np.ndarray], pd.DataFrame, np.ndarray]:
    """The BOLD run as an iterator of 3D volumes, its planted outliers and native labels.

    ``latents`` is ``(P, T)`` in ``table`` order. Returns ``(volumes, outliers, labels)``;
    ``outliers`` holds FD, spike, non-steady-state, the six motion parameters and the
    planted WM/CSF physiological signals (unit std).
    """
    n_t = latents.shape[1]
    y = map_grid(space, grid)
    labels = sample_volume(model.atlas_labels, model.atlas_grid, y, 0)
    gm, wm, csf, brain, head = (model.sample(n, y) for n in ("gm", "wm", "csf", "brain", "head"))
    scalp = np.clip(head - brain, 0, 1)
    base = (BASELINE["csf"] * csf + BASELINE["gm"] * gm + BASELINE["wm"] * wm
            + BASELINE["scalp"] * scalp)
    row_of = np.zeros(int(table["index"].max()) + 1, int)
    row_of[table["index"].to_numpy()] = np.arange(len(table))
    labelled = labels > 0
    amp = np.where(labelled, SIGNAL_PCT * gm, 0.0)
    rows = row_of[labels]
    wm_sig, csf_sig = physio_series(rng, n_t), physio_series(rng, n_t)
    a_wm = 0.01 * wm + 0.004 * gm  # WM/CSF nuisance leaks into grey matter
    a_csf = 0.02 * csf + 0.006 * gm
    smooth = ndimage.gaussian_filter(rng.normal(size=grid.shape), 2).ravel()
    drift_map = 0.01 * (1 + smooth / (np.abs(smooth).max() + 1e-12))
    t_norm = np.linspace(-1, 1, n_t)
    drift = t_norm + 0.5 * (t_norm**2 - 1 / 3)
    nss = np.where(np.arange(n_t) < dummies, 1 + 0.5 * 0.45 ** np.arange(n_t), 1.0)
    n_spikes = max(1, round(0.02 * (n_t - dummies)))
    motion, spikes = draw_motion(rng, n_t, dummies, n_spikes)
    noise_mask = noise_region(brain.reshape(grid.shape))
    spike_slices = rng.integers(0, grid.shape[2], n_t)

    def volumes() -> Iterator[np.ndarray]:
        for t in range(n_t):
            frac = amp * latents[rows, t] + a_wm * wm_sig[t] + a_csf * csf_sig[t]
            frac += drift_map * drift[t]
            ref = (base * (1 + frac) * nss[t]).reshape(grid.shape)
            vol = move_volume(ref, grid, motion[t])
            if spikes[t]:  # intensity artefact: global jump plus one bright slice
                vol *= 1.03
                vol[:, :, spike_slices[t]] *= 1.15
            noisy = np.where(noise_mask, rician(rng, vol, NOISE_SIGMA), 0.0)
            yield noisy.astype(np.float32)

    cols = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    outliers = pd.DataFrame(motion, columns=cols)
    outliers.insert(0, "framewise_displacement", framewise_displacement(motion))
    outliers.insert(1, "spike", spikes)
    outliers.insert(2, "non_steady_state", (np.arange(n_t) < dummies).astype(int))
    outliers["physio_wm"] = wm_sig
    outliers["physio_csf"] = csf_sig
    return volumes(), outliers, labels.reshape(grid.shape)
