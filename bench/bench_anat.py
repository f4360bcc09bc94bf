"""Per-session anatomical runtime, peak memory and accuracy on a simulated subject.

Runs the anatomical maths the app chains (N4, brain extraction, tissues per session;
unbiased subject template; template -> MNI; atlas to native; Jacobian volumes), each
stage in its own forked process (:mod:`bench.measure`), and scores the result against
the simulator's ground truth::

    python bench/bench_anat.py bids_examples/ds-ect sub-pat01 --settings sloppy --threads 2

``--reuse --work DIR`` skips the per-session preprocessing already in ``DIR``;
``--preprocess-only`` stops after it and scores the brain masks alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import StageResult, print_table, run_stage
from pipeline import anat
from pipeline import registration as reg
from pipeline.atlas import build_default_atlas

GT = Path("derivatives") / "groundtruth"
ATLAS = "Seitzman300"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean arrays."""
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def preprocess(t1w: Path, out: Path, settings: str, threads: int) -> None:
    """N4, brain extraction and tissues of one session, written to ``out``."""
    corrected, _ = anat.n4_bias_correction(t1w, settings=settings, n_threads=threads)
    result = anat.brain_extraction(corrected, settings=settings, work_dir=out / "bet",
                                   n_threads=threads)
    priors = anat.warp_tissue_priors(result.template_to_native, corrected, n_threads=threads)
    anat.segment_tissues(corrected, result.mask, priors)
    nb.save(corrected, out / "t1w.nii.gz")
    nb.save(result.brain, out / "brain.nii.gz")
    nb.save(result.mask, out / "mask.nii.gz")


def template(dirs: list[Path], names: list[str], work: Path, settings: str,
             threads: int) -> reg.SubjectTemplate:
    """Unbiased subject template (picklable result: images and transform paths)."""
    return reg.build_subject_template(
        [nb.load(d / "brain.nii.gz") for d in dirs], [nb.load(d / "mask.nii.gz") for d in dirs],
        settings=settings, work_dir=work, n_threads=threads, names=names)


def to_mni(result: reg.SubjectTemplate, work: Path, settings: str, threads: int) -> reg.Transform:
    """Subject template -> MNI."""
    return reg.register_to_mni(result.image, result.mask, settings=settings, work_dir=work,
                               n_threads=threads)


def volumes(result: reg.SubjectTemplate, mni: reg.Transform, dirs: list[Path], work: Path,
            threads: int) -> list[tuple[nb.Nifti1Image, pd.DataFrame]]:
    """Atlas in each native space and Jacobian volumes of each session."""
    atlas = build_default_atlas(2)
    in_template = reg.apply_transform(atlas.image, mni.inverted(), result.image,
                                      interpolation="nearestNeighbor", n_threads=threads)
    out = []
    for tx, d in zip(result.transforms, dirs, strict=True):
        native = reg.atlas_to_native(atlas.image, tx.then(mni), nb.load(d / "t1w.nii.gz"),
                                     n_threads=threads)
        out.append((native, anat.session_jacobian_volumes(in_template, tx, atlas.table, work,
                                                          n_threads=threads)))
    return out


def mask_dice(root: Path, sub: str, ses: str, mask: Path) -> float:
    """Dice of a brain mask against the simulator's true mask of that session."""
    truth = root / GT / sub / f"ses-{ses}" / "anat" / \
        f"{sub}_ses-{ses}_space-T1w_desc-brain_mask.nii.gz"
    return dice(np.asarray(nb.load(mask).dataobj) > 0, np.asarray(nb.load(truth).dataobj) > 0)


def score(root: Path, sub: str, sessions: list[str], dirs: list[Path],
          results: list[tuple[nb.Nifti1Image, pd.DataFrame]]) -> pd.DataFrame:
    """Brain-mask Dice, mean parcel Dice (true parcels > 500 mm3), hippocampal volumes."""
    table = build_default_atlas(2).table
    rows = []
    for ses, d, (native, vols) in zip(sessions, dirs, results, strict=True):
        gt = root / GT / sub / f"ses-{ses}" / "anat"
        stem = f"{sub}_ses-{ses}"
        true = np.asarray(nb.load(
            gt / f"{stem}_space-T1w_atlas-{ATLAS}_desc-planted_dseg.nii.gz").dataobj).astype(int)
        labels = np.asarray(native.dataobj).astype(int)
        voxel = float(abs(np.linalg.det(native.affine[:3, :3])))
        sizes = np.bincount(true.ravel(), minlength=int(table["index"].max()) + 1) * voxel
        big = [i for i in table["index"] if sizes[i] > 500]
        planted = pd.read_csv(gt / f"{stem}_atlas-{ATLAS}_desc-planted_stat-volume_morph.tsv",
                              sep="\t").set_index("name")["volume_mm3"]
        hipp = anat.structure_volumes(vols, table)
        rows.append({
            "session": ses,
            "mask_dice": mask_dice(root, sub, ses, d / "mask.nii.gz"),
            "parcel_dice": float(np.mean([dice(labels == i, true == i) for i in big])),
            "n_parcels": len(big),
            "hipp_mm3": hipp["hippocampus_L"] + hipp["hippocampus_R"],
            "hipp_true_mm3": planted["left_hippocampus"] + planted["right_hippocampus"],
        })
    frame = pd.DataFrame(rows)
    frame["hipp_change_pct"] = 100 * (frame["hipp_mm3"] / frame["hipp_mm3"].iloc[0] - 1)
    frame["hipp_true_change_pct"] = 100 * (frame["hipp_true_mm3"]
                                           / frame["hipp_true_mm3"].iloc[0] - 1)
    return frame


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("subject", help="e.g. sub-pat01")
    parser.add_argument("--sessions", nargs="+", default=["preECT", "postECT", "maintenance"])
    parser.add_argument("--settings", default="default", choices=sorted(reg.REGISTRATION_SETTINGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true",
                        help="skip the per-session preprocessing whose outputs exist in --work "
                        "(accuracy runs; the table then lacks those stages)")
    parser.add_argument("--preprocess-only", action="store_true",
                        help="stop after N4, brain extraction and tissues; score the masks")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_anat_"))
    dirs = [work / ses for ses in args.sessions]
    stages: list[StageResult] = []
    for ses, d in zip(args.sessions, dirs, strict=True):
        d.mkdir(parents=True, exist_ok=True)
        if args.reuse and all((d / f).exists() for f in ("t1w.nii.gz", "brain.nii.gz",
                                                          "mask.nii.gz")):
            continue
        t1w = args.dataset / args.subject / f"ses-{ses}" / "anat" / \
            f"{args.subject}_ses-{ses}_T1w.nii.gz"
        stages.append(run_stage(f"preprocess ses-{ses}", preprocess, t1w, d, args.settings,
                                args.threads))
    if args.preprocess_only:
        print(f"{args.subject}, settings={args.settings}, threads={args.threads}, work={work}")
        print_table(stages)
        for ses, d in zip(args.sessions, dirs, strict=True):
            print(f"ses-{ses} brain-mask Dice vs truth: "
                  f"{mask_dice(args.dataset, args.subject, ses, d / 'mask.nii.gz'):.4f}")
        return
    tpl = run_stage("subject template", template, dirs, args.sessions, work / "template",
                    args.settings, args.threads)
    mni = run_stage("template -> MNI", to_mni, tpl.value, work / "template", args.settings,
                    args.threads)
    vol = run_stage("atlas to native + volumes", volumes, tpl.value, mni.value, dirs,
                    work / "template", args.threads)
    stages += [tpl, mni, vol]
    print(f"{args.subject}, {len(dirs)} sessions, settings={args.settings}, "
          f"threads={args.threads}, work={work}")
    print_table(stages)
    total = sum(s.wall_s for s in stages)
    print(f"{'total':<38}{total:>10.2f}   per session {total / len(dirs):.1f} s, "
          f"peak {max(s.peak_rss_mb for s in stages):.0f} MB")
    frame = score(args.dataset, args.subject, args.sessions, dirs, vol.value)
    with pd.option_context("display.width", 160, "display.precision", 3):
        print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
