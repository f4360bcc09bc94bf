"""Functional workflow on simulated sessions: accuracy, runtime and peak memory per BOLD run.

For every selected session it runs, each in its own forked process (:mod:`bench.measure`):

1. the workflow on the raw BOLD (``sloppy`` registration settings by default);
2. the workflow on a simulated fMRIPrep output (:mod:`pipeline.simulate.fmriprep`, written
   once beforehand, not timed);
3. a plain nilearn baseline on that same fMRIPrep output: ``NiftiLabelsMasker`` (mean per
   parcel, atlas resampled to the data) and ``signal.clean`` with the same confounds,
   censoring and band-pass, then ``np.corrcoef``.

It scores each result against the planted FC (Pearson r over upper-triangle edges) and the
planted spikes (fraction censored), and compares the two workflow paths.  The anatomical
inputs are the simulator's ground truth (as in ``tests/test_func_workflow.py``)::

    python bench/bench_func.py bids_examples/ds-ect --work /tmp/bench_func \\
        --strategy 8P --sessions sub-pat01/ses-preECT
    python bench/bench_func.py bids_examples/ds-ect --work /tmp/bench_func --strategy 8P

The work directory is reused: a second call only re-runs what changed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import StageResult, print_table, run_stage

ATLAS = "Seitzman300"
SPACE = "MNI152NLin2009aSym"


def _atlas(work: Path):
    from pipeline.atlas import build_default_atlas, write_atlas
    from workflows.anat import AtlasFiles

    atlas = build_default_atlas()
    image = write_atlas(atlas, work)
    return AtlasFiles(atlas.name, image, image.parent / f"atlas-{atlas.name}_dseg.tsv")


def run_workflow(dataset: Path, sub: str, ses: str, work: Path, strategy: str, sloppy: bool,
                 fmriprep_dir: Path | None) -> str:
    """The functional workflow of one session; returns the output ``func`` folder."""
    from pipeline.bids import BoldRun, Session
    from pipeline.simulate.qsiprep import groundtruth_anatomy
    from workflows.func import init_func_wf

    stem = f"sub-{sub}_ses-{ses}"
    bold = dataset / f"sub-{sub}" / f"ses-{ses}" / "func" / f"{stem}_task-rest_bold.nii.gz"
    meta = json.loads(bold.with_name(bold.name.replace(".nii.gz", ".json")).read_text())
    run = BoldRun(bold, meta, {"subject": sub, "session": ses, "task": "rest"})
    out = work / "out"
    wf = init_func_wf(
        session=Session(sub, ses, None, 1, None, (), (run,), ()), bold_runs=[run],
        atlases=[_atlas(work.parent)], output_dir=out, strategy=strategy, fd_threshold=None,
        min_minutes=4.0, estimators=["pearson"], omp_nthreads=1, sloppy=sloppy, seed=42,
        fmriprep_dir=fmriprep_dir,
    )
    wf.base_dir = str(work / "work")
    anat = groundtruth_anatomy(dataset, sub, ses, work.parent / "anat" / stem)
    for field in ("t1w_preproc", "brain_mask", "wm", "csf"):
        setattr(wf.inputs.inputnode, field, str(getattr(anat, field)))
    gt = dataset / "derivatives" / "groundtruth" / f"sub-{sub}" / f"ses-{ses}" / "anat"
    wf.inputs.inputnode.to_mni = str(gt / f"{stem}_from-T1w_to-{SPACE}_mode-image_xfm.nii.gz")
    wf.run(plugin="Linear")
    return str(out / f"sub-{sub}" / f"ses-{ses}" / "func")


def nilearn_baseline(fmriprep_dir: Path, sub: str, ses: str, atlas_image: str,
                     strategy: str) -> np.ndarray:
    """Parcel FC with nilearn only, from the fMRIPrep-path inputs and the same strategy."""
    from nilearn import signal
    from nilearn.maskers import NiftiLabelsMasker

    from pipeline import denoise

    strat = denoise.load_strategy(strategy)
    func = fmriprep_dir / f"sub-{sub}" / f"ses-{ses}" / "func"
    stem = f"sub-{sub}_ses-{ses}_task-rest"
    bold = func / f"{stem}_space-{SPACE}_desc-preproc_bold.nii.gz"
    tr = json.loads((func / f"{stem}_space-{SPACE}_desc-preproc_bold.json").read_text())[
        "RepetitionTime"]
    conf = pd.read_csv(func / f"{stem}_desc-confounds_timeseries.tsv", sep="\t",
                       na_values="n/a")
    n_dummy = sum(c.startswith("non_steady_state_outlier") for c in conf.columns)
    conf = conf.iloc[n_dummy:].reset_index(drop=True)
    keep = denoise.censor_mask(conf["framewise_displacement"].to_numpy(float),
                               strat.fd_threshold, strat.min_segment)
    masker = NiftiLabelsMasker(atlas_image, mask_img=str(bold).replace(
        "desc-preproc_bold", "desc-brain_mask"), strategy="mean", resampling_target="data")
    ts = masker.fit_transform(str(bold))[n_dummy:]
    clean = signal.clean(
        ts, confounds=conf[list(denoise.select_confounds(strat, conf))].fillna(0).to_numpy(),
        sample_mask=np.flatnonzero(keep), t_r=tr, low_pass=strat.high_hz,
        high_pass=strat.low_hz, filter="butterworth", detrend=True, standardize=False,
    )
    return np.corrcoef(clean.T)


def _upper(m: np.ndarray) -> np.ndarray:
    return np.asarray(m, float)[np.triu_indices(len(m), 1)]


def score(func: Path, dataset: Path, sub: str, ses: str) -> dict[str, float]:
    """r with the planted FC, spike recall, volumes censored."""
    stem = f"sub-{sub}_ses-{ses}"
    prefix = func / f"{stem}_task-rest_space-{SPACE}_atlas-{ATLAS}"
    rel = pd.read_csv(f"{prefix}_stat-pearsoncorrelation_relmat.tsv", sep="\t", index_col=0)
    gt = dataset / "derivatives" / "groundtruth" / f"sub-{sub}" / f"ses-{ses}" / "func"
    planted = pd.read_csv(gt / f"{stem}_task-rest_atlas-{ATLAS}_desc-planted_stat-"
                          "pearsoncorrelation_relmat.tsv", sep="\t", index_col=0)
    truth = pd.read_csv(gt / f"{stem}_task-rest_desc-planted_outliers.tsv", sep="\t")
    outliers = pd.read_csv(f"{prefix}_outliers.tsv", sep="\t")
    spikes = truth["spike"].to_numpy() == 1
    a, b = _upper(rel.to_numpy()), _upper(planted.loc[rel.index, rel.columns].to_numpy())
    ok = np.isfinite(a)
    return {"r": float(np.corrcoef(a[ok], b[ok])[0, 1]),
            "spike_recall": float(outliers["censored"].to_numpy()[spikes].mean()),
            "n_censored": int(outliers["censored"].sum()), "edges": a}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--work", type=Path, required=True, help="reused work directory")
    parser.add_argument("--strategy", default="36P", help="built-in name or YAML path")
    parser.add_argument("--sessions", nargs="*", help="sub-X/ses-Y (default: all)")
    parser.add_argument("--no-sloppy", action="store_true", help="default registration")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args(argv)
    from pipeline.simulate.fmriprep import write_fmriprep_run

    dataset = args.dataset.resolve()
    strategy = str(Path(args.strategy).resolve()) if Path(args.strategy).exists() \
        else args.strategy
    found = sorted(dataset.glob("sub-*/ses-*/func/*_task-rest_bold.nii.gz"))
    pairs = [(p.parts[-4][4:], p.parts[-3][4:]) for p in found]
    if args.sessions:
        pairs = [(s, e) for s, e in pairs if f"sub-{s}/ses-{e}" in args.sessions]
    args.work.mkdir(parents=True, exist_ok=True)
    prep_root = args.work / "fmriprep"
    rows, stages = [], []
    for sub, ses in pairs:
        key = f"sub-{sub}_ses-{ses}"
        if not (prep_root / f"sub-{sub}" / f"ses-{ses}").exists():
            write_fmriprep_run(dataset, sub, ses, prep_root)
        raw: StageResult = run_stage(f"{key} workflow raw", run_workflow, dataset, sub, ses,
                                     args.work / key / "raw", strategy, not args.no_sloppy,
                                     None)
        prep = run_stage(f"{key} workflow fmriprep", run_workflow, dataset, sub, ses,
                         args.work / key / "fmriprep", strategy, True, prep_root)
        stages += [raw, prep]
        print(raw.row(), prep.row(), sep="\n", flush=True)  # progress on long runs
        s_raw, s_prep = (score(Path(x.value), dataset, sub, ses) for x in (raw, prep))
        row = {"session": key, "r_raw": s_raw["r"], "spike_recall": s_raw["spike_recall"],
               "censored": s_raw["n_censored"], "r_fmriprep": s_prep["r"],
               "r_raw_vs_fmriprep": np.corrcoef(s_raw["edges"], s_prep["edges"])[0, 1],
               "mean_abs_diff": np.abs(s_raw["edges"] - s_prep["edges"]).mean()}
        if not args.no_baseline:
            base = run_stage(f"{key} nilearn baseline", nilearn_baseline, prep_root, sub, ses,
                             str(_atlas(args.work).image), strategy)
            stages.append(base)
            print(base.row(), flush=True)
            gt = dataset / "derivatives" / "groundtruth" / f"sub-{sub}" / f"ses-{ses}" / "func"
            planted = pd.read_csv(gt / f"{key}_task-rest_atlas-{ATLAS}_desc-planted_stat-"
                                  "pearsoncorrelation_relmat.tsv", sep="\t", index_col=0)
            b = _upper(base.value)
            ok = np.isfinite(b)
            row["r_nilearn"] = np.corrcoef(b[ok], _upper(planted.to_numpy())[ok])[0, 1]
            row["time_ratio_fmriprep_vs_nilearn"] = prep.wall_s / base.wall_s
        rows.append(row)
    print_table(stages)
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
