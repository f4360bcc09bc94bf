"""Planted fibre bundles: curved tubes through deep white matter joining parcel centres."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from pipeline.simulate.effects import DMN, FPN, SAL, VIS
from pipeline.simulate.mni import MniModel

#: Deep white matter the curves bow towards (per hemisphere x is halved towards 0).
DEEP_WM = np.array([0.0, -12.0, 22.0])
#: Share of the bundles drawn for each kind of edge (the rest: any two networks).
EDGE_MIX = (((DMN, DMN), 0.3), ((SAL, FPN), 0.15), ((SAL, SAL), 0.05), ((FPN, FPN), 0.1),
            ((VIS, VIS), 0.1))
TUBE_RADIUS_MM = 3.5


def bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Points ``(n, 3)`` and unit tangents of the quadratic Bezier curve ``p0 -> p2``."""
    t = np.linspace(0, 1, n)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    tan = 2 * (1 - t) * (p1 - p0) + 2 * t * (p2 - p1)
    return pts, tan / np.linalg.norm(tan, axis=1, keepdims=True)


def _control_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mid = (a + b) / 2
    deep = DEEP_WM + np.array([0.5 * mid[0], 0, 0])
    return mid + 0.6 * (deep - mid)


def select_bundles(rng: np.random.Generator, model: MniModel, n_bundles: int) -> pd.DataFrame:
    """Draw ``n_bundles`` parcel pairs whose curve runs mostly through white matter.

    Returns one row per bundle: ``parcel_a, parcel_b`` (atlas indices), their names and
    networks, ``strength`` (group fibre count), ``length_mm`` and the control points
    ``p0_x..p2_z`` (MNI mm).
    """
    table = model.table
    centres = table[["x", "y", "z"]].to_numpy()
    networks = table["network"].to_numpy()
    quotas = [(pair, round(share * n_bundles)) for pair, share in EDGE_MIX]
    quotas.append((None, n_bundles - sum(q for _, q in quotas)))
    rows: list[dict] = []
    used: set[tuple[int, int]] = set()
    for pair, quota in quotas:
        if pair is None:
            pool_a = pool_b = np.flatnonzero(networks != "unassigned")
        else:
            pool_a = np.flatnonzero(networks == pair[0])
            pool_b = np.flatnonzero(networks == pair[1])
        got, tries = 0, 0
        while got < quota and tries < 5000:
            tries += 1
            i, j = int(rng.choice(pool_a)), int(rng.choice(pool_b))
            key = (min(i, j), max(i, j))
            if i == j or key in used:
                continue
            a, b = centres[i], centres[j]
            p1 = _control_point(a, b)
            pts, _ = bezier(a, p1, b, 200)
            length = float(np.linalg.norm(np.diff(pts, axis=0), axis=1).sum())
            inner = pts[30:-30]
            wm = model.sample("wm", inner).mean()
            if not (40 <= length <= 130) or wm < 0.55:
                continue
            used.add(key)
            got += 1
            rows.append({
                "parcel_a": int(table["index"].iloc[key[0]]),
                "parcel_b": int(table["index"].iloc[key[1]]),
                "name_a": table["name"].iloc[key[0]], "name_b": table["name"].iloc[key[1]],
                "network_a": networks[key[0]], "network_b": networks[key[1]],
                "strength": int(rng.integers(20, 101)), "length_mm": round(length, 2),
                **{f"p{k}_{ax}": float(v) for k, p in enumerate((centres[key[0]], p1,
                                                                 centres[key[1]]))
                   for ax, v in zip("xyz", p, strict=True)},
            })
    return pd.DataFrame(rows)


def sc_matrix(bundles: pd.DataFrame, counts: np.ndarray, table: pd.DataFrame) -> np.ndarray:
    """Parcel x parcel planted SC: fibre count of the bundle joining them, 0 elsewhere."""
    index_of = {int(v): i for i, v in enumerate(table["index"])}
    sc = np.zeros((len(table), len(table)))
    for a, b, c in zip(bundles["parcel_a"], bundles["parcel_b"], counts, strict=True):
        sc[index_of[int(a)], index_of[int(b)]] = sc[index_of[int(b)], index_of[int(a)]] = c
    return sc


def bundle_field(
    bundles: pd.DataFrame, counts: np.ndarray, points: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Tube membership of MNI ``points``: weights ``(N, B)`` (0-1) and tangents ``(N, B, 3)``.

    Radius grows with the square root of the fibre count (cross-section ~ count).
    """
    weights = np.zeros((len(points), len(bundles)), np.float32)
    tangents = np.zeros((len(points), len(bundles), 3), np.float32)
    ref = max(1.0, float(np.median(counts)))
    for k, row in enumerate(bundles.itertuples()):
        p = [np.array([getattr(row, f"p{i}_{ax}") for ax in "xyz"]) for i in range(3)]
        pts, tan = bezier(*p, n=400)
        radius = TUBE_RADIUS_MM * np.clip(np.sqrt(counts[k] / ref), 0.7, 1.4)
        dist, idx = cKDTree(pts).query(points, distance_upper_bound=radius)
        inside = np.isfinite(dist)
        # smooth edge: full weight in the core, fading over the outer third
        weights[inside, k] = np.clip(1.5 * (1 - dist[inside] / radius), 0, 1)
        tangents[inside, k] = tan[idx[inside]]
    return weights, tangents
