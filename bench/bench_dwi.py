"""Diffusion workflow: helpers for ds-ect and speed on a realistic session (not run in CI).

The per-session accuracy on ``bids_examples/ds-ect`` (ROC AUC of planted edges, criteria
compared on identical inputs) is ``bench/bench_dwi_auc.py``; it and the integration tests
use the helpers here (:func:`run_session`, :func:`retrack`, :func:`planted_auc`).

``realistic`` times the stages of one realistic session (2 mm, 64 directions; make it with
``trajectome-simulate OUT --preset realistic --subjects 1 --controls 0 --sessions preECT``),
each in its own process (:mod:`bench.measure`), and MRtrix3 ``tckgen`` (iFOD2 on FODs from
``dwi2fod``, ACT from the same tissue maps, same seed mask, streamline count, step, angle and
threads) when it is installed::

    nice -n 10 python bench/bench_dwi.py realistic OUT --streamlines 100000 --threads 1
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import HEADER, run_stage  # noqa: E402
from pipeline.atlas import build_default_atlas, write_atlas  # noqa: E402
from pipeline.bids import DwiRun, Session  # noqa: E402
from pipeline.simulate.qsiprep import groundtruth_anatomy  # noqa: E402
from workflows.anat import AtlasFiles  # noqa: E402

ATLAS = "Seitzman300"
ECT = ROOT / "bids_examples" / "ds-ect"


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U with ties counted half), no scikit-learn needed."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both planted and absent edges")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def planted_auc(relmat: str | Path, truth: str | Path) -> tuple[float, int, int]:
    """AUC of a streamline-count relmat against the planted bundle-count relmat.

    Returns ``(auc, planted edges, planted edges with >= 1 streamline)``.
    """
    true = pd.read_csv(truth, sep="\t", index_col="Node")
    found = pd.read_csv(relmat, sep="\t", index_col="Node").loc[true.index, true.index]
    upper = np.triu_indices(len(true), 1)
    positive = true.to_numpy()[upper] > 0
    scores = found.to_numpy()[upper]
    return roc_auc(scores, positive), int(positive.sum()), int((scores[positive] > 0).sum())


def fa_contrast(fa_file: str | Path, bundles_mask: str | Path, gm_dwi: str | Path) -> tuple:
    """Median FA in planted bundle voxels and in grey matter (GM > 0.5) outside them."""
    fa = np.asarray(nb.load(fa_file).dataobj, float)
    bundles = np.asarray(nb.load(bundles_mask).dataobj) > 0
    gm = (np.asarray(nb.load(gm_dwi).dataobj) > 0.5) & ~bundles
    return float(np.median(fa[bundles])), float(np.median(fa[gm]))


def atlas_files(work: Path) -> AtlasFiles:
    folder = work / "atlas" / "atlases" / f"atlas-{ATLAS}"
    if not folder.exists():
        write_atlas(build_default_atlas(resolution=2), work / "atlas")
    return AtlasFiles(ATLAS, next(folder.glob("*_dseg.nii.gz")), folder / f"atlas-{ATLAS}_dseg.tsv")


def session_of(dataset: Path, sub: str, ses: str) -> tuple[Session, DwiRun]:
    folder = dataset / f"sub-{sub}" / f"ses-{ses}" / "dwi"
    stem = f"sub-{sub}_ses-{ses}_dwi"
    run = DwiRun(folder / f"{stem}.nii.gz", folder / f"{stem}.bval", folder / f"{stem}.bvec",
                 {}, {})
    return Session(sub, ses, None, 1, None, (), (), (run,)), run


def run_session(dataset: Path, sub: str, ses: str, work: Path, **options) -> Path:
    """Run the diffusion workflow on one session; returns the workflow's work folder."""
    from workflows.dwi import init_dwi_wf

    session, run = session_of(dataset, sub, ses)
    anat = groundtruth_anatomy(dataset, sub, ses, work / f"anat_{sub}_{ses}")
    wf = init_dwi_wf(session=session, dwi_runs=[run], atlases=[atlas_files(work)],
                     output_dir=work / "out", name=f"dwi_{sub}_{ses}_wf", **options)
    wf.base_dir = str(work / "wk")
    for field in ("t1w_preproc", "brain_mask", "gm", "wm", "csf"):
        setattr(wf.inputs.inputnode, field, str(getattr(anat, field)))
    wf.inputs.inputnode.atlas_native = [str(anat.atlas_native)]
    wf.run(plugin="Linear")
    return work / "wk" / f"dwi_{sub}_{ses}_wf"


def retrack(wf_dir: Path, work: Path, anat_dir: Path, **options) -> Path:
    """Rerun only the tracking node on a finished workflow's intermediate files."""
    from workflows.interfaces.dwi import TrackConnectomes

    atlas = atlas_files(work)
    native = next(anat_dir.glob(f"*atlas-{ATLAS}_dseg.nii.gz"))
    reg, fit = wf_dir / "register_dwi_t1w", wf_dir / "fit_models"
    out = work / "retrack" / f"{wf_dir.name}_{'_'.join(f'{k}{v}' for k, v in options.items())}"
    out.mkdir(parents=True, exist_ok=True)
    node = TrackConnectomes(
        fod=str(fit / "fod.nii.gz"), fa=str(fit / "fa.nii.gz"), gm=str(reg / "gm_dwi.nii.gz"),
        wm=str(reg / "wm_dwi.nii.gz"), csf=str(reg / "csf_dwi.nii.gz"),
        atlas_native=[str(native)], atlas_names=[ATLAS], atlas_tables=[str(atlas.table)],
        dwi_to_t1w=str(reg / "dwi_to_t1w.txt"), **options,
    )
    result = node.run(cwd=str(out))
    return Path(result.outputs.out_files[0])


def _register_stage(b0: str, mask: str, anat, out: str, threads: int, seed: int) -> dict:
    from workflows.interfaces.dwi import RegisterDwiToT1w

    result = RegisterDwiToT1w(
        b0=b0, dwi_mask=mask, t1w=str(anat.t1w_preproc), t1w_mask=str(anat.brain_mask),
        gm=str(anat.gm), wm=str(anat.wm), csf=str(anat.csf), num_threads=threads, seed=seed,
    ).run(cwd=out)
    return {t: getattr(result.outputs, t) for t in ("gm", "wm", "csf")}


def _fit_stage(dwi_file: str, bval: str, bvec: str, mask: str, tissues: dict, out: str) -> dict:
    from workflows.interfaces.dwi import FitDiffusionModels

    result = FitDiffusionModels(in_file=dwi_file, bval=bval, bvec=bvec, mask=mask,
                                **tissues).run(cwd=out)
    return {"fod": result.outputs.fod, "fa": result.outputs.fa,
            "model": result.outputs.model["model"], "sh_order": result.outputs.model["sh_order"]}


def _track_stage(fod_file: str, fa_file: str, tissues: dict, out: str, n: int, threads: int,
                 seed: int) -> dict:
    from pipeline import tractography

    fod = nb.load(fod_file)
    maps = {k: np.asarray(nb.load(v).dataobj, np.float64) for k, v in tissues.items()}
    fa = np.asarray(nb.load(fa_file).dataobj, np.float64)
    options, criterion, seeds = tractography.prepare_tracking(
        tractography.TrackingOptions(n_streamlines=n, seed=seed, n_threads=threads),
        fod.affine, fa=fa, **maps)
    nb.save(nb.Nifti1Image(seeds.astype(np.uint8), fod.affine), f"{out}/seeds.nii.gz")
    report = tractography.run_tracking(np.asarray(fod.dataobj, np.float64), fod.affine, seeds,
                                       criterion, options, lambda chunk: None)
    return {"n": report.n_streamlines, "seeds": report.n_seeds, "seconds": report.seconds,
            "step": report.step_size, "per_s": report.streamlines_per_second}


def _mrtrix(*cmd: str) -> None:
    subprocess.run([*cmd, "-force", "-quiet"], check=True)


def mrtrix_fods(out: str, concat: dict[str, str], threads: int) -> None:
    """MRtrix3's own response and CSD (``OUT/fod_mrtrix.mif``; its SH basis differs from
    DIPY's) on a preprocessed DWI: ``concat`` holds ``out_file``, ``bval``, ``bvec``, ``mask``."""
    nthreads = ["-nthreads", str(threads)]
    _mrtrix("mrconvert", concat["out_file"], f"{out}/dwi.mif", "-fslgrad", concat["bvec"],
            concat["bval"], *nthreads)
    _mrtrix("dwi2response", "tournier", f"{out}/dwi.mif", f"{out}/wm_response.txt", "-mask",
            concat["mask"], *nthreads)
    _mrtrix("dwi2fod", "csd", f"{out}/dwi.mif", f"{out}/wm_response.txt",
            f"{out}/fod_mrtrix.mif", "-mask", concat["mask"], *nthreads)


def _tckgen(out: str, n: int, step: float, threads: int, seed: int) -> dict:
    """MRtrix3 iFOD2 from the same seeds, ACT from the same tissue maps, same step/angle."""
    import os

    start = time.perf_counter()
    subprocess.run(
        ["tckgen", f"{out}/fod_mrtrix.mif", f"{out}/tracks.tck", "-algorithm", "iFOD2",
         "-seed_image", f"{out}/seeds.nii.gz", "-act", f"{out}/5tt.nii.gz", "-select", str(n),
         "-step", f"{step:g}", "-angle", "30", "-minlength", "10", "-maxlength", "250",
         "-nthreads", str(threads), "-force", "-quiet"],
        check=True, env={**os.environ, "MRTRIX_RNG_SEED": str(seed)},
    )
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "per_s": n / seconds}


def bench_realistic(args: argparse.Namespace) -> None:
    from workflows.interfaces.dwi import ConcatenateDwi, PreprocessDwiRun

    dataset = Path(args.dataset)
    sub = sorted(p.name[4:] for p in dataset.glob("sub-*"))[0]
    ses = sorted(p.name[4:] for p in (dataset / f"sub-{sub}").glob("ses-*"))[0]
    work = Path(args.work)
    _, run = session_of(dataset, sub, ses)
    anat = groundtruth_anatomy(dataset, sub, ses, work / "anat")
    img = nb.load(run.path)
    print(f"{run.path.name}: shape {img.shape}, voxel {img.header.get_zooms()[:3]} mm; "
          f"{args.streamlines} streamlines, {args.threads} thread(s)")
    print(HEADER)
    dirs = {k: work / k for k in ("preproc", "concat", "register", "models", "track")}
    for folder in dirs.values():
        folder.mkdir(parents=True, exist_ok=True)

    def preprocess() -> dict:
        node = PreprocessDwiRun(in_file=str(run.path), bval=str(run.bval), bvec=str(run.bvec),
                                settings="sloppy" if args.sloppy else "default")
        return dict(node.run(cwd=str(dirs["preproc"])).outputs.get())

    if args.raw:  # time the model/tracking stages only, on the raw series
        pre = {"out_file": str(run.path), "bval": str(run.bval), "bvec": str(run.bvec)}
    else:
        stage = run_stage("preprocess (MP-PCA, unring, motion)", preprocess)
        print(stage.row(), flush=True)
        pre = stage.value
    concat = ConcatenateDwi(in_files=[pre["out_file"]], bvals=[pre["bval"]],
                            bvecs=[pre["bvec"]]).run(cwd=str(dirs["concat"])).outputs
    stage = run_stage("register b0 -> T1w, tissues to DWI", _register_stage, concat.b0,
                      concat.mask, anat, str(dirs["register"]), args.threads, args.seed)
    print(stage.row(), flush=True)
    tissues = stage.value
    stage = run_stage("DTI + fibre model", _fit_stage, concat.out_file, concat.bval,
                      concat.bvec, concat.mask, tissues, str(dirs["models"]))
    print(stage.row(), stage.value["model"], stage.value["sh_order"], flush=True)
    fod_file, fa_file = stage.value["fod"], stage.value["fa"]
    out = str(dirs["track"])
    stage = run_stage("tracking (DIPY, default stopping, chunked)", _track_stage, fod_file,
                      fa_file, tissues, out, args.streamlines, args.threads, args.seed)
    print(stage.row(), flush=True)
    ours = stage.value
    print(f"DIPY probabilistic: {ours['n']} streamlines from {ours['seeds']} seeds in "
          f"{ours['seconds']:.1f} s = {ours['per_s']:.0f} streamlines/s "
          f"(step {ours['step']:.2f} mm)", flush=True)
    if not (shutil.which("tckgen") and shutil.which("dwi2fod")):
        print("MRtrix3 tckgen not found: no comparison")
        return
    # MRtrix's own CSD on the same series (its SH basis differs from DIPY's) and a 5TT image
    # (cGM, sGM, WM, CSF, pathological) from the same tissue maps
    maps = [np.asarray(nb.load(tissues[t]).dataobj, np.float32) for t in ("gm", "wm", "csf")]
    zero = np.zeros_like(maps[0])
    five = np.stack([maps[0], zero, maps[1], maps[2], zero], axis=-1)
    nb.save(nb.Nifti1Image(five, nb.load(tissues["gm"]).affine), f"{out}/5tt.nii.gz")
    mrtrix_fods(out, {"out_file": concat.out_file, "bval": concat.bval, "bvec": concat.bvec,
                      "mask": concat.mask}, args.threads)
    stage = run_stage("tracking (MRtrix3 tckgen iFOD2, ACT)", _tckgen, out, args.streamlines,
                      ours["step"], args.threads, args.seed)
    print(stage.row(), flush=True)
    print(f"tckgen iFOD2: {args.streamlines} streamlines in {stage.value['seconds']:.1f} s = "
          f"{stage.value['per_s']:.0f} streamlines/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    real = sub.add_parser("realistic", help="per-stage time of one realistic session")
    real.add_argument("dataset")
    real.add_argument("--streamlines", type=int, default=100_000)
    real.add_argument("--work", default="/tmp/dwi_bench_realistic")
    real.add_argument("--seed", type=int, default=42)
    real.add_argument("--threads", type=int, default=1)
    real.add_argument("--raw", action="store_true",
                      help="skip preprocessing: time the later stages on the raw series")
    real.add_argument("--sloppy", action="store_true", help="sloppy motion correction")
    args = parser.parse_args(argv)
    {"realistic": bench_realistic}[args.mode](args)


if __name__ == "__main__":
    main()
