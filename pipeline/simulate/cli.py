"""Command line: ``trajectome-simulate OUT --subjects N --controls M --seed S``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from pipeline.simulate.config import DEFAULT_SESSIONS, PRESETS


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``trajectome-simulate``."""
    p = argparse.ArgumentParser(
        prog="trajectome-simulate",
        description="Write a simulated longitudinal ECT BIDS dataset with planted ground truth "
                    "(derivatives/groundtruth).",
    )
    p.add_argument("out", help="output dataset root")
    p.add_argument("--subjects", type=int, default=2, help="number of patients (sub-patXX)")
    p.add_argument("--controls", type=int, default=1, help="number of controls (sub-ctlXX)")
    p.add_argument("--seed", type=int, default=0, help="master seed (same seed -> same bytes)")
    p.add_argument("--sessions", nargs="+", default=list(DEFAULT_SESSIONS),
                   choices=list(DEFAULT_SESSIONS), help="sessions to simulate")
    p.add_argument("--preset", default="example", choices=sorted(PRESETS))
    p.add_argument("--anat-res", type=float, help="T1w voxel size (mm)")
    p.add_argument("--func-res", type=float, help="BOLD voxel size (mm)")
    p.add_argument("--dwi-res", type=float, help="DWI voxel size (mm)")
    p.add_argument("--volumes", type=int, help="BOLD volumes per run (incl. non-steady-state)")
    p.add_argument("--tr", type=float, help="BOLD repetition time (s)")
    p.add_argument("--directions", type=int, help="DWI diffusion directions")
    p.add_argument("--bval", type=int, help="DWI b-value (s/mm2)")
    p.add_argument("--fmriprep", action="store_true",
                   help="also write simulated fMRIPrep outputs (planted motion, true transforms) "
                        "to OUT/derivatives/fmriprep")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator; returns the exit status."""
    from pipeline.simulate.dataset import simulate_dataset

    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        root = simulate_dataset(
            args.out, n_patients=args.subjects, n_controls=args.controls, seed=args.seed,
            sessions=args.sessions, preset=args.preset, verbose=not args.quiet,
            anat_res=args.anat_res, func_res=args.func_res, dwi_res=args.dwi_res,
            volumes=args.volumes, tr=args.tr, directions=args.directions, bval=args.bval,
        )
        if args.fmriprep:
            from pipeline.simulate.fmriprep import write_fmriprep

            write_fmriprep(root)
    except ValueError as err:
        print(f"trajectome-simulate: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {root} in {time.perf_counter() - start:.1f} s")
    return 0
