"""Functional-connectome workflow of one session: preprocessing (or fMRIPrep outputs),
parcellation, denoising, connectivity and QC, written with XCP-D's (BEP017) names."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from pipeline import connectivity, denoise
from pipeline.bids import BoldRun, Session
from pipeline.inputs import float32_gb
from pipeline.templates import DEFAULT_TEMPLATE
from workflows.anat import AtlasFiles
from workflows.engine import SessionSinks, Workflow
from workflows.interfaces.func import (
    OUTLIER_COLUMNS,
    BoldConfounds,
    CoregisterBold,
    DenoiseConnectivity,
    FMRIPrepInputs,
    ParcelSignals,
    RealignBold,
    ResampleToTemplate,
    find_fmriprep_run,
)

#: Fields of the ``inputnode`` (the anatomical workflow's per-session outputs).
INPUT_FIELDS = ("t1w_preproc", "brain_mask", "wm", "csf", "to_mni")

#: Fields of the ``outputnode``: one list (atlas order) per connectivity estimator, the
#: denoised parcel time series and the QC tables.
OUTPUT_FIELDS = (*connectivity.KINDS, "timeseries", "qc")

#: Recommended denoising strategy (6 motion parameters + mean WM and CSF signals, censoring
#: FD > 0.5 mm, 0.01-0.08 Hz band-pass); see :func:`init_func_wf` for why not 36P.
RECOMMENDED_STRATEGY = "8P"

_ENTITY_RE = re.compile(r"(?:^|_)(task|acq|dir|run|echo)-([a-zA-Z0-9]+)")


def run_entities(run: BoldRun | Path | str) -> dict[str, str]:
    """``task``/``acquisition``/``direction``/``run`` entities from a BOLD file name."""
    path = run.path if isinstance(run, BoldRun) else Path(run)
    keys = {"task": "task", "acq": "acquisition", "dir": "direction", "run": "run"}
    return {keys[k]: v for k, v in _ENTITY_RE.findall(path.name) if k in keys}


def _label(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_")


def init_func_wf(
    *,
    session: Session,
    bold_runs: Sequence[BoldRun],
    atlases: Sequence[AtlasFiles],
    output_dir: Path,
    strategy: str,
    fd_threshold: float | None = None,
    min_minutes: float = denoise.DEFAULT_MIN_MINUTES,
    estimators: Sequence[str] = ("pearson",),
    omp_nthreads: int = 1,
    registration_nthreads: int = 1,
    sloppy: bool = False,
    seed: int = 42,
    fmriprep_dir: Path | None = None,
    slice_timing: bool = False,
    save_bold: bool = False,
    name: str | None = None,
) -> Workflow:
    """Build the functional workflow of one session.

    Parameters
    ----------
    session : Session
        The session (subject and session labels name the outputs).
    bold_runs : sequence of BoldRun
        Resting-state runs of the session; denoised separately, then concatenated.
    atlases : sequence of AtlasFiles
        Atlases in template space (MNI152NLin2009aSym, any resolution).
    output_dir : Path
        Derivatives root.
    strategy : str
        Denoising strategy: built-in name (``36P``, ``24P``, ``acompcor``, ``acompcor_gsr``,
        ...) or a YAML path.  :data:`RECOMMENDED_STRATEGY` (8P) regresses the motion
        parameters and the WM and CSF means, which remove the physiological noise that
        leaks into grey matter, without global-signal regression (it removes shared neural
        signal) and without 36P's 36 regressors, which on short runs (122 volumes here,
        about 38 temporal degrees of freedom left in the 0.01-0.08 Hz band) take much of
        the signal with them.  Measured on bids_examples/ds-ect (9 sessions, r of the
        recovered with the planted FC): 8P 0.852-0.907, acompcor 0.829-0.882, 36P
        0.720-0.768, 24P 0.696-0.807.
    fd_threshold : float, optional
        Overrides the strategy's censoring threshold (mm); ``None`` keeps it.
    min_minutes : float
        Sessions with less uncensored data are flagged (``qc_pass`` 0, reason in sidecars).
    estimators : sequence of {"pearson", "partial", "ledoit_wolf"}
    omp_nthreads : int
        Threads of resampling nodes.
    registration_nthreads : int
        Threads of the BOLD-to-T1w registration (1 keeps it bit-reproducible).
    sloppy : bool
        Cheap registration settings (tests only).
    seed : int
        Seed of the registration sampling.
    fmriprep_dir : Path, optional
        Use fMRIPrep's ``space-MNI152NLin2009aSym`` (or ``MNI152NLin2009cAsym``)
        preprocessed BOLD and confounds instead of preprocessing here.
    slice_timing : bool
        Slice-timing correction from the ``SliceTiming`` metadata (raw path only).
    save_bold : bool
        Also write the template-space BOLD (large; raw path only).
    name : str, optional
        Workflow name (default ``func_ses_<label>_wf``).

    Returns
    -------
    Workflow
        With an ``inputnode`` offering :data:`INPUT_FIELDS` (``to_mni``: Transform JSON, or a
        ``mode-image`` coordinate map; unused on the fMRIPrep path) and an ``outputnode``
        offering :data:`OUTPUT_FIELDS` as lists in the order of ``atlases``.
    """
    if not bold_runs:
        raise ValueError(f"{session.name}: no BOLD run to process")
    unknown = set(estimators) - set(connectivity.KINDS)
    if unknown or not estimators:
        raise ValueError(f"--fc-estimators {sorted(unknown)}: choose from {connectivity.KINDS}")
    denoise.load_strategy(strategy)  # fail at build time on a bad strategy file
    key = f"ses_{_label(session.label)}" if session.label else "single"
    workflow = Workflow(name=name or f"func_{key}_wf")
    space = DEFAULT_TEMPLATE
    found = [find_fmriprep_run(fmriprep_dir, r.path) for r in bold_runs] if fmriprep_dir else []
    if found:
        space = found[0]["space"]
    workflow.__desc__ = _methods(strategy, fd_threshold, estimators, len(bold_runs),
                                 fmriprep=bool(fmriprep_dir), space=space,
                                 slice_timing=slice_timing)
    inputnode = pe.Node(niu.IdentityInterface(fields=list(INPUT_FIELDS)), name="inputnode")
    workflow.add_nodes([inputnode])  # present (and settable) on the fMRIPrep path too
    sinks = SessionSinks(workflow, output_dir, session.bids_entities, "func")
    settings = "sloppy" if sloppy else "default"
    ses_entities = {"task": run_entities(bold_runs[0]).get("task")}

    n = len(bold_runs)
    merges = {f: pe.Node(niu.Merge(n), name=f"merge_{f}") for f in ("confounds", "tr", "tsnr")}
    per_run_parcels = {a.name: pe.Node(niu.Merge(n), name=f"merge_ts_{a.name}") for a in atlases}
    per_run_dropped = {a.name: pe.Node(niu.Merge(n), name=f"merge_dropped_{a.name}")
                       for a in atlases}
    for index, run in enumerate(bold_runs, start=1):
        ents = run_entities(run)
        rkey = _label("_".join(f"{k}_{v}" for k, v in ents.items() if k != "task")) or "run"
        rkey = f"{rkey}_{index}"
        if fmriprep_dir:
            files = found[index - 1]
            inputs = pe.Node(FMRIPrepInputs(bold=files["bold"], confounds=files["confounds"],
                                            **({"mask": files["mask"]} if "mask" in files
                                               else {})), name=f"fmriprep_{rkey}")
            inputs.n_procs, inputs._mem_gb = 1, 2.0
            bold_src, bold_field = inputs, "bold"
            mask_src, mask_field = inputs, "mask"
            workflow.connect([
                (inputs, merges["confounds"], [("confounds", f"in{index}")]),
                (inputs, merges["tr"], [("repetition_time", f"in{index}")]),
                (inputs, merges["tsnr"], [("tsnr", f"in{index}")]),
            ])  # fmt: skip
        else:
            timing = run.metadata.get("SliceTiming") if slice_timing else None
            axis = {"i": 0, "j": 1, "k": 2}.get(
                str(run.metadata.get("SliceEncodingDirection", "k"))[0], 2)
            realign = pe.Node(
                RealignBold(in_file=str(run.path), repetition_time=run.repetition_time,
                            slice_axis=axis, **({"slice_timing": timing} if timing else {})),
                name=f"realign_{rkey}",
            )
            # measured 2.70-2.85 GB peak for a 0.89 GB (float32) BOLD (bench_subject.py)
            realign.n_procs, realign._mem_gb = 1, 0.5 + 2.6 * float32_gb(run.path)
            coreg = pe.Node(CoregisterBold(settings=settings, seed=seed,
                                           num_threads=registration_nthreads),
                            name=f"coreg_{rkey}")
            coreg.n_procs, coreg._mem_gb = registration_nthreads, 1.0
            to_mni = pe.Node(ResampleToTemplate(num_threads=omp_nthreads), name=f"to_mni_{rkey}")
            to_mni.n_procs, to_mni._mem_gb = omp_nthreads, 2.0
            conf = pe.Node(BoldConfounds(), name=f"confounds_{rkey}")
            # measured 3.27-3.29 GB peak for the same 0.89 GB BOLD
            conf.n_procs, conf._mem_gb = 1, 0.5 + 3.2 * float32_gb(run.path)
            workflow.connect([
                (realign, coreg, [("boldref", "boldref")]),
                (inputnode, coreg, [("t1w_preproc", "t1w"), ("brain_mask", "t1w_mask")]),
                (realign, to_mni, [("motion_file", "motion_file")]),
                (coreg, to_mni, [("t1w_to_bold", "t1w_to_bold")]),
                (inputnode, to_mni, [("to_mni", "to_mni"), ("brain_mask", "brain_mask"),
                                     ("wm", "wm"), ("csf", "csf")]),
                (to_mni, conf, [("bold", "bold"), ("mask", "mask"), ("wm", "wm"),
                                ("csf", "csf")]),
                (realign, conf, [("motion_file", "motion_file"), ("n_dummy", "n_dummy"),
                                 ("repetition_time", "repetition_time")]),
                (conf, merges["confounds"], [("confounds_file", f"in{index}")]),
                (realign, merges["tr"], [("repetition_time", f"in{index}")]),
                (conf, merges["tsnr"], [("tsnr", f"in{index}")]),
            ])  # fmt: skip
            if timing:
                workflow.connect(realign, "stc_file", to_mni, "in_file")
            else:
                to_mni.inputs.in_file = str(run.path)
            bold_src, bold_field = to_mni, "bold"
            mask_src, mask_field = to_mni, "mask"
            run_ents = {**ents}
            sinks.add(conf, "confounds_file", run_ents, "timeseries", ".tsv",
                      meta_field="confounds_meta", desc="confounds")
            sinks.add(realign, "motion_file", run_ents, "timeseries", ".tsv", desc="motion",
                      meta={"Description": "Head-motion parameters (volume -> reference; "
                            "see pipeline.motion)", "Units": "mm, rad"})
            sinks.add(coreg, "itk_file", {**run_ents, "from": "boldref", "to": "T1w",
                                          "mode": "image"}, "xfm", ".txt", desc="coreg")
            sinks.add(to_mni, "mask", {**run_ents, "space": space}, "mask", ".nii.gz",
                      desc="brain")
            if save_bold:
                sinks.add(to_mni, "bold", {**run_ents, "space": space}, "bold", ".nii",
                          desc="preproc")

        for atlas in atlases:
            parcels = pe.Node(
                ParcelSignals(atlas_image=str(atlas.image), atlas_table=str(atlas.table)),
                name=f"parcels_{atlas.name}_{rkey}",
            )
            parcels.n_procs, parcels._mem_gb = 1, 2.0
            workflow.connect([
                (bold_src, parcels, [(bold_field, "bold")]),
                (mask_src, parcels, [(mask_field, "mask")]),
                (parcels, per_run_parcels[atlas.name], [("timeseries", f"in{index}")]),
                (parcels, per_run_dropped[atlas.name], [("dropped", f"in{index}")]),
            ])  # fmt: skip
            if index == 1:
                sinks.add(parcels, "coverage", {**ents, "space": space, "atlas": atlas.name},
                          "bold", ".tsv", statistic="coverage",
                          meta={"Node": {"Description": "Parcel name"},
                                "coverage": {"Description": "Fraction of the parcel's voxels "
                                             "inside the BOLD brain mask"}})

    outputnode = pe.Node(niu.IdentityInterface(fields=list(OUTPUT_FIELDS)), name="outputnode")
    collected = ["timeseries", "qc", *estimators]
    per_atlas = {f: pe.Node(niu.Merge(len(atlases)), name=f"collect_{f}") for f in collected}
    for field_name, merge in per_atlas.items():
        workflow.connect(merge, "out", outputnode, field_name)
    for a_index, atlas in enumerate(atlases, start=1):
        flatten = pe.Node(niu.Function(function=_flatten, input_names=["lists"],
                                       output_names=["out"]), name=f"dropped_{atlas.name}")
        node_files = [f"atlas-{atlas.name}/{Path(atlas.image).name}",
                      f"atlas-{atlas.name}/{Path(atlas.table).name}"]
        dn = pe.Node(
            DenoiseConnectivity(
                strategy=strategy, min_minutes=min_minutes, estimators=list(estimators),
                atlas=atlas.name, node_files=node_files,
                extra_meta={"Space": space, "Sources": [str(r.path.name) for r in bold_runs]},
                **({"fd_threshold": fd_threshold} if fd_threshold is not None else {}),
            ),
            name=f"connectivity_{atlas.name}",
        )
        dn.n_procs, dn._mem_gb = 1, 0.5
        workflow.connect([
            (per_run_parcels[atlas.name], dn, [("out", "timeseries")]),
            (per_run_dropped[atlas.name], flatten, [("out", "lists")]),
            (flatten, dn, [("out", "dropped")]),
            (merges["confounds"], dn, [("out", "confounds")]),
            (merges["tr"], dn, [("out", "repetition_times")]),
            (merges["tsnr"], dn, [("out", "tsnr")]),
        ])  # fmt: skip
        for field_name, merge in per_atlas.items():
            workflow.connect(dn, field_name, merge, f"in{a_index}")
        a_ents = {**ses_entities, "space": space, "atlas": atlas.name}
        sinks.add(dn, "timeseries", a_ents, "timeseries", ".tsv", statistic="mean",
                  meta_field="timeseries_meta")
        for kind in estimators:
            sinks.add(dn, kind, a_ents, "relmat", ".tsv",
                      statistic=connectivity.STAT_LABELS[kind], meta_field=f"{kind}_meta")
            sinks.add(dn, f"{kind}_z", a_ents, "relmat", ".tsv", desc="fisherz",
                      statistic=connectivity.STAT_LABELS[kind], meta_field=f"{kind}_z_meta")
        sinks.add(dn, "qc", a_ents, "bold", ".tsv", desc="qc", meta_field="qc_meta")
        sinks.add(dn, "outliers", a_ents, "outliers", ".tsv",
                  meta={k: {"Description": v} for k, v in OUTLIER_COLUMNS.items()})
    return workflow


def _flatten(lists):
    out = []
    for item in lists:
        out.extend(item if isinstance(item, list) else [item])
    return sorted(set(out))


def _methods(strategy: str, fd_threshold: float | None, estimators: Sequence[str], n_runs: int,
             *, fmriprep: bool, space: str, slice_timing: bool) -> str:
    strat = denoise.load_strategy(strategy)
    fd = strat.fd_threshold if fd_threshold is None else fd_threshold
    if fmriprep:
        pre = (f"Preprocessed BOLD runs in {space} space and their confound tables were taken "
               "from fMRIPrep [@fmriprep1]. ")
    else:
        pre = (
            "Initial non-steady-state volumes were detected from the global signal (modified "
            "z-score, as Nipype's NonSteadyStateDetector) and excluded from the analysis. "
            + ("Slice-timing differences were corrected by cubic-spline interpolation to the "
               "middle of each TR. " if slice_timing else "")
            + "Head motion was estimated by rigid realignment of every volume to the first "
            "steady-state volume (Gauss-Newton least squares on B-spline interpolated "
            "intensities). The mean realigned volume was registered to the T1w image with a "
            "rigid transform maximising mutual information (ANTs [@ants]). Each volume was "
            f"then resampled into {space} space in a single interpolation step (cubic "
            "B-splines) composing its head-motion, the BOLD-to-T1w and the T1w-to-template "
            "transforms, at the BOLD voxel size (2 mm at the finest). Confounds were computed "
            "as fMRIPrep does [@fmriprep1]: framewise displacement [@power2012], DVARS "
            "[@power2012], global, white-matter and CSF mean signals with their temporal "
            "derivatives and quadratic terms [@satterthwaite2013], and anatomical CompCor "
            "components [@behzadi2007] from eroded white-matter and CSF masks. "
        )
    kinds = ", ".join(connectivity.MEASURES[k] for k in estimators)
    if set(estimators) & {"partial", "ledoit_wolf"}:
        kinds += " (Ledoit-Wolf shrinkage [@ledoitwolf2004])"
    runs = ("Runs were denoised separately and concatenated. " if n_runs > 1 else "")
    return (
        pre
        + "Atlases were resampled to the BOLD grid with nearest-neighbour interpolation and "
        "the mean BOLD signal of every parcel was extracted (parcels with less than 50 % of "
        "their voxels inside the brain mask were left empty). Because denoising is linear, it "
        f"was applied to the parcel time series with the '{strat.name}' strategy, following "
        f"XCP-D [@xcpd]: {strat.methods_text() or strat.description} "
        + (f"Volumes with framewise displacement above {fd} mm were censored. " if fd else "")
        + runs
        + f"Functional connectivity was estimated as {kinds}; matrices are stored as "
        "correlations (as XCP-D does) and, separately, Fisher z-transformed (arctanh). "
        "Sessions with less than the required minutes of uncensored data were flagged."
    )
