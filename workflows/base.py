"""Top-level graph: one workflow per subject (sessions table, anatomy, then per-session work)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from pipeline.bids import Session, Subject
from workflows.anat import AtlasFiles, init_anat_wf
from workflows.engine import Workflow
from workflows.interfaces import DerivativesSink, RecordsToTSV
from workflows.interfaces.metrics import SessionMetrics


@dataclass(frozen=True)
class FuncOptions:
    """Options of the functional-connectome workflow (see :func:`workflows.func.init_func_wf`)."""

    strategy: str = "8P"
    fd_threshold: float | None = None
    min_minutes: float = 4.0
    estimators: tuple[str, ...] = ("pearson",)
    slice_timing: bool = False
    save_bold: bool = False
    fmriprep_dir: Path | None = None


@dataclass(frozen=True)
class DwiOptions:
    """Options of the diffusion-connectome workflow (see :func:`workflows.dwi.init_dwi_wf`)."""

    n_streamlines: int = 1_000_000
    tracking: str = "probabilistic"
    seeding: str = "wm"
    fod_model: str = "auto"
    stopping: str = "threshold"
    save_tractogram: bool = False
    qsiprep_dir: Path | None = None


@dataclass(frozen=True)
class MetricOptions:
    """Options of the per-session metrics (see :mod:`pipeline.session_metrics`)."""

    graph_density: float | None = None
    n_boot: int = 100
    n_consensus: int = 100


@dataclass(frozen=True)
class Options:
    """What to process and how: everything the subject workflows need besides the data."""

    modalities: tuple[str, ...] = ("anat", "func", "dwi")
    anat_reference: str = "unbiased"
    #: Threads of each ANTs registration: more is faster but not bit-reproducible.
    registration_nthreads: int = 1
    func: FuncOptions = field(default_factory=FuncOptions)
    dwi: DwiOptions = field(default_factory=DwiOptions)
    metrics: MetricOptions = field(default_factory=MetricOptions)

SESSION_COLUMNS = {
    "session_id": "Session label with its 'ses-' prefix.",
    "role": "Treatment phase: pre, post or maintenance (empty when cross-sectional).",
    "order": "Position of the session in the subject's timeline, from 1.",
    "acq_time": "Acquisition time from the input sessions.tsv, when given.",
    "n_t1w": "Number of usable T1w images.",
    "n_bold": "Number of usable resting-state BOLD runs.",
    "n_dwi": "Number of usable DWI runs.",
    "missing": "Modalities absent or unusable in the session (comma-separated).",
}


def node_label(*parts: str | None) -> str:
    """A Nipype-safe name from BIDS labels (``sub-01``, ``run-1`` -> ``sub_01_run_1``)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", "_".join(p for p in parts if p)).strip("_")


def init_trajectome_wf(
    *,
    subjects: list[Subject],
    output_dir: Path,
    version: str,
    atlases: list[AtlasFiles] | None = None,
    options: Options | None = None,
    omp_nthreads: int = 1,
    sloppy: bool = False,
    seed: int = 42,
) -> Workflow:
    """Build the participant-level workflow for every subject.

    Parameters
    ----------
    subjects : list of pipeline.bids.Subject
        The session model of the selected subjects, holding only usable input files.
    output_dir : Path
        Derivatives root.
    version : str
        Trajectome version; the workflow name carries major.minor so a work directory
        left by another version is never reused.
    atlases : list of AtlasFiles, optional
        Atlases in template space; without any, only the sessions tables are built.
    options : Options, optional
        Modalities and per-workflow options (defaults: everything, default settings).
    omp_nthreads : int
        Threads per process for multithreaded nodes.
    sloppy : bool
        Cheap settings for tests.
    seed : int
        Seed of everything stochastic.
    """
    major_minor = "_".join(version.split(".")[:2])
    workflow = Workflow(name=node_label(f"trajectome_{major_minor}_wf"))
    workflow.__desc__ = (
        f"Results were generated with *Trajectome* {version} [@trajectome], a BIDS-App built on "
        "*Nipype* [@nipype1] that follows functional and structural connectomes across the "
        "sessions of a longitudinal study. BIDS inputs were indexed with *PyBIDS* [@pybids]."
    )
    for subject in subjects:
        subject_wf = init_single_subject_wf(
            subject=subject,
            output_dir=output_dir,
            atlases=atlases or [],
            options=options or Options(),
            omp_nthreads=omp_nthreads,
            sloppy=sloppy,
            seed=seed,
        )
        workflow.add_nodes([subject_wf])
    if atlases:
        opts = options or Options()
        workflow.__postdesc__ = metrics_methods(opts.metrics, opts.modalities, seed)
    return workflow


def metrics_methods(options: MetricOptions, modalities: Sequence[str], seed: int) -> str:
    """Methods paragraph of the session metrics and the subject-level trajectories."""
    density = (f"proportionally thresholded to a density of {options.graph_density:g} "
               if options.graph_density else "kept weighted without a threshold ")
    text = (
        "Network measures were computed for every session and atlas with functions that "
        "reproduce the Brain Connectivity Toolbox [@rubinov2010]: the mean connectivity "
        "within and between the atlas's networks (signed, on the stored matrices) and "
        "connectivity of hippocampal, amygdala and subgenual cingulate parcels where the atlas has "
        "them; graph measures on the positive weights, " + density + "(SC scaled to a "
        "maximum of 1): node strength, global and local efficiency [@latora2001], the "
        "weighted clustering coefficient [@onnela2005], modularity from Louvain [@blondel2008] "
        f"with a consensus over {options.n_consensus} runs [@lancichinetti2012] (seed "
        f"{seed}), participation coefficient and within-module degree z-score "
        "[@guimera2005]. "
    )
    if {"func", "dwi"} <= set(modalities):
        text += (
            "Structure-function coupling was measured per region as the Spearman "
            "correlation between its SC and FC profiles over its structurally connected "
            "regions [@baum2020] and as the adjusted R^2 of FC regressed on Euclidean "
            "distance, shortest-path length and communicability [@vazquezrodriguez2019; "
            "@estrada2008], and within each network as the SC-FC correlation over its "
            "structurally connected pairs (Spearman) and over all its pairs (Pearson) "
            "[@honey2009]. "
        )
    if "anat" in modalities:
        text += "Regional volumes are the Jacobian-integrated parcel volumes described above. "
    errors = {
        "func": "a moving-block bootstrap of the parcel time series for FC "
                f"({options.n_boot} replicates, block length n^(1/3) volumes, at least 5 "
                "[@kunsch1989])",
        "dwi": "multinomial resampling of the streamlines for SC",
        "anat": "the registration noise floor across parcels for volumes",
    }
    sources = [errors[m] for m in ("func", "dwi", "anat") if m in modalities]
    if {"func", "dwi"} <= set(modalities):
        sources.insert(2, "both of the former for coupling")
    text += (
        "Each value carries a within-session standard error, from " + "; ".join(sources)
        + ". For every subject, each metric's acute change "
        "(post-ECT - pre-ECT), maintenance change (maintenance - post-ECT) and retention "
        "were computed, and the maintenance phase was classified as regression toward "
        "pre-ECT, stabilisation or continued remodelling by the posterior probability that "
        "the ratio of the true maintenance to acute change lies below -0.25, within "
        "+/-0.25 or above 0.25, given those standard errors."
    )
    return text


def session_records(subject: Subject) -> list[dict]:
    """Rows of the subject's derivative ``sessions.tsv``."""
    return [
        {
            "session_id": f"ses-{s.label}" if s.label else "n/a",
            "role": s.role or "",
            "order": s.order,
            "acq_time": s.acq_time or "",
            "n_t1w": len(s.t1w),
            "n_bold": len(s.bold),
            "n_dwi": len(s.dwi),
            "missing": ",".join(s.missing_modalities),
        }
        for s in subject.sessions
    ]


def anatomy_session(subject: Subject, session: Session) -> Session | None:
    """The session whose T1w serves ``session``: itself, else the nearest in time with one.

    A session holding only BOLD or DWI still gets connectomes, coregistered to the same
    subject's anatomy from another session (ties go to the earlier session).
    """
    if session.t1w:
        return session
    candidates = [s for s in subject.sessions if s.t1w]
    if not candidates:
        return None
    return min(candidates, key=lambda s: (abs(s.order - session.order), s.order))


def anatomy_needed(options: Options) -> bool:
    """Whether the requested modalities need the anatomical workflow.

    ``anat`` itself, ``dwi`` (both the raw and the QSIPrep paths use the T1w, tissues and
    native atlas) and ``func`` from raw BOLD (coregistration and MNI resampling) do; ``func``
    from fMRIPrep derivatives alone does not (already in template space).
    """
    modalities = set(options.modalities)
    raw_func = "func" in modalities and options.func.fmriprep_dir is None
    return bool(modalities & {"anat", "dwi"}) or raw_func


def _session_key(session: Session) -> str:
    return f"ses_{node_label(session.label)}" if session.label else "single"


def init_single_subject_wf(
    *,
    subject: Subject,
    output_dir: Path,
    atlases: list[AtlasFiles],
    options: Options | None = None,
    omp_nthreads: int = 1,
    sloppy: bool = False,
    seed: int = 42,
) -> Workflow:
    """Everything for one subject: sessions table, anatomy, connectomes and metrics per session.

    Sessions without a T1w of their own use the nearest session's anatomy
    (:func:`anatomy_session`); a subject without any T1w gets functional connectomes
    only from fMRIPrep derivatives (the raw paths need the anatomy) and no structural
    connectome. The anatomy is built only when a requested modality needs it
    (:func:`anatomy_needed`): ``--modalities func`` with fMRIPrep derivatives skips it.
    """
    options = options or Options()
    workflow = Workflow(name=node_label(f"sub_{subject.label}_wf"))
    records = session_records(subject)
    sessions_tsv = pe.Node(
        RecordsToTSV(records=records, columns=list(SESSION_COLUMNS), out_name="sessions.tsv"),
        name="sessions_tsv",
    )
    ds_sessions = pe.Node(
        DerivativesSink(
            base_directory=str(output_dir),
            entities={"subject": subject.label},
            suffix="sessions",
            extension=".tsv",
            meta_dict={key: {"Description": text} for key, text in SESSION_COLUMNS.items()},
        ),
        name="ds_sessions",
        run_without_submitting=True,
    )
    workflow.connect(sessions_tsv, "out_file", ds_sessions, "in_file")
    if not atlases:
        return workflow

    anat_sessions = [s for s in subject.sessions if s.t1w]
    anat_wf = None
    if anat_sessions and anatomy_needed(options):
        anat_wf = init_anat_wf(
            subject=subject.label,
            sessions=anat_sessions,
            atlases=atlases,
            output_dir=output_dir,
            anat_reference=options.anat_reference,
            omp_nthreads=omp_nthreads,
            registration_nthreads=options.registration_nthreads,
            sloppy=sloppy,
            seed=seed,
        )
        workflow.add_nodes([anat_wf])

    for session in subject.sessions:
        source = anatomy_session(subject, session)
        anat_out = f"outputnode_{_session_key(source)}" if source and anat_wf else None
        func_wf = dwi_wf = None
        fopt, dopt = options.func, options.dwi
        if "func" in options.modalities and session.bold and (anat_out or fopt.fmriprep_dir):
            from workflows.func import INPUT_FIELDS, init_func_wf

            func_wf = init_func_wf(
                session=session, bold_runs=list(session.bold), atlases=atlases,
                output_dir=output_dir, strategy=fopt.strategy, fd_threshold=fopt.fd_threshold,
                min_minutes=fopt.min_minutes, estimators=list(fopt.estimators),
                omp_nthreads=omp_nthreads, registration_nthreads=options.registration_nthreads,
                sloppy=sloppy, seed=seed, fmriprep_dir=fopt.fmriprep_dir,
                slice_timing=fopt.slice_timing, save_bold=fopt.save_bold,
                name=f"func_{_session_key(session)}_wf",
            )
            if anat_out:
                for name in INPUT_FIELDS:
                    workflow.connect(anat_wf, f"{anat_out}.{name}", func_wf, f"inputnode.{name}")
        if "dwi" in options.modalities and session.dwi and anat_out:
            from workflows.dwi import init_dwi_wf

            dwi_wf = init_dwi_wf(
                session=session, dwi_runs=list(session.dwi), atlases=atlases,
                output_dir=output_dir, n_streamlines=dopt.n_streamlines,
                tracking=dopt.tracking, seeding=dopt.seeding, fod_model=dopt.fod_model,
                stopping=dopt.stopping, save_tractogram=dopt.save_tractogram,
                omp_nthreads=omp_nthreads, registration_nthreads=options.registration_nthreads,
                sloppy=sloppy, seed=seed, qsiprep_dir=dopt.qsiprep_dir,
                name=f"dwi_{_session_key(session)}_wf",
            )
            for name in ("t1w_preproc", "brain_mask", "gm", "wm", "csf", "atlas_native"):
                workflow.connect(anat_wf, f"{anat_out}.{name}", dwi_wf, f"inputnode.{name}")
        own_anat = session.t1w and anat_wf is not None
        if func_wf or dwi_wf or own_anat:
            _add_session_metrics(
                workflow, session=session, atlases=atlases, output_dir=output_dir,
                anat_wf=anat_wf if own_anat else None, anat_out=anat_out,
                func_wf=func_wf, dwi_wf=dwi_wf, options=options.metrics, seed=seed,
            )
    return workflow


def _add_session_metrics(
    workflow: Workflow, *, session: Session, atlases: list[AtlasFiles], output_dir: Path,
    anat_wf: Workflow | None, anat_out: str | None, func_wf: Workflow | None,
    dwi_wf: Workflow | None, options: MetricOptions, seed: int,
) -> None:
    """One SessionMetrics node per atlas, fed by whatever the session produced."""
    key = _session_key(session)
    for index, atlas in enumerate(atlases):
        node = pe.Node(
            SessionMetrics(atlas_table=str(atlas.table), graph_density=options.graph_density,
                           n_boot=options.n_boot, n_consensus=options.n_consensus, seed=seed),
            name=f"metrics_{node_label(atlas.name)}_{key}",
        )
        node.n_procs, node._mem_gb = 1, 1.0
        sources = []
        if func_wf is not None:
            sources += [(func_wf, "outputnode.pearson", "fc_relmat"),
                        (func_wf, "outputnode.timeseries", "fc_timeseries")]
        if dwi_wf is not None:
            sources += [(dwi_wf, "outputnode.volumenormalizedcount", "sc_relmat"),
                        (dwi_wf, "outputnode.streamlinecount", "sc_counts")]
        if anat_wf is not None:
            sources += [(anat_wf, f"{anat_out}.volumes", "volumes")]
        for source, field_name, target in sources:
            pick = pe.Node(niu.Select(index=[index]), name=f"pick_{target}_{node.name}")
            workflow.connect([
                (source, pick, [(field_name, "inlist")]),
                (pick, node, [("out", target)]),
            ])  # fmt: skip
        sink = pe.Node(
            DerivativesSink(
                base_directory=str(output_dir),
                entities={**session.bids_entities, "atlas": atlas.name, "desc": "network"},
                suffix="metrics",
                extension=".tsv",
            ),
            name=f"ds_{node.name}",
            run_without_submitting=True,
        )
        workflow.connect([
            (node, sink, [("out_file", "in_file"), ("out_meta", "meta_dict")]),
        ])  # fmt: skip
