"""Top-level graph: one workflow per subject (sessions table, anatomy, then per-session work)."""

from __future__ import annotations

import re
from pathlib import Path

from nipype.pipeline import engine as pe

from pipeline.bids import Subject
from workflows.anat import AtlasFiles, init_anat_wf
from workflows.engine import Workflow
from workflows.interfaces import DerivativesSink, RecordsToTSV

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
    anat_reference: str = "unbiased",
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
        Atlases in template space; without any, no anatomical workflow is built.
    anat_reference : str
        ``unbiased``, ``first`` or ``sessionwise`` (see :func:`workflows.anat.init_anat_wf`).
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
            anat_reference=anat_reference,
            omp_nthreads=omp_nthreads,
            sloppy=sloppy,
            seed=seed,
        )
        workflow.add_nodes([subject_wf])
    return workflow


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


def init_single_subject_wf(
    *,
    subject: Subject,
    output_dir: Path,
    atlases: list[AtlasFiles],
    anat_reference: str = "unbiased",
    omp_nthreads: int = 1,
    sloppy: bool = False,
    seed: int = 42,
) -> Workflow:
    """Everything for one subject: its sessions table and the anatomical workflow."""
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

    anat_sessions = [s for s in subject.sessions if s.t1w]
    if atlases and anat_sessions:
        anat_wf = init_anat_wf(
            subject=subject.label,
            sessions=anat_sessions,
            atlases=atlases,
            output_dir=output_dir,
            anat_reference=anat_reference,
            omp_nthreads=omp_nthreads,
            sloppy=sloppy,
            seed=seed,
        )
        workflow.add_nodes([anat_wf])
    return workflow
