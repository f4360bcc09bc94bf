"""Diffusion workflow of one session: preprocessing (or QSIPrep outputs), DTI and fibre
models, chunked tractography and structural connectomes for every atlas, with QC.

Spaces: preprocessing, models and tracking stay on the acquired DWI grid (the anatomical
tissue maps are resampled onto it, the QSIRecon approach); streamline end points are
mapped rigidly into the session's native T1w space and assigned to the native atlas, so
connectomes and the tractogram are ``space-T1w`` while the maps are ``space-dwi``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from pipeline import connectome, models, tractography
from pipeline.bids import DwiRun, Session
from pipeline.inputs import float32_gb
from workflows.anat import AtlasFiles
from workflows.engine import SessionSinks, Workflow
from workflows.interfaces.dwi import (
    QC_COLUMNS,
    STATISTICS,
    ConcatenateDwi,
    DetectOutliers,
    DwiQC,
    FitDiffusionModels,
    LoadQsiprep,
    PreprocessDwiRun,
    RegisterDwiToT1w,
    TrackConnectomes,
)

#: Fields of the ``inputnode``: the anatomical workflow's outputs for this session.
INPUT_FIELDS = ("t1w_preproc", "brain_mask", "gm", "wm", "csf", "atlas_native")

#: Fields of the ``outputnode``: one list of relmat TSVs (atlas order) per statistic, the
#: DTI maps and the QC table.
OUTPUT_FIELDS = (*STATISTICS, "fa", "md", "qc")

#: Default number of streamlines (``--streamlines``) and the one ``--sloppy`` uses.
DEFAULT_STREAMLINES = 1_000_000
SLOPPY_STREAMLINES = 20_000  # as pipeline.config

#: Seeds per tracking chunk: bounds memory (about 0.5 GB at 2 mm) whatever the count.
CHUNK_SIZE = 20_000

#: Rough memory of the heavy nodes (GB) for the scheduler.
_MEM_GB = {"concat": 2.0, "register": 1.0, "models": 4.0, "outliers": 3.0,
           "track": 2.0}


def _label(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_")


def find_qsiprep_dwi(qsiprep_dir: Path, session: Session) -> dict[str, str]:
    """QSIPrep's preprocessed DWI of a session: image, gradients, mask and confounds.

    QSIPrep writes one concatenated series per session,
    ``sub-X/ses-Y/dwi/sub-X_ses-Y[_...]_space-T1w_desc-preproc_dwi.nii.gz`` with ``.bval``
    and ``.bvec`` beside it, a ``desc-brain_mask`` and a ``desc-confounds_timeseries.tsv``.

    Raises
    ------
    FileNotFoundError
        Naming the folder searched, when there is no (or more than one) preprocessed DWI.
    """
    folder = Path(qsiprep_dir) / f"sub-{session.subject}"
    if session.label is not None:
        folder /= f"ses-{session.label}"
    folder /= "dwi"
    found = sorted(folder.glob(f"{session.name}*_space-T1w_desc-preproc_dwi.nii.gz"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{folder}: expected one *_space-T1w_desc-preproc_dwi.nii.gz from QSIPrep, found "
            f"{len(found)}; check --qsiprep-dir points to QSIPrep's output folder (or drop it "
            "to preprocess the raw DWI)"
        )
    stem = str(found[0]).removesuffix("_desc-preproc_dwi.nii.gz")
    files = {"in_file": str(found[0]), "bval": f"{stem}_desc-preproc_dwi.bval",
             "bvec": f"{stem}_desc-preproc_dwi.bvec"}
    for key in ("bval", "bvec"):
        if not Path(files[key]).exists():
            raise FileNotFoundError(f"{files[key]} missing beside {found[0]} (QSIPrep output)")
    mask = Path(f"{stem}_desc-brain_mask.nii.gz")
    if mask.exists():
        files["mask"] = str(mask)
    base = found[0].name.split("_space-")[0]
    confounds = folder / f"{base}_desc-confounds_timeseries.tsv"
    if confounds.exists():
        files["confounds"] = str(confounds)
    return files


def init_dwi_wf(
    *,
    session: Session,
    dwi_runs: Sequence[DwiRun],
    atlases: Sequence[AtlasFiles],
    output_dir: Path,
    n_streamlines: int = DEFAULT_STREAMLINES,
    tracking: str = "probabilistic",
    seeding: str = "wm",
    fod_model: str | None = None,
    save_tractogram: bool = False,
    omp_nthreads: int = 1,
    registration_nthreads: int = 1,
    sloppy: bool = False,
    seed: int = 42,
    qsiprep_dir: Path | None = None,
    stopping: str = tractography.DEFAULT_STOPPING,
    fa_threshold: float | None = None,
    assignment_radius: float = connectome.DEFAULT_RADIUS,
    denoise_method: str = "mppca",
    name: str | None = None,
) -> Workflow:
    """Build the diffusion workflow of one session.

    Parameters
    ----------
    session : Session
        The session (subject and session labels name the outputs).
    dwi_runs : sequence of DwiRun
        DWI runs of the session; each is corrected on its own, then they are concatenated.
    atlases : sequence of AtlasFiles
        Atlases, in the order of the ``atlas_native`` input list.
    output_dir : Path
        Derivatives root.
    n_streamlines : int
        Streamlines to keep (``--streamlines``).
    tracking : {"probabilistic", "deterministic"}
    seeding : {"wm", "gmwmi"}
        Seeds in white matter, or at the grey/white-matter interface.
    fod_model : {"auto", "msmt_csd", "csd", "csa"}, optional
        Override of the automatic choice (:func:`pipeline.models.choose_model`);
        ``None`` or ``"auto"`` keeps the automatic choice.
    save_tractogram : bool
        Also write the tractogram (TCK, T1w space; large).
    omp_nthreads : int
        Threads of the tracker and of the DTI/FOD fits.
    registration_nthreads : int
        Threads of the b0-to-T1w registration (1 keeps it bit-reproducible).
    sloppy : bool
        Cheap motion-correction and registration settings and no Gibbs unringing (the
        slowest preprocessing step; tests only).
    seed : int
        Seed of the registration sampling and of the tracking.
    qsiprep_dir : Path, optional
        Take QSIPrep's preprocessed DWI, gradients and mask as they are.
    stopping : {"threshold", "cmc", "act"}
        FA below ``fa_threshold`` (default; see :data:`pipeline.tractography.DEFAULT_STOPPING`
        for why), or a tissue-based criterion (continuous map criterion, anatomically
        constrained tractography).
    fa_threshold : float, optional
        For ``stopping="threshold"``; ``None`` takes it from the FA of grey matter
        (:func:`pipeline.tractography.gm_fa_threshold`).
    assignment_radius : float
        Radial search (mm) assigning streamline end points to parcels, as MRtrix3
        ``tck2connectome -assignment_radial_search``.
    denoise_method : {"mppca", "patch2self", "none"}
        Raw path only.
    name : str, optional
        Workflow name (default ``dwi_ses_<label>_wf``).

    Returns
    -------
    Workflow
        With an ``inputnode`` offering :data:`INPUT_FIELDS` (``atlas_native``: list of
        native-T1w label images in the order of ``atlases``) and an ``outputnode`` offering
        :data:`OUTPUT_FIELDS` (per statistic, a list of relmat TSVs in atlas order).
    """
    if not dwi_runs and not qsiprep_dir:
        raise ValueError(f"{session.name}: no DWI run to process")
    if not atlases:
        raise ValueError(f"{session.name}: structural connectomes need at least one atlas")
    if tracking not in tractography.ALGORITHMS:
        raise ValueError(f"--tracking {tracking!r}: choose from {tractography.ALGORITHMS}")
    if stopping not in tractography.STOPPING:
        raise ValueError(f"--stopping {stopping!r}: choose from {tractography.STOPPING}")
    if seeding not in ("wm", "gmwmi"):
        raise ValueError(f"--seeding {seeding!r}: choose 'wm' or 'gmwmi'")
    if fod_model == "auto":
        fod_model = None
    if fod_model is not None and fod_model not in models.FOD_MODELS:
        raise ValueError(f"--fod-model {fod_model!r}: choose from {models.FOD_MODELS}")
    if n_streamlines < 1:
        raise ValueError(f"--streamlines must be positive, got {n_streamlines}")
    if fa_threshold is not None and not 0 <= fa_threshold < 1:
        raise ValueError(f"FA threshold {fa_threshold}: must be in [0, 1), or None (from GM)")
    if assignment_radius <= 0:
        raise ValueError(f"assignment radius {assignment_radius} mm: must be positive")
    key = f"ses_{_label(session.label)}" if session.label else "single"
    workflow = Workflow(name=name or f"dwi_{key}_wf")
    workflow.__desc__ = _methods(
        n_runs=len(dwi_runs), qsiprep=bool(qsiprep_dir), tracking=tracking, seeding=seeding,
        stopping=stopping, n_streamlines=n_streamlines, denoise_method=denoise_method,
        fod_model=fod_model, unring=not sloppy, fa_threshold=fa_threshold,
        radius=assignment_radius,
    )
    inputnode = pe.Node(niu.IdentityInterface(fields=list(INPUT_FIELDS)), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=list(OUTPUT_FIELDS)), name="outputnode")
    sinks = SessionSinks(workflow, output_dir, session.bids_entities, "dwi")
    settings = "sloppy" if sloppy else "default"

    if qsiprep_dir:
        files = find_qsiprep_dwi(Path(qsiprep_dir), session)
        source = pe.Node(LoadQsiprep(**files), name="qsiprep_inputs")
        source.n_procs, source._mem_gb = 1, _MEM_GB["concat"]
    else:
        n = len(dwi_runs)
        merges = {f: pe.Node(niu.Merge(n), name=f"merge_{f}")
                  for f in ("out_file", "bval", "bvec", "motion")}
        for index, run in enumerate(dwi_runs, start=1):
            preproc = pe.Node(
                PreprocessDwiRun(in_file=str(run.path), bval=str(run.bval), bvec=str(run.bvec),
                                 denoise_method=denoise_method, settings=settings,
                                 unring=not sloppy),
                name=f"preproc_run_{index}",
            )
            # MP-PCA batches dominate: 2.70 GB peak for a 0.20 GB (float32) DWI run
            preproc.n_procs, preproc._mem_gb = 1, 0.8 + 10 * float32_gb(run.path)
            for field in merges:
                workflow.connect(preproc, field, merges[field], f"in{index}")
        source = pe.Node(ConcatenateDwi(), name="concat_runs")
        source.n_procs, source._mem_gb = 1, _MEM_GB["concat"]
        workflow.connect([
            (merges["out_file"], source, [("out", "in_files")]),
            (merges["bval"], source, [("out", "bvals")]),
            (merges["bvec"], source, [("out", "bvecs")]),
            (merges["motion"], source, [("out", "motion")]),
        ])  # fmt: skip

    register = pe.Node(RegisterDwiToT1w(settings=settings, seed=seed,
                                        num_threads=registration_nthreads),
                       name="register_dwi_t1w")
    register.n_procs, register._mem_gb = registration_nthreads, _MEM_GB["register"]
    fit = pe.Node(FitDiffusionModels(fod_model=fod_model), name="fit_models")
    fit.n_procs, fit._mem_gb = 1, _MEM_GB["models"]
    outliers = pe.Node(DetectOutliers(), name="detect_outliers")
    outliers.n_procs, outliers._mem_gb = 1, _MEM_GB["outliers"]
    track = pe.Node(
        TrackConnectomes(
            atlas_names=[a.name for a in atlases], atlas_tables=[str(a.table) for a in atlases],
            n_streamlines=n_streamlines, algorithm=tracking, seeding=seeding, stopping=stopping,
            fa_threshold=fa_threshold, assignment_radius=assignment_radius, seed=seed,
            chunk_size=CHUNK_SIZE, num_threads=omp_nthreads, save_tractogram=save_tractogram,
        ),
        name="track_connectomes",
    )
    track.n_procs, track._mem_gb = omp_nthreads, _MEM_GB["track"]
    qc = pe.Node(DwiQC(), name="dwi_qc")
    qc.n_procs, qc._mem_gb = 1, 0.2
    workflow.connect([
        (source, register, [("b0", "b0"), ("mask", "dwi_mask")]),
        (inputnode, register, [("t1w_preproc", "t1w"), ("brain_mask", "t1w_mask"),
                               ("gm", "gm"), ("wm", "wm"), ("csf", "csf")]),
        (source, fit, [("out_file", "in_file"), ("bval", "bval"), ("bvec", "bvec"),
                       ("mask", "mask")]),
        (register, fit, [("gm", "gm"), ("wm", "wm"), ("csf", "csf")]),
        (source, outliers, [("out_file", "in_file"), ("bval", "bval"), ("bvec", "bvec"),
                            ("mask", "mask")]),
        (fit, track, [("fod", "fod"), ("fa", "fa"), ("model", "model")]),
        (register, track, [("gm", "gm"), ("wm", "wm"), ("csf", "csf"),
                           ("dwi_to_t1w", "dwi_to_t1w")]),
        (inputnode, track, [("atlas_native", "atlas_native")]),
        (source, qc, [("motion", "motion")]),
        (outliers, qc, [("summary", "outliers")]),
        (register, qc, [("summary", "registration")]),
        (fit, qc, [("model", "model")]),
        (track, qc, [("report", "tracking"), ("qc", "connectome_qc")]),
    ])  # fmt: skip

    # maps on the DWI grid, with the model choice and its reason in the sidecar
    for field, param, what in (("fa", "fa", "DTI fractional anisotropy"),
                               ("md", "md", "DTI mean diffusivity (mm^2/s)")):
        meta = pe.Node(niu.Function(function=_map_meta, input_names=["model", "what"],
                                    output_names=["meta"]), name=f"meta_{param}")
        meta.inputs.what = what
        workflow.connect(fit, "model", meta, "model")
        sinks.add(fit, field, {"space": "dwi", "model": "dti", "param": param}, "dwimap",
                  ".nii.gz", meta_node=meta)
    # space-dwi is not a standard space: the FA map (same grid) defines it
    fa_map = sinks.path_of({"space": "dwi", "model": "dti", "param": "fa"}, "dwimap", ".nii.gz")
    sinks.add(source, "mask", {"space": "dwi"}, "mask", ".nii.gz", desc="brain",
              meta={"SpatialReference": fa_map})
    sinks.add(register, "itk_file", {"from": "dwi", "to": "T1w", "mode": "image"}, "xfm",
              ".txt", desc="coreg")
    if not qsiprep_dir:
        sinks.add(source, "motion", {}, "timeseries", ".tsv", desc="motion",
                  meta={"Description": "Per-volume rigid head motion of the DWI (volume -> "
                        "mean b=0; see pipeline.dwi.motion_correct)",
                        "Units": "mm, degrees"})
    sinks.add(outliers, "out_file", {}, "outliers", ".tsv",
              meta={"Description": "Per volume and slice residual against a robust tensor "
                    "prediction; 'outlier' marks signal dropout"})
    sinks.add(qc, "out_file", {"space": "T1w"}, "dwi", ".tsv", desc="qc",
              meta={k: {"Description": v} for k, v in QC_COLUMNS.items()})

    workflow.connect([
        (fit, outputnode, [("fa", "fa"), ("md", "md")]),
        (qc, outputnode, [("out_file", "qc")]),
    ])  # fmt: skip
    stats = list(STATISTICS)
    per_stat = {stat: pe.Node(niu.Merge(len(atlases)), name=f"merge_{stat}") for stat in stats}
    for stat, merge in per_stat.items():
        workflow.connect(merge, "out", outputnode, stat)
    for a_index, atlas in enumerate(atlases):
        for s_index, stat in enumerate(stats):
            position = a_index * len(stats) + s_index
            # one output per (atlas, statistic): TrackConnectomes lists them atlas-major
            pick = pe.Node(niu.Function(function=_pick, input_names=["files", "sidecars", "index"],
                                        output_names=["out_file", "meta"]),
                           name=f"pick_{_label(atlas.name)}_{stat}")
            pick.inputs.index = position
            workflow.connect([
                (track, pick, [("out_files", "files"), ("sidecars", "sidecars")]),
                (pick, per_stat[stat], [("out_file", f"in{a_index + 1}")]),
            ])  # fmt: skip
            sinks.add(pick, "out_file", {"space": "T1w", "atlas": atlas.name}, "relmat", ".tsv",
                      statistic=stat, meta_node=pick)
    if save_tractogram:
        sinks.add(track, "tractogram", {"space": "T1w"}, "streamlines", ".tck", desc=tracking,
                  meta={"Description": f"{tracking} tractography, world (RAS mm) coordinates "
                        "of the native T1w image", "RandomSeed": seed})
    return workflow


def _pick(files, sidecars, index):
    return files[index], sidecars[index]


def _map_meta(model, what):
    from workflows.interfaces.dwi import model_sidecar

    return model_sidecar(model, what)


def _methods(*, n_runs: int, qsiprep: bool, tracking: str, seeding: str, stopping: str,
             n_streamlines: int, denoise_method: str, fod_model: str | None,
             unring: bool = True, fa_threshold: float | None = None,
             radius: float = connectome.DEFAULT_RADIUS) -> str:
    if qsiprep:
        pre = ("The preprocessed DWI series, its rotated gradient table and brain mask were "
               "taken from QSIPrep [@qsiprep]. ")
    else:
        denoised = {
            "mppca": "denoised with Marchenko-Pastur PCA [@veraart2016] (DIPY's estimator, 5x5x5 "
                     "voxel patches), ",
            "patch2self": "denoised with Patch2Self [@patch2self] (DIPY [@dipy]), ",
            "none": "",
        }[denoise_method]
        pre = (
            f"Each DWI run was {denoised}"
            + ("corrected for Gibbs ringing by local sub-voxel shifts [@kellner2016], and "
               if unring else "")
            + "corrected for head motion by rigid registration "
            "(mutual information on a fixed regular sample of about 75,000 voxels; DIPY) "
            "of every volume to the mean b=0 image, rotating the "
            "b-vectors accordingly [@leemans2009]. "
            + ("The corrected runs were concatenated after matching their b=0 intensities. "
               if n_runs > 1 else "")
            + "A brain mask was computed from the mean b=0 image (median Otsu). Slices with "
            "signal dropout were detected against a robust tensor prediction for quality "
            "control. "
        )
    model = (f"fibre orientations were modelled with {fod_model} as requested"
             if fod_model else
             "fibre orientations were modelled with the model the acquisition supports: "
             "multi-shell multi-tissue CSD [@jeurissen2014] with several shells, single-shell "
             "CSD [@tournier2007] with >= 15 directions, constant-solid-angle Q-ball "
             "[@aganj2010] otherwise (the choice and its reason are in the sidecars)")
    seeds = ("uniformly in white matter" if seeding == "wm"
             else "at the grey/white-matter interface")
    low, high = tractography.FA_THRESHOLD_BOUNDS
    fa_stop = (f"FA below {fa_threshold:g}" if fa_threshold is not None else
               f"FA below that of grey matter (the {tractography.GM_FA_PERCENTILE:g}th "
               f"percentile of FA where the GM probability exceeds 0.5, within {low:g}-{high:g})")
    stop = {"cmc": "the continuous map criterion [@girard2014] from the tissue maps",
            "act": "anatomically constrained tractography [@smith2012] from the tissue maps",
            "threshold": fa_stop}[stopping]
    return (
        pre
        + "The mean b=0 image was registered rigidly to the T1w image (ANTs [@ants], mutual "
        "information) and the anatomical tissue probability maps were resampled onto the DWI "
        "grid. Diffusion tensors were fitted by weighted least squares (FA and MD maps) and "
        f"{model}. {tracking.capitalize()} tractography (DIPY [@dipy]) generated "
        f"{n_streamlines:,} streamlines seeded {seeds}, stopped by {stop}, with a fixed "
        "random seed. Streamline end points were assigned to the parcels "
        f"of each atlas in native T1w space by a {radius:g} mm radial search as MRtrix3 "
        "tck2connectome does [@mrtrix3], giving streamline count, count normalised by parcel "
        "volume, mean length and mean FA connectomes."
    )


#: Public names used by other modules (``workflows.base``) and the tests.
__all__ = ["DEFAULT_STREAMLINES", "INPUT_FIELDS", "OUTPUT_FIELDS", "SLOPPY_STREAMLINES",
           "find_qsiprep_dwi", "init_dwi_wf"]
