"""Ground-truth simulator of longitudinal ECT BIDS datasets (``trajectome-simulate``).

The simulator moves the MNI152 template and the Seitzman300 atlas into subject- and
session-specific native spaces and writes T1w, resting BOLD and DWI with planted
connectomes, volumes and nuisance, plus the ground truth under ``derivatives/groundtruth``.
"""

from pipeline.simulate.cli import main
from pipeline.simulate.config import PRESETS, SimConfig, get_config
from pipeline.simulate.dataset import simulate_dataset

__all__ = ["PRESETS", "SimConfig", "get_config", "main", "simulate_dataset"]
