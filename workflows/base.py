"""Top-level graph: one workflow per subject, one per session inside it."""

from __future__ import annotations

import re
from pathlib import Path

from nipype.pipeline import engine as pe

from pipeline.bids import Session, Subject
from workflows.engine import Workflow
from workflows.interfaces import CheckInput, DerivativesSink, RecordsToTSV

SESSION_COLUMNS = {
    "session_id": "Session label with its 'ses-' prefix.",
    "role": "Treatment phase: pre, post or maintenance (empty when cross-sectional).",
    "order": "Position of the session in the subject's timeline, from 1.",
    "acq_time": "Acquisition time from the input sessions.tsv, when given.",
    "n_t1w": "Number of T1w images found.",
    "n_bold": "Number of resting-state BOLD runs found.",
    "n_dwi": "Number of DWI runs found.",
    "missing": "Modalities absent from the session (comma-separated), processed without them.",
}


def node_label(*parts: str | None) -> str:
    """A Nipype-safe name from BIDS labels (``sub-01``, ``run-1`` -> ``sub_01_run_1``)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", "_".join(p for p in parts if p)).strip("_")


def _run_label(entities: dict) -> str:
    keys = ("task", "acquisition", "direction", "run")
    return (
        node_label(*(f"{k[:4]}-{entities[k]}" for k in keys if entities.get(k) is not None))
        or "run"
    )


def init_trajectome_wf(
    *,
    subjects: list[Subject],
    output_dir: Path,
    version: str,
    omp_nthreads: int = 1,
    sloppy: bool = False,
) -> Workflow:
    """Build the participant-level workflow for every subject.

    Parameters
    ----------
    subjects : list of pipeline.bids.Subject
        The session model of the selected subjects.
    output_dir : Path
        Derivatives root.
    version : str
        Trajectome version; the workflow name carries major.minor so a work directory
        left by another version is never reused.
    omp_nthreads : int
        Threads per process for multithreaded nodes.
    sloppy : bool
        Cheap settings for tests.
    """
    major_minor = "_".join(version.split(".")[:2])
    workflow = Workflow(name=node_label(f"trajectome_{major_minor}_wf"))
    workflow.__desc__ = (
        f"Results were generated with *Trajectome* {version} [@trajectome], a BIDS-App built on "
        "*Nipype* [@nipype1] that follows functional and structural connectomes across the "
        "sessions of a longitudinal study. BIDS inputs were indexed with *PyBIDS* [@pybids]."
    )
    for subject in subjects:
        workflow.add_nodes(
            [
                init_single_subject_wf(
                    subject=subject, output_dir=output_dir, omp_nthreads=omp_nthreads, sloppy=sloppy
                )
            ]
        )
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
    *, subject: Subject, output_dir: Path, omp_nthreads: int = 1, sloppy: bool = False
) -> Workflow:
    """Everything for one subject: the sessions table and one workflow per session."""
    workflow = Workflow(name=node_label(f"sub_{subject.label}_wf"))
    sessions_tsv = pe.Node(
        RecordsToTSV(
            records=session_records(subject), columns=list(SESSION_COLUMNS), out_name="sessions.tsv"
        ),
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
    for session in subject.sessions:
        workflow.add_nodes(
            [
                init_session_wf(
                    session=session, output_dir=output_dir, omp_nthreads=omp_nthreads, sloppy=sloppy
                )
            ]
        )
    return workflow


def init_session_wf(
    *, session: Session, output_dir: Path, omp_nthreads: int = 1, sloppy: bool = False
) -> Workflow:
    """One session: every input file is checked on its own, so one bad run fails alone."""
    workflow = Workflow(
        name=node_label(f"ses_{session.label}_wf" if session.label else "session_wf")
    )
    for index, t1w in enumerate(session.t1w):
        node = pe.Node(CheckInput(modality="anat", in_file=str(t1w)), name=f"check_t1w_{index}")
        workflow.add_nodes([node])
    for run in session.bold:
        node = pe.Node(
            CheckInput(modality="func", in_file=str(run.path), metadata=dict(run.metadata)),
            name=f"check_bold_{_run_label(run.entities)}",
        )
        workflow.add_nodes([node])
    for run in session.dwi:
        node = pe.Node(
            CheckInput(
                modality="dwi", in_file=str(run.path), bval=str(run.bval), bvec=str(run.bvec)
            ),
            name=f"check_dwi_{_run_label(run.entities)}",
        )
        workflow.add_nodes([node])
    return workflow
