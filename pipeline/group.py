"""Cross-session and group outputs: gather participant-level tables, write the tables built on them.

* :func:`write_participants`: ``participant_id`` and ``group`` of the input
  ``participants.tsv`` copied to the derivatives root (read by the reports and by
  :func:`write_subject_outputs` to find the controls).
* :func:`collect_session_metrics`: the long metric table (:mod:`pipeline.longitudinal`)
  from the per-session ``*_desc-network_metrics.tsv`` tables, with roles, order, group and
  QC flags.
* :func:`write_subject_outputs`: one subject's trajectories, changes and normalisation
  tables (:data:`pipeline.longitudinal.SUBJECT_OUTPUTS`), run after the participant level.
* :func:`write_group_outputs`: the group statistics (:data:`pipeline.groupstats.GROUP_OUTPUTS`).

Every file is written atomically with a JSON sidecar describing its columns.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipeline import derivatives, groupstats, longitudinal
from pipeline.longitudinal import KEY_COLUMNS, LONG_COLUMNS, SUBJECT_OUTPUTS

LOGGER = logging.getLogger("trajectome.group")

#: Scopes followed across sessions and tested at the group level; node-level values stay in
#: the per-session tables (hundreds of parcels x measures would swamp the FDR correction).
FOLLOWED_SCOPES = ("global", "network", "network_pair", "anchor_network", "structure")
#: Modalities whose values come from the BOLD data, hence flagged when its QC fails.
BOLD_MODALITIES = ("fc", "coupling")
#: Columns of the long table besides :data:`~pipeline.longitudinal.LONG_COLUMNS`.
EXTRA_COLUMNS = {
    "acq_time": {"Description": "Acquisition time of the session (from sessions.tsv)."},
    "qc_reason": {"Description": "Why the session's BOLD data failed QC ('' when it passed; "
                                 "fc and coupling rows only)."},
}
PARTICIPANTS_SIDECAR = {
    "participant_id": {"Description": "Subject label with its 'sub-' prefix."},
    "group": {"Description": "Group from the input participants.tsv, lower case "
                             "(patient, control)."},
}
_MISSING = {"", "n/a", "nan", "none"}


class GroupInputError(ValueError):
    """The participant level has not produced what the group level needs."""


# --------------------------------------------------------------------------- participants


def read_groups(participants_tsv: str | Path | None) -> dict[str, str]:
    """``{"sub-<label>": group}`` (lower case) from a ``participants.tsv``; {} without one."""
    if participants_tsv is None or not Path(participants_tsv).exists():
        return {}
    table = pd.read_csv(participants_tsv, sep="\t", dtype=str, keep_default_na=False)
    if not {"participant_id", "group"} <= set(table.columns):
        return {}
    groups = {}
    for pid, group in zip(table["participant_id"], table["group"], strict=True):
        group = group.strip().lower()
        if group not in _MISSING:
            groups[f"sub-{pid.strip().removeprefix('sub-')}"] = group
    return groups


def write_participants(output_dir: str | Path, bids_dir: str | Path) -> Path | None:
    """Write ``OUTPUT/participants.tsv`` (``participant_id``, ``group``) from the input one.

    Only these two columns are copied (the others may be sensitive and are not needed).
    Every run writes the same content from the same input, so concurrent participant-level
    runs on one output folder are safe.

    Returns
    -------
    Path or None
        The file, or None when the input has no ``participants.tsv``.
    """
    source = Path(bids_dir) / "participants.tsv"
    if not source.exists():
        return None
    table = pd.read_csv(source, sep="\t", dtype=str, keep_default_na=False)
    if "participant_id" not in table.columns:
        raise GroupInputError(f"{source}: no participant_id column; fix the input "
                              "participants.tsv (BIDS requires that column).")
    ids = [f"sub-{p.strip().removeprefix('sub-')}" for p in table["participant_id"]]
    groups = read_groups(source)
    out = pd.DataFrame({"participant_id": ids, "group": [groups.get(i) for i in ids]})
    path = Path(output_dir) / "participants.tsv"
    derivatives.write_tsv(path, out)
    derivatives.write_json(path.with_suffix(".json"), PARTICIPANTS_SIDECAR)
    return path


# --------------------------------------------------------------------------- sessions


def _wanted(output_dir: Path, subjects: list[str] | None) -> list[Path]:
    """The ``sessions.tsv`` of the requested subjects (all by default)."""
    paths = sorted(output_dir.glob("sub-*/sub-*_sessions.tsv"))
    if subjects is None:
        return paths
    wanted = {f"sub-{s.removeprefix('sub-')}" for s in subjects}
    missing = sorted(wanted - {p.parent.name for p in paths})
    if missing:
        raise GroupInputError(
            f"{output_dir}: no participant-level outputs for {', '.join(missing)} "
            "(sub-X/sub-X_sessions.tsv); run the participant level for them or drop them "
            "from --participant-label."
        )
    return [p for p in paths if p.parent.name in wanted]


def collect_sessions(
    output_dir: str | Path,
    participants_tsv: str | Path | None = None,
    *,
    subjects: list[str] | None = None,
) -> pd.DataFrame:
    """One row per processed session of every (requested) subject, with its group when known.

    Raises
    ------
    GroupInputError
        When no ``sub-*/sub-*_sessions.tsv`` exists under ``output_dir``, or a requested
        subject has none.
    """
    output_dir = Path(output_dir)
    paths = _wanted(output_dir, subjects)
    if not paths:
        raise GroupInputError(
            f"{output_dir}: no participant-level outputs (sub-*/sub-*_sessions.tsv); "
            "run the participant level first."
        )
    tables = []
    for path in paths:
        table = pd.read_csv(path, sep="\t", dtype={"session_id": str}, keep_default_na=False)
        table.insert(0, "participant_id", path.parent.name)
        tables.append(table)
    cohort = pd.concat(tables, ignore_index=True)
    if participants_tsv is not None and Path(participants_tsv).exists():
        groups = read_groups(participants_tsv)
        cohort["group"] = cohort["participant_id"].map(groups).fillna("")
    return cohort


def write_group_sessions(
    output_dir: str | Path, bids_dir: str | Path, *, subjects: list[str] | None = None
) -> Path:
    """Write ``group/cohort_sessions.tsv`` (+ JSON) and return its path."""
    cohort = collect_sessions(output_dir, Path(bids_dir) / "participants.tsv",
                              subjects=subjects)
    out = Path(output_dir) / "group" / "cohort_sessions.tsv"
    derivatives.write_tsv(out, cohort.fillna(""))
    sidecar = {
        "participant_id": {"Description": "Subject label with its 'sub-' prefix."},
        "group": {"Description": "Group from the input participants.tsv (e.g. patient, control)."},
    }
    derivatives.write_json(out.with_suffix(".json"), sidecar)
    return out


# --------------------------------------------------------------------------- metric tables


def _entity(name: str, key: str) -> str | None:
    for part in name.split("_")[:-1]:
        if part.startswith(f"{key}-"):
            return part.removeprefix(f"{key}-")
    return None


def _read_tsv(path: Path, **kwargs) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", keep_default_na=False, **kwargs)
    except (OSError, ValueError, UnicodeDecodeError) as err:  # ParserError is a ValueError
        raise GroupInputError(f"{path}: unreadable ({err}); rerun the participant level "
                              "for this subject.") from err


def _qc_failures(session_dir: Path) -> dict[str | None, str]:
    """Failed BOLD QC of one session: atlas (None: every atlas) -> reason.

    Read from the ``func/*_desc-qc_bold.tsv`` tables (``qc_pass`` 0, ``qc_reason``).
    """
    failed: dict[str | None, list[str]] = {}
    for path in sorted(session_dir.glob("func/*_desc-qc_bold.tsv")):
        table = _read_tsv(path, dtype=str)
        if "qc_pass" not in table.columns:
            continue
        bad = pd.to_numeric(table["qc_pass"], errors="coerce") == 0
        for _, row in table[bad].iterrows():
            atlas = str(row.get("atlas", "")).strip() or _entity(path.name, "atlas")
            reason = str(row.get("qc_reason", "")).strip()
            if reason.lower() in _MISSING:
                reason = f"{path.name}: qc_pass 0"
            failed.setdefault(atlas or None, []).append(reason)
    return {atlas: "; ".join(dict.fromkeys(reasons)) for atlas, reasons in failed.items()}


def _session_frames(
    output_dir: Path, subject: str, group: str, scopes: tuple[str, ...]
) -> list[pd.DataFrame]:
    """The long rows of every session metric table of one subject (``subject`` has sub-)."""
    sessions_tsv = output_dir / subject / f"{subject}_sessions.tsv"
    sessions = _read_tsv(sessions_tsv, dtype=str)
    missing = {"session_id", "role", "order"} - set(sessions.columns)
    if missing:
        raise GroupInputError(f"{sessions_tsv}: missing column(s) {sorted(missing)}; rerun "
                              f"the participant level for {subject}.")
    frames = []
    for row in sessions.to_dict("records"):
        session_id = row["session_id"].strip()
        if session_id.lower() in _MISSING:  # no session level: files sit in the subject folder
            ses_dir, prefix, label = output_dir / subject, subject, ""
        else:
            ses_dir, prefix = output_dir / subject / session_id, f"{subject}_{session_id}"
            label = session_id.removeprefix("ses-")
        order = pd.to_numeric(row["order"], errors="coerce")
        if pd.isna(order):
            raise GroupInputError(f"{sessions_tsv}: order {row['order']!r} of {session_id} "
                                  "is not a number; rerun the participant level.")
        failures = _qc_failures(ses_dir)
        for path in sorted(ses_dir.glob(f"{prefix}_atlas-*_desc-network_metrics.tsv")):
            atlas = _entity(path.name, "atlas")
            table = _read_tsv(path, na_values=["n/a"],
                              dtype={"network": str, "network_b": str, "node": str})
            absent = {"modality", "metric", "scope", "value"} - set(table.columns)
            if absent:
                raise GroupInputError(f"{path}: missing column(s) {sorted(absent)}; not a "
                                      "session metric table; rerun the participant level "
                                      f"for {subject}.")
            table = table[table["scope"].isin(scopes)].copy()
            reason = failures.get(atlas, failures.get(None, ""))
            bold = table["modality"].isin(BOLD_MODALITIES)
            table["qc_flag"] = bold & bool(reason)
            table["qc_reason"] = reason if reason else ""
            table.loc[~bold, "qc_reason"] = ""
            table = table.assign(subject=subject.removeprefix("sub-"), session=label,
                                 role=row["role"].strip().lower(), order=int(order),
                                 acq_time=row.get("acq_time", ""), group=group, atlas=atlas)
            frames.append(table)
    return frames


def collect_session_metrics(
    output_dir: str | Path,
    *,
    subjects: list[str] | None = None,
    participants_tsv: str | Path | None = None,
    scopes: tuple[str, ...] = FOLLOWED_SCOPES,
) -> pd.DataFrame:
    """The long metric table of the cohort from the per-session ``desc-network_metrics`` TSVs.

    Role, order and acquisition time come from each subject's ``sessions.tsv`` (a subject
    without session level has one session, label ""); ``group`` from ``participants.tsv``
    (lower case). ``qc_flag`` marks the ``fc`` and ``coupling`` rows of an atlas whose BOLD
    QC failed (``func/*_desc-qc_bold.tsv`` with ``qc_pass`` 0; ``qc_reason`` says why): the
    values are kept, the statistics decide.

    Parameters
    ----------
    output_dir : path
        Trajectome derivatives root.
    subjects : list of str, optional
        Subject labels (with or without ``sub-``) to collect; default all.
    participants_tsv : path, optional
        ``participants.tsv`` with a ``group`` column.
    scopes : tuple of str
        Metric scopes kept (:data:`FOLLOWED_SCOPES`).

    Returns
    -------
    pandas.DataFrame
        Columns of :data:`pipeline.longitudinal.LONG_COLUMNS` (without ``time``, which
        :func:`pipeline.longitudinal.prepare_long_table` derives from ``acq_time``) plus
        ``acq_time`` and ``qc_reason``; ``role`` is "" for a single session without role.
        Empty (with those columns) when nothing was measured.

    Raises
    ------
    GroupInputError
        A requested subject without ``sessions.tsv``, or an unreadable table (named).
    """
    output_dir = Path(output_dir)
    groups = read_groups(participants_tsv)
    frames = []
    for sessions_tsv in _wanted(output_dir, subjects):
        subject = sessions_tsv.parent.name
        frames += _session_frames(output_dir, subject, groups.get(subject, ""), scopes)
    columns = [c for c in (*LONG_COLUMNS, *EXTRA_COLUMNS) if c != "time"]
    if not frames:
        return pd.DataFrame(columns=columns)
    long = pd.concat(frames, ignore_index=True)
    for column in ("network", "network_b", "node"):
        long[column] = long[column].fillna("").astype(str) if column in long else ""
    if "se" not in long:
        long["se"] = float("nan")
    return long[columns]


def has_session_metrics(output_dir: str | Path, subject: str) -> bool:
    """Whether the subject has any ``*_desc-network_metrics.tsv`` (any session, any atlas)."""
    label = subject.removeprefix("sub-")
    sub_dir = Path(output_dir) / f"sub-{label}"
    pattern = f"sub-{label}_*atlas-*_desc-network_metrics.tsv"
    return any(sub_dir.glob(pattern)) or any(sub_dir.glob(f"ses-*/{pattern}"))


# --------------------------------------------------------------------------- subject outputs

#: Columns of the last maintenance session's change row repeated on the trajectory rows of
#: the metric (the reports read the maintenance class from the trajectories table).
CLASS_SUMMARY = ("maintenance_class", "class_probability", "class_confident", "p_regression",
                 "p_stabilisation", "p_continued_remodelling", "acute_change",
                 "maintenance_change", "retention")
TRAJECTORY_OUTPUT_SIDECAR = {
    **longitudinal.TRAJECTORY_SIDECAR,
    **{c: {**longitudinal.CHANGES_SIDECAR[c],
           "Description": longitudinal.CHANGES_SIDECAR[c]["Description"]
           + " Taken from the desc-changes row of the subject's last maintenance session (or "
           "of the pre/post-ECT pair without one); n/a when the subject lacks it."}
       for c in CLASS_SUMMARY},
}


def _write_table(path: Path, table: pd.DataFrame, sidecar: dict) -> list[Path]:
    derivatives.write_tsv(path, table)
    return [path, derivatives.write_json(path.with_suffix(".json"), sidecar)]


def _class_summary(trajectories: pd.DataFrame, changes: pd.DataFrame) -> pd.DataFrame:
    # the last maintenance session, or the pre/post row of a subject without maintenance
    last = changes[changes["is_last"].fillna(False).astype(bool)
                   | (changes["session_maintenance"] == "")]
    last = last[["subject", *KEY_COLUMNS, *CLASS_SUMMARY]]
    out = trajectories.merge(last, on=["subject", *KEY_COLUMNS], how="left")
    out["maintenance_class"] = out["maintenance_class"].fillna("")
    return out


def _normalisation(
    subject_long: pd.DataFrame, controls: pd.DataFrame, control_ids: list[str],
    group: str, include_flagged: bool,
) -> tuple[pd.DataFrame | None, str]:
    """The subject's normalisation table, or None and why it is not computed."""
    if group != "patient":
        return None, (f"not computed: the subject's group is {group!r}, only patients are "
                      "compared with the controls" if group else
                      "not computed: the subject has no group in participants.tsv")
    if len(control_ids) < 2:
        return None, (f"not computed: {len(control_ids)} control(s) with session metric "
                      "tables in the output folder; the control SD needs at least 2")
    table = longitudinal.normalisation_index(pd.concat([subject_long, controls],
                                                       ignore_index=True),
                                             include_flagged=include_flagged)
    if table.empty:
        return None, "not computed: no metric shared with the controls"
    order = subject_long.drop_duplicates("session").set_index("session")["order"]
    table = table.assign(_order=table["session"].map(order))
    table = table.sort_values([*KEY_COLUMNS, "_order"], ignore_index=True)
    return table.drop(columns="_order"), f"{len(control_ids)} controls: {', '.join(control_ids)}"


def _remove_stale(paths: list[Path]) -> None:
    """Drop an output a previous run wrote that this run does not (e.g. fewer sessions)."""
    for path in paths:
        for stale in (path, path.with_suffix(".json")):
            if stale.exists():
                LOGGER.info("removed %s: no longer produced", stale)
                stale.unlink()


def _subject_tables(
    output_dir: Path, label: str, long: pd.DataFrame, controls: pd.DataFrame,
    control_ids: list[str], *, include_flagged: bool,
) -> list[Path]:
    """Write one subject's trajectories/changes/normalisation from its collected rows."""
    names = {k: output_dir / v.format(subject=label) for k, v in SUBJECT_OUTPUTS.items()}
    long = long[long["role"] != ""]
    if long.empty:
        LOGGER.info("[sub-%s] trajectories: not followed (single session without an ECT "
                    "role)", label)
        _remove_stale(list(names.values()))
        return []
    source = f"sub-{label} session metric tables"
    prepared = longitudinal.prepare_long_table(long, source=source)
    changes = longitudinal.change_table(prepared)
    trajectories = _class_summary(longitudinal.trajectory_table(prepared), changes)
    trajectories = trajectories.sort_values([*KEY_COLUMNS, "order"], ignore_index=True)
    group = str(prepared["group"].iloc[0])
    norm, note = _normalisation(prepared, controls, control_ids, group, include_flagged)
    sidecar = {**TRAJECTORY_OUTPUT_SIDECAR,
               "Sessions": [f"ses-{s}" if s else "n/a"
                            for s in prepared.drop_duplicates("session")["session"]],
               "NormalisationIndex": (names["normalisation"].name if norm is not None
                                      else note)}
    written = _write_table(names["trajectories"], trajectories, sidecar)
    if changes.empty:  # no pre-ECT and post-ECT pair: nothing changed yet
        _remove_stale([names["changes"]])
    else:
        written += _write_table(names["changes"], changes, longitudinal.CHANGES_SIDECAR)
    if norm is None:
        if group != "control":  # controls are never normalised: nothing to say
            LOGGER.info("[sub-%s] normalisation index %s", label, note)
        _remove_stale([names["normalisation"]])
    else:
        written += _write_table(names["normalisation"], norm, {
            **longitudinal.NORMALISATION_SIDECAR, "ControlSubjects": control_ids,
            "IncludeFlagged": include_flagged})
    return written


def _control_rows(
    output_dir: Path, participants_tsv: Path, exclude: str,
) -> tuple[pd.DataFrame, list[str]]:
    """Session metrics of every control in the output folder (unreadable ones skipped)."""
    groups = read_groups(participants_tsv)
    frames, used = [], []
    for subject in sorted(s for s, g in groups.items() if g == "control" and s != exclude):
        if not has_session_metrics(output_dir, subject):
            continue
        try:  # another subject's broken table must not fail this one
            rows = collect_session_metrics(output_dir, subjects=[subject],
                                           participants_tsv=participants_tsv)
        except GroupInputError as err:
            LOGGER.warning("control %s left out of the normalisation reference: %s",
                           subject, err)
            continue
        rows = rows[rows["role"] != ""]
        if not rows.empty:
            frames.append(rows)
            used.append(subject)
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), used


def write_subject_outputs(
    output_dir: str | Path,
    subject: str,
    *,
    include_flagged: bool = False,
    participants_tsv: str | Path | None = None,
) -> list[Path]:
    """Write one subject's trajectories, changes and normalisation tables (+ JSON sidecars).

    Reads the subject's session metric tables (every session and atlas) and writes
    :data:`pipeline.longitudinal.SUBJECT_OUTPUTS`:

    * ``desc-trajectories``: every followed metric at every session, in timeline order,
      with the maintenance class of the last maintenance session (:data:`CLASS_SUMMARY`);
    * ``desc-changes``: acute and maintenance changes and classes
      (:func:`pipeline.longitudinal.change_table`); not written without a pre-ECT and a
      post-ECT session (e.g. a single session);
    * ``desc-normalisation``: distance to the controls
      (:func:`pipeline.longitudinal.normalisation_index`), for patients when at least two
      controls of ``participants_tsv`` have session metric tables in ``output_dir``; the
      trajectories sidecar's ``NormalisationIndex`` says why it was not written otherwise.

    A single session without an ECT role (cross-sectional) is not followed: nothing is
    written. Outputs of an earlier run that this one does not produce are removed.

    Parameters
    ----------
    output_dir : path
        Trajectome derivatives root.
    subject : str
        Subject label, with or without ``sub-``.
    include_flagged : bool, default=False
        Use QC-flagged control sessions in the normalisation reference.
    participants_tsv : path, optional
        Groups of the subjects; default ``OUTPUT/participants.tsv``
        (:func:`write_participants`).

    Returns
    -------
    list of Path
        The files written (tables and sidecars).

    Raises
    ------
    GroupInputError
        No session metric table for the subject, or an unreadable one (named).
    pipeline.longitudinal.LongitudinalInputError
        Tables that contradict each other (e.g. two pre-ECT sessions).
    """
    output_dir = Path(output_dir)
    label = subject.removeprefix("sub-")
    participants = (output_dir / "participants.tsv" if participants_tsv is None
                    else Path(participants_tsv))
    long = collect_session_metrics(output_dir, subjects=[label], participants_tsv=participants)
    if long.empty:
        raise GroupInputError(
            f"{output_dir / f'sub-{label}'}: no session metric tables "
            f"(sub-{label}[/ses-*]/*_atlas-*_desc-network_metrics.tsv with followed scopes); "
            "run the participant level with --atlas for this subject first."
        )
    controls, control_ids = _control_rows(output_dir, participants, f"sub-{label}")
    return _subject_tables(output_dir, label, long, controls, control_ids,
                           include_flagged=include_flagged)


# --------------------------------------------------------------------------- group outputs


def write_group_outputs(
    output_dir: str | Path,
    *,
    subjects: list[str] | None = None,
    participants_tsv: str | Path | None = None,
    include_flagged: bool = False,
    refresh_subjects: bool = True,
) -> list[Path]:
    """Run the group statistics and write :data:`pipeline.groupstats.GROUP_OUTPUTS` (+ JSON).

    Parameters
    ----------
    output_dir : path
        Trajectome derivatives root.
    subjects : list of str, optional
        Subjects to include (default: every subject with participant-level outputs).
    participants_tsv : path, optional
        Groups of the subjects; default ``OUTPUT/participants.tsv``.
    include_flagged : bool, default=False
        Keep QC-flagged sessions in the models, class counts and normalisation reference.
    refresh_subjects : bool, default=True
        Rewrite every subject's tables (:func:`write_subject_outputs`) from the cohort,
        so that each patient's normalisation uses all the controls: at the participant
        level, subjects run one at a time see only the controls already processed.  With
        ``subjects``, only those are rewritten, against the controls among them.

    Returns
    -------
    list of Path
        The files written.

    Raises
    ------
    GroupInputError
        No session metric table at all, or an unusable one (named).
    """
    output_dir = Path(output_dir)
    participants = (output_dir / "participants.tsv" if participants_tsv is None
                    else Path(participants_tsv))
    long = collect_session_metrics(output_dir, subjects=subjects, participants_tsv=participants)
    if long.empty:
        raise GroupInputError(
            f"{output_dir}: no session metric tables (sub-*/ses-*/*_desc-network_metrics.tsv);"
            " run the participant level with --atlas (and func or dwi) first."
        )
    roleless = long.loc[long["role"] == "", ["subject", "session"]].drop_duplicates()
    for row in roleless.itertuples(index=False):
        LOGGER.warning("sub-%s %s: no ECT role (single session); left out of the group "
                       "statistics", row.subject, f"ses-{row.session}" if row.session else "")
    long = long[long["role"] != ""]
    if long.empty:
        raise GroupInputError(f"{output_dir}: no session has an ECT role; give them with "
                              "--session-roles at the participant level.")
    results = groupstats.run_group(long, include_flagged=include_flagged)
    sidecars = {**groupstats.GROUP_SIDECARS,
                "metrics": {**groupstats.METRICS_SIDECAR, **EXTRA_COLUMNS}}
    written = []
    for name, table in results.items():
        sidecar = dict(sidecars[name])
        if name in ("lme", "class_counts"):
            sidecar["IncludeFlagged"] = include_flagged
        written += _write_table(output_dir / groupstats.GROUP_OUTPUTS[name], table, sidecar)
    if refresh_subjects:
        prepared = results["metrics"]
        controls = prepared[prepared["group"] == "control"]
        control_ids = sorted(f"sub-{s}" for s in controls["subject"].unique())
        for label, rows in prepared.groupby("subject", sort=True):
            others = controls[controls["subject"] != label]
            ids = [c for c in control_ids if c != f"sub-{label}"]
            written += _subject_tables(output_dir, str(label), rows, others, ids,
                                       include_flagged=include_flagged)
    return written
