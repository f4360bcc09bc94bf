"""The ``trajectome`` command: BIDS_DIR OUTPUT_DIR {participant,group}."""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

import tomli_w

from pipeline import derivatives
from pipeline.atlas import AtlasError, resolve_atlas, write_atlas
from pipeline.bids import BIDSInputError, Subject, collect_subjects
from pipeline.config import Config, ConfigError, dependency_versions, package_version, parse_args
from pipeline.group import (
    GroupInputError,
    has_session_metrics,
    write_group_outputs,
    write_group_sessions,
    write_participants,
    write_subject_outputs,
)
from pipeline.inputs import preflight_session
from pipeline.validation import BIDSValidationError, ValidatorError, check_bids
from workflows.anat import AtlasFiles
from workflows.run import Failure

LOGGER = logging.getLogger("trajectome")

#: Exit codes: 0 all requested subjects/sessions succeeded; 1 some failed; 2 unusable input/options.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: Errors the user must fix: reported as one message, no traceback.
USER_ERRORS = (
    ConfigError,
    BIDSInputError,
    BIDSValidationError,
    ValidatorError,
    GroupInputError,
    AtlasError,
)

#: Not (yet) in the BIDS specification; directories without a trailing slash, as
#: bids-validator-deno matches them.
BIDSIGNORE = ("logs", "group", "atlases", "*.html", "*_relmat.*", "*_timeseries.*",
              "*_morph.*", "*_dwimap.*", "*_metrics.*", "*_outliers.*", "*_xfm.*",
              "*_desc-qc_*", "*_stat-coverage_*")


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    # Nipype's own node-by-node chatter is replaced by our progress lines and summary.
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("dipy").setLevel(logging.WARNING)  # per-step INFO lines drown progress


def _run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "_" + uuid.uuid4().hex[:8]


def write_provenance(config: Config, run_id: str) -> Path:
    """Save the resolved configuration (TOML, reusable with --config-file) and package versions."""
    logs = config.output_dir / "logs"
    config_path = logs / f"trajectome-{run_id}_config.toml"
    with derivatives.atomic_write(config_path, "wb") as handle:
        tomli_w.dump(config.to_toml_dict(), handle)
    derivatives.write_json(logs / f"trajectome-{run_id}_versions.json", dependency_versions())
    return config_path


def write_input_checksums(config: Config, subjects: list[Subject], run_id: str) -> Path:
    """``logs/trajectome-<run>_inputs.tsv``: SHA-256 of every input file the run uses."""
    paths = []
    for subject in subjects:
        for session in subject.sessions:
            paths += list(session.t1w) + [run.path for run in session.bold]
            paths += [p for run in session.dwi for p in (run.path, run.bval, run.bvec)]
    table = derivatives.file_checksums([p for p in paths if Path(p).is_file()],
                                       config.bids_dir)
    out = config.output_dir / "logs" / f"trajectome-{run_id}_inputs.tsv"
    derivatives.write_tsv(out, table)
    return out


def write_citations(logs: Path, methods: list[str]) -> None:
    """Write the methods text (``CITATION.md``) and its BibTeX entries (``CITATION.bib``)."""
    from pipeline.citations import select_bibtex

    text = "\n\n".join(methods) + "\n"
    bib = select_bibtex(text)  # before writing: a missing key must not leave half the pair
    with derivatives.atomic_write(logs / "CITATION.md") as handle:
        handle.write(text)
    with derivatives.atomic_write(logs / "CITATION.bib") as handle:
        handle.write(bib)


def prepare_output(config: Config) -> None:
    """Create the derivatives root with its description; fail early if it is not writable."""
    try:
        config.output_dir.mkdir(parents=True, exist_ok=True)
        description = derivatives.dataset_description(
            name="Trajectome outputs",
            version=package_version(),
            source_datasets=[f"file://{config.bids_dir}"],
        )
        derivatives.ensure_dataset_description(config.output_dir, description)
        for orphan in derivatives.remove_stale_temporaries(config.output_dir):
            LOGGER.info("removed %s, left by an interrupted run", orphan)
        bidsignore = config.output_dir / ".bidsignore"
        # keep what users added; append what a newer version ignores
        present = bidsignore.read_text().splitlines() if bidsignore.exists() else []
        if missing := [line for line in BIDSIGNORE if line not in present]:
            with derivatives.atomic_write(bidsignore) as handle:
                handle.write("\n".join([*present, *missing]) + "\n")
    except OSError as err:
        reason = err.strerror or str(err)
        raise ConfigError(
            f"{err.filename or config.output_dir}: cannot write the outputs ({reason}); "
            "choose another OUTPUT_DIR, or fix its permissions or free space."
        ) from err


def preflight(subjects: list[Subject]) -> tuple[list[Subject], list[Failure]]:
    """Check every input file; drop unusable ones so the rest of each session still runs."""
    checked, failures = [], []
    for subject in subjects:
        sessions = []
        for session in subject.sessions:
            usable, problems, summaries = preflight_session(session)
            sessions.append(usable)
            failures += [Failure(p.subject, p.session, "input check", p.message) for p in problems]
            for summary in summaries:
                for warning in summary.warnings:
                    LOGGER.warning("[%s] %s", session.name, warning)
            LOGGER.info(
                "[%s] role=%s order=%d T1w=%d BOLD=%d DWI=%d%s",
                session.name,
                usable.role,
                usable.order,
                len(usable.t1w),
                len(usable.bold),
                len(usable.dwi),
                f" (missing: {', '.join(usable.missing_modalities)})"
                if usable.missing_modalities
                else "",
            )
        checked.append(replace(subject, sessions=tuple(sessions)))
    return checked, failures


def prepare_atlases(config: Config) -> list[AtlasFiles]:
    """Resolve ``--atlas`` values and write each atlas, in BIDS-Atlas layout, to the outputs."""
    files = []
    for spec in config.atlas:
        atlas = resolve_atlas(spec)
        image = write_atlas(atlas, config.output_dir)
        files.append(AtlasFiles(atlas.name, image, image.parent / f"atlas-{atlas.name}_dseg.tsv"))
    names = [a.name for a in files]
    if len(set(names)) != len(names):
        raise ConfigError(f"--atlas: two atlases share a name ({names}); names must be unique.")
    return files


def workflow_options(config: Config):
    """The workflow factories' options from the resolved configuration."""
    from workflows.base import DwiOptions, FuncOptions, MetricOptions, Options

    return Options(
        modalities=tuple(config.modalities),
        anat_reference=config.anat_reference,
        registration_nthreads=min(config.registration_nthreads, config.omp_nthreads),
        func=FuncOptions(
            strategy=config.denoise_strategy,
            fd_threshold=config.fd_threshold,
            min_minutes=config.min_minutes,
            estimators=tuple(config.fc_estimators),
            slice_timing=config.slice_timing,
            save_bold=config.save_bold,
            fmriprep_dir=config.fmriprep_dir,
        ),
        dwi=DwiOptions(
            n_streamlines=config.streamlines,
            tracking=config.tracking,
            seeding=config.seeding,
            fod_model=config.fod_model,
            stopping=config.stopping,
            save_tractogram=config.save_tractogram,
            qsiprep_dir=config.qsiprep_dir,
        ),
        metrics=MetricOptions(
            graph_density=config.graph_density,
            n_boot=20 if config.sloppy else 100,
            n_consensus=10 if config.sloppy else 100,
        ),
    )


def anatomy_gaps(subjects: list[Subject], config: Config) -> list[Failure]:
    """Sessions whose connectomes cannot be built because the subject has no usable T1w."""
    gaps = []
    for subject in subjects:
        if any(s.t1w for s in subject.sessions):
            continue
        for session in subject.sessions:
            label = session.label or ""
            if "func" in config.modalities and session.bold and config.fmriprep_dir is None:
                gaps.append(Failure(subject.label, label, "functional connectome",
                                    "no usable T1w in any session of this subject; the BOLD "
                                    "runs need one for registration (add a T1w, or start "
                                    "from fMRIPrep outputs with --fmriprep-dir)"))
            if "dwi" in config.modalities and session.dwi:
                gaps.append(Failure(subject.label, label, "structural connectome",
                                    "no usable T1w in any session of this subject; "
                                    "tractography needs its tissues and native atlas"))
    return gaps


def report_failures(failures: list[Failure], crash_dir: Path) -> None:
    """Log the end-of-run summary of everything that failed."""
    LOGGER.error("%d step(s) failed; everything else finished:", len(failures))
    for failure in failures:
        LOGGER.error("  %s", failure.describe())
    if crash_dir.exists() and any(crash_dir.iterdir()):
        LOGGER.error("Crash reports: %s", crash_dir)


def _timed_step(subject: str, stage: str, action: Callable[[], object],
                crash_dir: Path) -> list[Failure]:
    """Run one subject's post-workflow step; log it with its wall time, keep its failure.

    A failure is returned (not raised) so the other subjects go on; its traceback goes to
    ``crash_dir`` as a crash file, which the subject report's error section lists.
    """
    start = time.monotonic()
    try:
        action()
    except Exception as err:  # any error of one subject's step must not stop the others
        elapsed = time.monotonic() - start
        LOGGER.info("[sub-%s] %s: FAILED in %.1f s", subject, stage, elapsed)
        crash = crash_dir / f"crash-sub-{subject}-{stage}.txt"
        try:
            with derivatives.atomic_write(crash) as handle:
                handle.write(f"Node: sub-{subject}.{stage}\n\n" + traceback.format_exc())
        except OSError as write_error:  # the failure itself is still reported
            LOGGER.warning("could not write %s: %s", crash, write_error)
        return [Failure(subject, None, stage, f"{type(err).__name__}: {err}")]
    LOGGER.info("[sub-%s] %s: done in %.1f s", subject, stage, time.monotonic() - start)
    return []


def _subject_results(label: str, output_dir: Path, include_flagged: bool,
                     crash_dir: Path) -> list[Failure]:
    """One subject's trajectory tables, then its HTML report (see write_subject_results)."""
    from pipeline.reports import write_subject_report

    failures: list[Failure] = []
    if has_session_metrics(output_dir, label):
        failures += _timed_step(label, "trajectories", partial(
            write_subject_outputs, output_dir, label, include_flagged=include_flagged), crash_dir)
    failures += _timed_step(label, "report", partial(write_subject_report, output_dir, label),
                            crash_dir)
    return failures


def write_subject_results(
    output_dir: Path, labels: Sequence[str], *, include_flagged: bool, crash_dir: Path,
    nprocs: int = 1,
) -> list[Failure]:
    """After the workflow: each subject's trajectory tables, then its HTML report.

    Trajectories are written for subjects with session metric tables; the report for every
    subject with an output folder (it also shows the QC and errors of a subject whose
    connectomes failed). One subject's failure (stage ``trajectories`` or ``report``)
    leaves the others untouched. With ``nprocs > 1`` subjects run in that many fresh
    processes (a report takes ~14 s, so a 100-subject run spent ~23 min here serially).
    """
    todo = [label for label in labels if (output_dir / f"sub-{label}").is_dir()]
    work = partial(_subject_results, output_dir=output_dir, include_flagged=include_flagged,
                   crash_dir=crash_dir)
    if nprocs < 2 or len(todo) < 2:
        return [failure for label in todo for failure in work(label)]
    # forkserver: the workers must not inherit the finished scheduler's threads
    context = multiprocessing.get_context("forkserver")
    failures: list[Failure] = []
    with ProcessPoolExecutor(max_workers=min(nprocs, len(todo)), mp_context=context) as pool:
        futures = [(label, pool.submit(_logged, work, label)) for label in todo]
        for label, future in futures:
            try:
                found, messages = future.result()
            except Exception as err:  # the worker itself died (e.g. killed for memory)
                LOGGER.info("[sub-%s] trajectories/report: FAILED (%s)", label, err)
                failures.append(Failure(label, None, "report", f"{type(err).__name__}: {err}"))
                continue
            for level, message in messages:  # the progress lines go where the parent's go
                LOGGER.log(level, message)
            failures += found
    return failures


class _Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.levelno, record.getMessage()))


def _logged(work: Callable[[str], list[Failure]], label: str
            ) -> tuple[list[Failure], list[tuple[int, str]]]:
    """Run ``work(label)`` in a worker, keeping its log lines for the parent to write."""
    collected = _Collected()
    LOGGER.handlers[:] = [collected]
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    return work(label), collected.messages


def run_participant(config: Config, run_id: str) -> int:
    """Validate, index, check inputs, build and run the participant-level workflow."""
    from workflows.base import init_trajectome_wf
    from workflows.engine import collect_methods
    from workflows.run import run_workflow

    if not config.skip_bids_validation and not config.boilerplate_only:
        LOGGER.info("Validating %s with bids-validator-deno", config.bids_dir)
        check_bids(config.bids_dir)
    subjects = collect_subjects(
        config.bids_dir,
        participant_labels=config.participant_label,
        session_labels=config.session_label,
        session_roles=config.session_roles,
        bids_filter=config.bids_filters(),
    )
    failures: list[Failure] = []
    if not config.boilerplate_only:
        subjects, failures = preflight(subjects)
    failures += anatomy_gaps(subjects, config)
    if not config.boilerplate_only:
        write_input_checksums(config, subjects, run_id)
    workflow = init_trajectome_wf(
        subjects=subjects,
        output_dir=config.output_dir,
        version=package_version(),
        atlases=prepare_atlases(config),
        options=workflow_options(config),
        omp_nthreads=config.omp_nthreads,
        sloppy=config.sloppy,
        seed=config.seed,
    )
    write_citations(config.output_dir / "logs", collect_methods(workflow))
    if config.boilerplate_only:
        LOGGER.info("Methods text written to %s", config.output_dir / "logs" / "CITATION.md")
        return EXIT_OK
    write_participants(config.output_dir, config.bids_dir)
    crash_dir = config.output_dir / "logs" / f"crash-{run_id}"
    failures += run_workflow(
        workflow,
        work_dir=config.work_dir,
        crash_dir=crash_dir,
        plugin=config.plugin,
        plugin_args=config.plugin_args,
        nprocs=config.nprocs,
        mem_gb=config.mem_gb,
        omp_nthreads=config.omp_nthreads,
        registration_nthreads=min(config.registration_nthreads, config.omp_nthreads),
        resource_monitor=config.resource_monitor,
    )
    start = time.monotonic()
    failures += write_subject_results(
        config.output_dir,
        [s.label for s in subjects],
        include_flagged=config.include_flagged,
        crash_dir=crash_dir,
        nprocs=config.nprocs,
    )
    LOGGER.info(
        "Trajectories and reports of %d subject(s) in %.1f s",
        len(subjects),
        time.monotonic() - start,
    )
    if failures:
        report_failures(failures, crash_dir)
        return EXIT_FAILED
    LOGGER.info("Participant level finished for %d subject(s).", len(subjects))
    return EXIT_OK


def run_group(config: Config, run_id: str) -> int:
    """Cohort tables, group statistics (mixed models, maintenance classes) and group.html.

    ``--participant-label`` restricts the cohort; ``--include-flagged`` keeps QC-flagged
    sessions. Without any session metric table (participant level run without atlases)
    only the cohort sessions table and the report are written, with a warning.
    """
    from pipeline.groupstats import GroupStatsError
    from pipeline.longitudinal import LongitudinalInputError
    from pipeline.reports import write_group_report

    start = time.monotonic()
    write_participants(config.output_dir, config.bids_dir)
    out = write_group_sessions(
        config.output_dir, config.bids_dir, subjects=config.participant_label
    )
    LOGGER.info("Group level: %s", out)
    wanted = {f"sub-{s.removeprefix('sub-')}" for s in config.participant_label or []}
    subjects = [
        path.parent.name
        for path in config.output_dir.glob("sub-*/sub-*_sessions.tsv")
        if not wanted or path.parent.name in wanted
    ]
    if not any(has_session_metrics(config.output_dir, s) for s in subjects):
        LOGGER.warning(
            "No session metric tables (sub-*/ses-*/*_desc-network_metrics.tsv) in %s: group "
            "statistics skipped; run the participant level with --atlas to get them.",
            config.output_dir,
        )
    else:
        try:
            written = write_group_outputs(
                config.output_dir,
                subjects=config.participant_label,
                include_flagged=config.include_flagged,
            )
        except (LongitudinalInputError, GroupStatsError) as err:
            raise GroupInputError(str(err)) from err
        LOGGER.info(
            "[group] statistics: done in %.1f s (%d files)", time.monotonic() - start, len(written)
        )
    step = time.monotonic()
    report = write_group_report(config.output_dir)
    LOGGER.info("[group] report: %s done in %.1f s", report.name, time.monotonic() - step)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trajectome`` console script."""
    _setup_logging()
    try:
        config = parse_args(argv)
        run_id = _run_id()
        prepare_output(config)
        write_provenance(config, run_id)
        runner = {"participant": run_participant, "group": run_group}[config.analysis_level]
        code = runner(config, run_id)
    except USER_ERRORS as err:
        LOGGER.error("trajectome: %s", err)
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())
