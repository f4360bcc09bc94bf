"""Diffusion models: DTI maps and a fibre-orientation model chosen from the acquisition.

The fibre-orientation model follows :data:`MODEL_RULES`, checked in order:

1. multi-shell multi-tissue CSD when there are >= 2 non-zero shells, b=0 volumes and
   tissue (WM/GM/CSF) maps, and ``cvxpy`` (which DIPY's MSMT fit needs) is installed;
2. single-tissue CSD when the shell with most directions has enough of them for the
   spherical-harmonic order (>= 45 for order 8, >= 28 for 6, >= 15 for 4: the number of
   even-order SH coefficients);
3. constant-solid-angle Q-ball (CSA) otherwise, at the highest order the directions allow.

The choice and its reason are returned (:class:`ModelChoice`) for logs and sidecars, and
can be overridden.  All orientation models give SH coefficients in DIPY's default basis
(``descoteaux07``, legacy), which is what :mod:`pipeline.tractography` expects.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from dipy.core.gradients import GradientTable, gradient_table

#: Minimum number of directions for each SH order (= number of even-order coefficients).
SH_ORDER_MIN_DIRECTIONS = {8: 45, 6: 28, 4: 15, 2: 6}

#: Model rules in the order they are tried: (model, condition, explanation).
MODEL_RULES = (
    ("msmt_csd", ">= 2 shells, b=0 volumes, tissue maps, cvxpy installed",
     "multi-shell multi-tissue CSD separates WM from GM/CSF partial volume"),
    ("csd", ">= 15 directions on one shell",
     "single-shell CSD resolves crossings at the highest order the directions allow"),
    ("csa", "6 to 14 directions",
     "too few directions for CSD; CSA Q-ball is stable at low SH order"),
)

FOD_MODELS = ("msmt_csd", "csd", "csa")


@dataclass(frozen=True)
class Acquisition:
    """Summary of a diffusion scheme.

    Attributes
    ----------
    n_b0 : int
        Volumes with b <= ``b0_threshold``.
    shells : tuple of float
        Nominal b-values of the non-zero shells (rounded to ``shell_tolerance``), ascending.
    directions : tuple of int
        Distinct directions (antipodal pairs merged) per shell.
    """

    n_b0: int
    shells: tuple[float, ...]
    directions: tuple[int, ...]

    @property
    def max_directions(self) -> int:
        return max(self.directions, default=0)


@dataclass(frozen=True)
class ModelChoice:
    """The fibre-orientation model to fit and why (for logs and JSON sidecars)."""

    model: str
    sh_order: int
    reason: str
    acquisition: Acquisition
    overridden: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["acquisition"] = asdict(self.acquisition)
        return out


def make_gtab(bvals: np.ndarray, bvecs: np.ndarray, b0_threshold: float = 50) -> GradientTable:
    """DIPY gradient table from b-values (n,) and b-vectors (n, 3) or (3, n)."""
    bvals = np.asarray(bvals, dtype=float)
    bvecs = np.asarray(bvecs, dtype=float)
    if bvecs.shape == (3, len(bvals)) and len(bvals) != 3:
        bvecs = bvecs.T
    if bvecs.shape != (len(bvals), 3):
        raise ValueError(
            f"bvecs shape {bvecs.shape} does not match {len(bvals)} b-values; "
            "check the .bval/.bvec files belong to the same DWI run"
        )
    return gradient_table(bvals, bvecs=bvecs, b0_threshold=b0_threshold)


def summarize_acquisition(
    bvals: np.ndarray,
    bvecs: np.ndarray,
    *,
    b0_threshold: float = 50,
    shell_tolerance: float = 100,
    angle_tolerance_deg: float = 5.0,
) -> Acquisition:
    """Count b=0 volumes, shells and distinct directions per shell.

    Parameters
    ----------
    bvals : ndarray, shape (n,)
    bvecs : ndarray, shape (n, 3)
    b0_threshold : float
        b-values at or below this are b=0.
    shell_tolerance : float
        b-values are grouped into shells by rounding to this step (s/mm^2).
    angle_tolerance_deg : float
        Directions closer than this (or antipodal) count once.
    """
    bvals = np.asarray(bvals, dtype=float)
    bvecs = np.asarray(bvecs, dtype=float).reshape(-1, 3)
    is_b0 = bvals <= b0_threshold
    nominal = np.round(bvals / shell_tolerance) * shell_tolerance
    shells = tuple(float(b) for b in np.unique(nominal[~is_b0]))
    cos_tol = np.cos(np.deg2rad(angle_tolerance_deg))
    directions = []
    for b in shells:
        vecs = bvecs[(~is_b0) & (nominal == b)]
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        vecs = vecs / np.where(norms > 0, norms, 1)
        kept: list[np.ndarray] = []
        for v in vecs:
            if all(abs(float(v @ k)) < cos_tol for k in kept):
                kept.append(v)
        directions.append(len(kept))
    return Acquisition(int(is_b0.sum()), shells, tuple(directions))


def max_sh_order(n_directions: int) -> int:
    """Highest even SH order whose coefficient count fits in ``n_directions`` (0 if < 6)."""
    for order in sorted(SH_ORDER_MIN_DIRECTIONS, reverse=True):
        if n_directions >= SH_ORDER_MIN_DIRECTIONS[order]:
            return order
    return 0


def choose_model(
    acquisition: Acquisition,
    *,
    tissue_maps: bool = False,
    override: str | None = None,
    sh_order: int | None = None,
    max_order: int = 8,
) -> ModelChoice:
    """Pick the fibre-orientation model for an acquisition (see :data:`MODEL_RULES`).

    Parameters
    ----------
    acquisition : Acquisition
        From :func:`summarize_acquisition`.
    tissue_maps : bool
        Whether GM/WM/CSF probability maps are available in DWI space.
    override : {"msmt_csd", "csd", "csa"}, optional
        Force a model (still checked for feasibility).
    sh_order : int, optional
        Force the SH order (must be feasible for the directions).
    max_order : int
        Upper bound on the automatic SH order.

    Raises
    ------
    ValueError
        If the acquisition cannot support any orientation model (< 6 directions), or an
        override is infeasible.
    """
    feasible = min(max_sh_order(acquisition.max_directions), max_order)
    if feasible < 2:
        raise ValueError(
            f"{acquisition.max_directions} diffusion directions: at least 6 on one shell are "
            "needed for any fibre-orientation model; this run cannot be used for tractography"
        )
    msmt_ok = len(acquisition.shells) >= 2 and acquisition.n_b0 > 0 and tissue_maps
    have_cvxpy = importlib.util.find_spec("cvxpy") is not None
    if sh_order is not None:
        if sh_order % 2 or (sh_order > feasible and override != "msmt_csd"):
            raise ValueError(
                f"SH order {sh_order} needs {SH_ORDER_MIN_DIRECTIONS.get(sh_order, '?')} "
                f"directions; the acquisition has {acquisition.max_directions}"
            )
    if override is not None:
        if override not in FOD_MODELS:
            raise ValueError(f"unknown model {override!r}; choose from {FOD_MODELS}")
        if override == "msmt_csd" and not (msmt_ok and have_cvxpy):
            raise ValueError(
                "msmt_csd needs >= 2 shells, b=0 volumes, tissue maps and the cvxpy package"
            )
        if override == "csd" and feasible < 4:
            raise ValueError("csd needs >= 15 directions on one shell")
        order = sh_order or (8 if override == "msmt_csd" else feasible)
        return ModelChoice(override, order, "requested by the user", acquisition, True)
    if msmt_ok and have_cvxpy:
        return ModelChoice(
            "msmt_csd", sh_order or 8,
            f"{len(acquisition.shells)} shells + {acquisition.n_b0} b=0 volumes and tissue maps",
            acquisition,
        )
    note = ""
    if msmt_ok:
        note = " (multi-shell data, but cvxpy is not installed for MSMT-CSD)"
    elif len(acquisition.shells) >= 2:
        note = " (multi-shell data, but no tissue maps for MSMT-CSD)"
    order = sh_order or feasible
    if feasible >= 4:
        return ModelChoice(
            "csd", order,
            f"{acquisition.max_directions} directions on one shell support SH order {order}"
            + note,
            acquisition,
        )
    return ModelChoice(
        "csa", order,
        f"only {acquisition.max_directions} directions: too few for CSD (>= 15), "
        f"CSA Q-ball at SH order {order}" + note,
        acquisition,
    )


@dataclass
class DtiMaps:
    """Scalar maps of a tensor fit; zeros outside the mask."""

    fa: np.ndarray
    md: np.ndarray
    ad: np.ndarray
    rd: np.ndarray
    evecs: np.ndarray = field(repr=False)


def fit_dti(data: np.ndarray, gtab: GradientTable, mask: np.ndarray | None = None) -> DtiMaps:
    """Weighted-least-squares tensor fit; FA, MD (mm^2/s), AD, RD and eigenvectors."""
    from dipy.reconst.dti import TensorModel

    fit = TensorModel(gtab, fit_method="WLS").fit(data, mask=mask)
    fa = np.nan_to_num(np.clip(fit.fa, 0, 1))
    return DtiMaps(
        fa=fa,
        md=np.nan_to_num(fit.md),
        ad=np.nan_to_num(fit.ad),
        rd=np.nan_to_num(fit.rd),
        evecs=np.nan_to_num(fit.evecs),
    )


def estimate_response(
    data: np.ndarray,
    gtab: GradientTable,
    mask: np.ndarray,
    *,
    fa: np.ndarray | None = None,
    fa_threshold: float = 0.7,
    min_voxels: int = 100,
    top_voxels: int = 300,
) -> tuple[tuple[np.ndarray, float], dict[str, Any]]:
    """Single-fibre response from the data (``mask_for_response_ssst`` logic).

    Voxels in ``mask`` with FA > ``fa_threshold`` are used; when fewer than ``min_voxels``
    pass (small or low-FA data), the ``top_voxels`` highest-FA voxels of the mask are used
    instead, so a response always comes from the most single-fibre-like voxels.

    Returns
    -------
    response : (evals, S0)
        As DIPY's ``response_from_mask_ssst``.
    info : dict
        ``n_voxels``, ``fa_threshold`` actually used, ``fa_ratio`` (lambda_2 / lambda_1).
    """
    from dipy.reconst.csdeconv import response_from_mask_ssst

    mask = np.asarray(mask, dtype=bool)
    if fa is None:
        fa = fit_dti(data, gtab, mask).fa
    chosen = mask & (fa > fa_threshold)
    used = fa_threshold
    if chosen.sum() < min_voxels:
        values = np.sort(fa[mask])[::-1]
        if values.size == 0:
            raise ValueError("empty mask: no voxels to estimate the fibre response from")
        used = float(values[min(top_voxels, values.size) - 1])
        chosen = mask & (fa >= used)
    response, _ = response_from_mask_ssst(gtab, data, chosen.astype(np.uint8))
    evals, s0 = response
    info = {
        "n_voxels": int(chosen.sum()),
        "fa_threshold": float(used),
        "fa_ratio": float(evals[1] / evals[0]),
        "evals": [float(e) for e in evals],
        "S0": float(s0),
    }
    return (np.asarray(evals, dtype=float), float(s0)), info


@dataclass
class FodResult:
    """Fibre orientation distributions as SH coefficients (DIPY descoteaux07 basis)."""

    sh: np.ndarray
    choice: ModelChoice
    response: dict[str, Any]
    tissue_fractions: dict[str, np.ndarray] | None = None


def fit_fod(
    data: np.ndarray,
    gtab: GradientTable,
    mask: np.ndarray,
    choice: ModelChoice,
    *,
    wm: np.ndarray | None = None,
    gm: np.ndarray | None = None,
    csf: np.ndarray | None = None,
    fa: np.ndarray | None = None,
) -> FodResult:
    """Fit the chosen fibre-orientation model inside ``mask``.

    Parameters
    ----------
    data : ndarray (X, Y, Z, N)
    gtab : GradientTable
    mask : ndarray (X, Y, Z), bool
        Brain mask; the fit is restricted to it.
    choice : ModelChoice
        From :func:`choose_model`.
    wm, gm, csf : ndarray, optional
        Tissue probability maps (needed for ``msmt_csd``; ``wm`` > 0.5 also restricts the
        single-fibre response voxels when given).
    fa : ndarray, optional
        FA map, to avoid refitting DTI for the response.
    """
    mask = np.asarray(mask, dtype=bool)
    if choice.model == "csa":
        from dipy.reconst.shm import CsaOdfModel

        fit = CsaOdfModel(gtab, choice.sh_order).fit(data, mask=mask)
        return FodResult(np.asarray(fit.shm_coeff, dtype=np.float64), choice, {})
    if choice.model == "csd":
        from dipy.reconst.csdeconv import ConstrainedSphericalDeconvModel

        response_mask = mask & (wm > 0.5) if wm is not None else mask
        response, info = estimate_response(data, gtab, response_mask, fa=fa)
        model = ConstrainedSphericalDeconvModel(gtab, response, sh_order_max=choice.sh_order)
        fit = model.fit(data, mask=mask)
        return FodResult(np.asarray(fit.shm_coeff, dtype=np.float64), choice, info)
    if choice.model == "msmt_csd":
        if wm is None or gm is None or csf is None:
            raise ValueError("msmt_csd needs wm, gm and csf probability maps")
        from dipy.reconst.mcsd import (
            MultiShellDeconvModel,
            multi_shell_fiber_response,
            response_from_mask_msmt,
        )

        wm_rf, gm_rf, csf_rf = response_from_mask_msmt(
            gtab, data, mask & (wm > 0.9), mask & (gm > 0.9), mask & (csf > 0.9)
        )
        ubvals = np.unique(np.round(gtab.bvals[~gtab.b0s_mask] / 100) * 100)
        response = multi_shell_fiber_response(
            choice.sh_order, np.r_[0, ubvals], wm_rf, gm_rf, csf_rf
        )
        fit = MultiShellDeconvModel(gtab, response, sh_order_max=choice.sh_order).fit(
            data, mask=mask
        )
        fractions = {"csf": fit.volume_fractions[..., 0], "gm": fit.volume_fractions[..., 1]}
        return FodResult(np.asarray(fit.shm_coeff, dtype=np.float64), choice, {}, fractions)
    raise ValueError(f"unknown model {choice.model!r}")
