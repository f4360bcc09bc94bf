"""Simulation presets: image grids, run lengths and acquisition parameters."""

from __future__ import annotations

from dataclasses import dataclass, replace

#: Session labels the simulator knows, in chronological order, with their ECT role.
SESSION_ROLES = {"preECT": "pre", "postECT": "post", "maintenance": "maintenance"}
DEFAULT_SESSIONS = tuple(SESSION_ROLES)
#: Days after the pre-ECT scan (post ~4 weeks, maintenance ~6 months).
SESSION_DAYS = {"preECT": 0, "postECT": 28, "maintenance": 182}


@dataclass(frozen=True)
class SimConfig:
    """Sizes and acquisition parameters of one simulated dataset.

    Attributes
    ----------
    anat_res, func_res, dwi_res : float
        Isotropic voxel sizes (mm) of the T1w, BOLD and DWI grids.
    volumes : int
        BOLD volumes per run, including ``dummies`` non-steady-state volumes.
    tr : float
        BOLD repetition time (s).
    directions, n_b0, bval : int
        DWI diffusion directions at ``bval`` (s/mm2) plus ``n_b0`` b=0 volumes.
    n_bundles : int
        Number of planted fibre bundles (structural edges).
    dummies : int
        Non-steady-state volumes at the start of each BOLD run.
    """

    anat_res: float = 2.0
    func_res: float = 5.0
    dwi_res: float = 4.0
    volumes: int = 126
    tr: float = 2.2
    directions: int = 32
    n_b0: int = 2
    bval: int = 1000
    n_bundles: int = 40
    dummies: int = 4

    def __post_init__(self) -> None:
        if self.volumes - self.dummies < 20:
            raise ValueError(f"--volumes {self.volumes}: need at least {self.dummies + 20} volumes")
        if self.directions < 6:
            raise ValueError(f"--directions {self.directions}: a tensor needs at least 6")
        for name in ("anat_res", "func_res", "dwi_res", "tr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


PRESETS = {
    "tiny": SimConfig(anat_res=4.0, func_res=6.0, dwi_res=6.0, volumes=64, directions=12,
                      n_b0=1, n_bundles=24, dummies=2),
    "example": SimConfig(),
    "realistic": SimConfig(anat_res=1.0, func_res=2.0, dwi_res=2.0, volumes=300, directions=64,
                           n_b0=4),
}


def get_config(preset: str = "example", **overrides: float | int | None) -> SimConfig:
    """Return the preset ``preset`` with the non-``None`` ``overrides`` applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
