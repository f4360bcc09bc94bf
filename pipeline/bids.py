"""Session model of a longitudinal BIDS dataset.

Turns a BIDS dataset into a list of :class:`Subject`, each with its :class:`Session` s in
time order, the ECT role of every session (``pre``, ``post``, ``maintenance``) and the
input files of every session (T1w, resting-state BOLD runs, DWI runs with bval/bvec).

Rules
-----
Role of a session, first match wins:

1. ``session_roles`` (CLI ``--session-roles LABEL=ROLE ...``), the same for all subjects;
2. the ``ect_phase`` column of ``sub-X/sub-X_sessions.tsv`` (values ``pre``/``post``/
   ``maintenance`` or anything :func:`infer_role` understands, e.g. ``baseline``);
3. the session label, see :func:`infer_role`.

Order of the sessions of a subject: by role (pre < post < maintenance); sessions with the
same role (only ``maintenance`` may repeat) by ``acq_time`` from ``sub-X_sessions.tsv``
when all of them have one, else by natural sort of their labels (``fu2 < fu10``). When
``acq_time`` is known, it must agree with the roles (a ``post`` session acquired before
the ``pre`` session is an error). ``Session.order`` is the 1-based position in the
subject's timeline.

Longitudinal vs. cross-sectional: roles and order are computed over *all* sessions of a
subject in the dataset (before ``session_labels`` narrows the selection), so a session
keeps the same role and order whether it is processed alone or with the others.
A subject with more than one session needs a role for every session; a subject with a
single session (or without session level, label ``None``) is cross-sectional: its role
is the given/inferred one when available, else ``None`` (never an error), order ``1``.

The module never imports nipype.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

ROLES: tuple[str, ...] = ("pre", "post", "maintenance")
MODALITIES: tuple[str, ...] = ("t1w", "bold", "dwi")
NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")

_ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}
# label prefixes (lower case) -> role; checked in this order
_ROLE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("baseline", "pre"),
    ("pre", "pre"),
    ("post", "post"),
    ("maint", "maintenance"),
    ("follow", "maintenance"),
    ("fu", "maintenance"),
)
# base queries per modality; a bids_filter entry is applied on top (and may override)
_BASE_QUERIES: dict[str, dict[str, Any]] = {
    "t1w": {"datatype": "anat", "suffix": "T1w"},
    "bold": {"datatype": "func", "suffix": "bold"},
    "dwi": {"datatype": "dwi", "suffix": "dwi"},
}


class BIDSInputError(ValueError):
    """A problem with the input dataset, a label or a role; the message is user-facing."""


@dataclass(frozen=True)
class BoldRun:
    """One BOLD run: image path, sidecar metadata (with ``RepetitionTime``) and entities."""

    path: Path
    metadata: dict
    entities: dict

    @property
    def repetition_time(self) -> float:
        """Repetition time in seconds, from the JSON sidecar."""
        return float(self.metadata["RepetitionTime"])


@dataclass(frozen=True)
class DwiRun:
    """One DWI run: image path, its ``.bval``/``.bvec`` files, metadata and entities."""

    path: Path
    bval: Path
    bvec: Path
    metadata: dict
    entities: dict


@dataclass(frozen=True)
class Session:
    """One session of one subject (``label`` is ``None`` when there is no session level).

    ``role`` is one of :data:`ROLES` or ``None`` (only for single-session subjects),
    ``order`` the 1-based position in the subject's timeline, ``acq_time`` the raw
    string from ``sessions.tsv`` (or ``None``).
    """

    subject: str
    label: str | None
    role: str | None
    order: int
    acq_time: str | None
    t1w: tuple[Path, ...]
    bold: tuple[BoldRun, ...]
    dwi: tuple[DwiRun, ...]

    @property
    def missing_modalities(self) -> tuple[str, ...]:
        """Modalities (among ``t1w``, ``bold``, ``dwi``) without any file."""
        return tuple(mod for mod in MODALITIES if not getattr(self, mod))

    @property
    def bids_entities(self) -> dict[str, str]:
        """``subject`` (and ``session`` when there is one) for naming outputs."""
        entities = {"subject": self.subject}
        if self.label is not None:
            entities["session"] = self.label
        return entities

    @property
    def name(self) -> str:
        """``sub-X_ses-Y`` (or ``sub-X``), the usual BIDS file-name prefix."""
        return "_".join(f"{key[:3]}-{value}" for key, value in self.bids_entities.items())


@dataclass(frozen=True)
class Subject:
    """One participant: label (no ``sub-``), ``group`` from participants.tsv, sessions."""

    label: str
    group: str | None
    sessions: tuple[Session, ...]


# ----------------------------------------------------------------------------- labels
def strip_prefix(label: str, prefix: str) -> str:
    """Remove a BIDS entity prefix such as ``sub-`` or ``ses-`` if present.

    Parameters
    ----------
    label
        ``"sub-01"`` or ``"01"``.
    prefix
        ``"sub"``, ``"ses"`` (with or without the trailing dash).

    Returns
    -------
    str
        The bare label (``"01"``).
    """
    prefix = prefix if prefix.endswith("-") else prefix + "-"
    label = str(label).strip()
    return label[len(prefix):] if label.startswith(prefix) else label


def natural_key(label: str | None) -> tuple:
    """Sort key so that ``fu2 < fu10`` (case-insensitive); ``None`` sorts first."""
    if label is None:
        return ()
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", label.lower())
        if part
    )


def infer_role(label: str) -> str | None:
    """Infer the ECT role of a session from its label (case-insensitive).

    ``pre*`` and ``baseline*`` -> ``pre``; ``post*`` -> ``post``; ``maint*``, ``follow*``
    and ``fu*`` -> ``maintenance``. The ``ses-`` prefix is ignored.

    Returns
    -------
    str or None
        The role, or ``None`` when the label says nothing (``1``, ``A``, ...).
    """
    bare = strip_prefix(label, "ses").lower()
    for prefix, role in _ROLE_PREFIXES:
        if bare.startswith(prefix):
            return role
    return None


def _normalise_role(value: str, where: str) -> str:
    """Accept a role name (case-insensitive) or anything :func:`infer_role` understands."""
    text = str(value).strip().lower()
    role = text if text in _ROLE_RANK else infer_role(text)
    if role is None:
        raise BIDSInputError(
            f"{where}: unknown session role {value!r}; use one of {', '.join(ROLES)}."
        )
    return role


def parse_session_roles(items: Sequence[str]) -> dict[str, str]:
    """Parse CLI ``--session-roles`` items ``LABEL=ROLE`` into ``{label: role}``.

    Labels may carry the ``ses-`` prefix; roles are case-insensitive and must be one of
    :data:`ROLES` (or a synonym understood by :func:`infer_role`, such as ``baseline``).

    Raises
    ------
    BIDSInputError
        Malformed item, unknown role, or one label given two different roles.
    """
    roles: dict[str, str] = {}
    for item in items:
        label, sep, role = str(item).partition("=")
        label = strip_prefix(label, "ses")
        if not sep or not label or not role.strip():
            raise BIDSInputError(
                f"--session-roles: cannot parse {item!r}; expected LABEL=ROLE, "
                f"e.g. --session-roles 1=pre 2=post 3=maintenance."
            )
        role = _normalise_role(role, f"--session-roles {item}")
        if roles.get(label, role) != role:
            raise BIDSInputError(
                f"--session-roles: session {label!r} given two roles "
                f"({roles[label]} and {role})."
            )
        roles[label] = role
    return roles


# ----------------------------------------------------------------------------- layout
def load_layout(bids_dir: Path | str, *, database_path: Path | str | None = None) -> Any:
    """Index a BIDS dataset with pybids (no validation, derivatives left out).

    Parameters
    ----------
    bids_dir
        Root of the raw BIDS dataset.
    database_path
        Optional pybids SQLite cache directory, reused across runs.

    Returns
    -------
    bids.layout.BIDSLayout
    """
    from bids.layout import BIDSLayout, BIDSLayoutIndexer  # slow import, keep it local

    root = Path(bids_dir)
    if not root.is_dir():
        raise BIDSInputError(f"BIDS directory {root} does not exist or is not a directory.")
    # we validate with the official validator ourselves; pybids' check would be redundant
    indexer = BIDSLayoutIndexer(validate=False)
    return BIDSLayout(
        root.resolve(),
        validate=False,
        derivatives=False,
        indexer=indexer,
        database_path=None if database_path is None else str(database_path),
    )


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise BIDSInputError(f"Cannot read {path}: {err}. Fix or remove the file.") from err


def _cell(value: object) -> str | None:
    """TSV cell -> stripped string, ``None`` for empty / ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return None if text.lower() in ("", "n/a", "na", "nan") else text


def _read_groups(root: Path) -> dict[str, str | None]:
    path = root / "participants.tsv"
    if not path.exists():
        return {}
    table = _read_tsv(path)
    if "participant_id" not in table.columns or "group" not in table.columns:
        return {}
    groups = {}
    for pid, value in zip(table["participant_id"], table["group"], strict=True):
        group = _cell(value)
        # lower case so that "Patient" and "patient" are one group
        groups[strip_prefix(pid, "sub")] = None if group is None else group.lower()
    return groups


def _read_sessions_tsv(root: Path, subject: str) -> dict[str, dict[str, str | None]]:
    """``{session_label: {"acq_time": ..., "ect_phase": ...}}`` from sub-X_sessions.tsv."""
    path = root / f"sub-{subject}" / f"sub-{subject}_sessions.tsv"
    if not path.exists():
        return {}
    table = _read_tsv(path)
    if "session_id" not in table.columns:
        raise BIDSInputError(f"{path} has no 'session_id' column; add it (values ses-<label>).")
    rows: dict[str, dict[str, str | None]] = {}
    for _, row in table.iterrows():
        label = strip_prefix(row["session_id"], "ses")
        acq_time = _cell(row.get("acq_time"))
        if acq_time is not None:
            _parse_acq_time(acq_time, f"{path}, session {label}")
        phase = _cell(row.get("ect_phase"))
        rows[label] = {
            "acq_time": acq_time,
            "ect_phase": None if phase is None else _normalise_role(
                phase, f"{path}, session {label}, column ect_phase"),
        }
    return rows


def _parse_acq_time(value: str, where: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as err:
        raise BIDSInputError(
            f"{where}: acq_time {value!r} is not an ISO date-time "
            f"(YYYY-MM-DDThh:mm:ss); fix it or set it to n/a."
        ) from err
    return parsed.replace(tzinfo=None)  # compare naive and 'Z' times alike


# ----------------------------------------------------------------------------- filters
_ENTITY_ALIASES = {"sub": "subject", "ses": "session", "acq": "acquisition", "ce": "ceagent",
                   "rec": "reconstruction", "dir": "direction"}


def _filter_value(value: Any) -> Any:
    """fMRIPrep convention: JSON ``null`` -> entity absent, ``"*"`` -> any value."""
    from bids.layout import Query

    if value is None:
        return Query.NONE
    if value == "*":
        return Query.ANY
    if isinstance(value, list):
        return [_filter_value(v) for v in value]
    return value


def _modality_queries(bids_filter: Mapping[str, Any] | None, task: str | None) -> dict:
    bids_filter = dict(bids_filter or {})
    unknown = sorted(set(bids_filter) - set(MODALITIES))
    if unknown:
        raise BIDSInputError(
            f"--bids-filter-file: unknown key(s) {unknown}; allowed keys are "
            f"{', '.join(MODALITIES)}."
        )
    queries = {}
    for modality, base in _BASE_QUERIES.items():
        extra = bids_filter.get(modality) or {}
        if not isinstance(extra, Mapping):
            raise BIDSInputError(
                f"--bids-filter-file: {modality!r} must map entities to values, got {extra!r}."
            )
        # BIDS file-name keys (acq-, rec-, ...) are accepted besides pybids entity names
        extra = {_ENTITY_ALIASES.get(key, key): val for key, val in extra.items()}
        for entity, option in (("subject", "--participant-label"), ("session", "--session-label")):
            if entity in extra:
                raise BIDSInputError(
                    f"--bids-filter-file: do not filter {modality!r} on {entity!r}; "
                    f"use {option} instead."
                )
        query = {**base, "extension": list(NIFTI_EXTENSIONS)}
        if modality == "bold" and task is not None:
            query["task"] = task
        query.update({key: _filter_value(val) for key, val in extra.items()})
        queries[modality] = query
    return queries


def _get(layout: Any, query: Mapping[str, Any], **entities: Any) -> list:
    try:
        return layout.get(**query, **entities)
    except ValueError as err:  # pybids: "'foo' is not a recognized entity"
        raise BIDSInputError(f"--bids-filter-file: {err}") from err


# ----------------------------------------------------------------------------- roles
def _assign_roles(
    subject: str,
    labels: Sequence[str | None],
    tsv: Mapping[str, Mapping[str, str | None]],
    session_roles: Mapping[str, str],
    tsv_path: Path,
) -> dict[str | None, tuple[str | None, int]]:
    """``{label: (role, order)}`` for all sessions of one subject (see module rules)."""
    if len(labels) == 1:  # cross-sectional: a role is informative, never required
        label = labels[0]
        role = None
        if label is not None:
            role = (session_roles.get(label) or tsv.get(label, {}).get("ect_phase")
                    or infer_role(label))
        return {label: (role, 1)}

    roles: dict[str, str | None] = {}
    for label in labels:
        assert label is not None  # several sessions imply a session level
        roles[label] = (session_roles.get(label) or tsv.get(label, {}).get("ect_phase")
                        or infer_role(label))
    times = {label: tsv.get(label, {}).get("acq_time") for label in roles}
    parsed = {lab: _parse_acq_time(t, str(tsv_path)) for lab, t in times.items() if t}
    names = ", ".join("ses-" + lab for lab in labels)

    unknown = [label for label, role in roles.items() if role is None]
    if unknown:
        hint = _roles_hint(labels, roles, parsed, tsv_path)
        raise BIDSInputError(
            f"sub-{subject}: cannot infer the ECT role of session(s) "
            f"{', '.join('ses-' + lab for lab in unknown)} (sessions of this subject: "
            f"{names}). {hint}"
        )
    for role in ("pre", "post"):
        claiming = [label for label, r in roles.items() if r == role]
        if len(claiming) > 1:
            trusted = {lab: r for lab, r in roles.items() if lab not in claiming}
            hint = _roles_hint(labels, trusted, parsed, tsv_path)
            raise BIDSInputError(
                f"sub-{subject}: sessions {', '.join('ses-' + lab for lab in claiming)} all "
                f"have role {role!r} (sessions of this subject: {names}); only "
                f"'maintenance' may repeat. {hint}"
            )
    for a in parsed:  # acq_time must not contradict the roles
        for b in parsed:
            if _ROLE_RANK[roles[a]] < _ROLE_RANK[roles[b]] and parsed[a] > parsed[b]:
                hint = _roles_hint(labels, {}, parsed, tsv_path)
                raise BIDSInputError(
                    f"sub-{subject}: acq_time in {tsv_path} contradicts the session roles: "
                    f"ses-{a} ({roles[a]}, {times[a]}) was acquired after ses-{b} "
                    f"({roles[b]}, {times[b]}) (sessions of this subject: {names}). "
                    f"Fix acq_time or give the roles explicitly. {hint}"
                )

    def key(label: str) -> tuple:
        role = roles[label]
        same_role = [lab for lab in roles if roles[lab] == role]
        timed = all(lab in parsed for lab in same_role)
        return (_ROLE_RANK[role], parsed[label] if timed else datetime.min, natural_key(label))

    ordered = sorted(roles, key=key)
    return {label: (roles[label], rank) for rank, label in enumerate(ordered, start=1)}


def _roles_hint(
    labels: Sequence[str],
    trusted: Mapping[str, str | None],
    times: Mapping[str, datetime],
    tsv_path: Path,
) -> str:
    """Suggest ``--session-roles``: trusted roles kept, the others filled in time order."""
    used = {role for role in trusted.values() if role}
    spare = [role for role in ROLES[:2] if role not in used]
    untrusted = sorted(
        (lab for lab in labels if not trusted.get(lab)),
        key=lambda lab: (times.get(lab, datetime.max), natural_key(lab)),
    )
    example = dict(trusted)
    for label in untrusted:
        example[label] = spare.pop(0) if spare else "maintenance"
    items = " ".join(f"{lab}={example[lab]}" for lab in sorted(labels, key=natural_key))
    return (
        f"Pass the roles explicitly, e.g. --session-roles {items} "
        f"(roles: {', '.join(ROLES)}), or add an `ect_phase` column "
        f"(pre/post/maintenance) to {tsv_path}."
    )


# ----------------------------------------------------------------------------- collect
def _select(requested: Iterable[str] | None, available: Sequence[str], prefix: str,
            what: str, option: str) -> list[str]:
    if requested is None:
        return list(available)
    labels = list(dict.fromkeys(strip_prefix(lab, prefix) for lab in requested))
    unknown = [lab for lab in labels if lab not in available]
    if unknown:
        existing = ", ".join(f"{prefix}-{lab}" for lab in available) or "none"
        raise BIDSInputError(
            f"{option}: unknown {what} label(s) {', '.join(unknown)}; "
            f"the dataset has: {existing}."
        )
    return labels


def _session_files(
    layout: Any, queries: Mapping[str, Mapping[str, Any]], subject: str, label: str | None
) -> tuple[tuple[Path, ...], tuple[BoldRun, ...], tuple[DwiRun, ...]]:
    from bids.layout import Query

    where = {"subject": subject, "session": Query.NONE if label is None else label}
    t1w = tuple(Path(f.path) for f in _get(layout, queries["t1w"], **where))
    # Missing RepetitionTime or gradient files are reported per run by the preflight
    # (pipeline.inputs), so the other runs and subjects still go ahead.
    bold = [BoldRun(Path(f.path), dict(f.get_metadata()), dict(f.get_entities()))
            for f in _get(layout, queries["bold"], **where)]
    dwi = []
    for f in _get(layout, queries["dwi"], **where):
        stem = Path(f.path).name.split(".")[0]
        gradients = []
        for kind in ("bval", "bvec"):
            try:
                gradients.append(Path(getattr(layout, f"get_{kind}")(f.path)))
            except (ValueError, TypeError, IndexError):  # pybids: none found
                gradients.append(Path(f.path).with_name(f"{stem}.{kind}"))
        dwi.append(DwiRun(Path(f.path), *gradients, dict(f.get_metadata()),
                          dict(f.get_entities())))
    return (tuple(sorted(t1w)), tuple(sorted(bold, key=lambda run: run.path)),
            tuple(sorted(dwi, key=lambda run: run.path)))


def collect_subjects(
    bids_dir: Path | str,
    *,
    participant_labels: Sequence[str] | None = None,
    session_labels: Sequence[str] | None = None,
    session_roles: Mapping[str, str] | Sequence[str] | None = None,
    bids_filter: Mapping[str, Any] | None = None,
    task: str | None = "rest",
    layout: Any = None,
) -> list[Subject]:
    """Collect subjects, their sessions (with role and order) and input files.

    Parameters
    ----------
    bids_dir
        Root of the raw BIDS dataset.
    participant_labels
        Subjects to keep (``"01"`` or ``"sub-01"``); ``None`` keeps all.
    session_labels
        Sessions to keep (``"pre"`` or ``"ses-pre"``); ``None`` keeps all. Subjects left
        without any selected session are dropped.
    session_roles
        ``{label: role}`` or CLI items ``["1=pre", "2=post"]``; wins over the
        ``ect_phase`` column and over inference from labels.
    bids_filter
        fMRIPrep-style filters ``{"t1w": {...}, "bold": {...}, "dwi": {...}}`` of pybids
        entities added to (or overriding) the default queries; ``null`` means "entity
        absent" and ``"*"`` "any value".
    task
        BOLD task (default ``rest``); ``None`` keeps every task.
    layout
        An existing ``BIDSLayout`` of ``bids_dir`` (indexing is slow, reuse it).

    Returns
    -------
    list of Subject
        Sorted by subject label; sessions sorted by ``order``.

    Raises
    ------
    BIDSInputError
        Missing dataset, unknown labels (the message lists existing ones), ambiguous or
        contradictory roles (the message says what to pass), bad sessions.tsv, missing
        RepetitionTime or bval/bvec, invalid filters.
    """
    root = Path(bids_dir)
    if layout is None:
        layout = load_layout(root)
    root = Path(layout.root)
    if session_roles is not None and not isinstance(session_roles, Mapping):
        session_roles = parse_session_roles(session_roles)
    roles_given = {
        strip_prefix(label, "ses"): _normalise_role(role, f"--session-roles {label}={role}")
        for label, role in (session_roles or {}).items()
    }
    queries = _modality_queries(bids_filter, task)

    all_subjects = sorted(layout.get_subjects(), key=natural_key)
    if not all_subjects:
        raise BIDSInputError(
            f"No subjects (sub-<label> folders with BIDS files) found in {root}; "
            f"is this the root of a BIDS dataset?"
        )
    subjects = _select(participant_labels, all_subjects, "sub", "participant",
                       "--participant-label")
    sessions_of = {sub: sorted(layout.get_sessions(subject=sub), key=natural_key)
                   for sub in subjects}
    all_sessions = sorted({lab for labs in sessions_of.values() for lab in labs},
                          key=natural_key)
    if session_labels is not None and not all_sessions:
        raise BIDSInputError(
            f"--session-label: the dataset {root} has no session level (no ses-<label> "
            f"folders) for the selected participants; drop --session-label."
        )
    wanted = set(_select(session_labels, all_sessions, "ses", "session", "--session-label"))
    _select(roles_given or None, all_sessions, "ses", "session", "--session-roles")

    groups = _read_groups(root)
    result = []
    for sub in subjects:
        labels: list[str | None] = list(sessions_of[sub]) or [None]
        tsv_path = root / f"sub-{sub}" / f"sub-{sub}_sessions.tsv"
        tsv = _read_sessions_tsv(root, sub)
        assigned = _assign_roles(sub, labels, tsv, roles_given, tsv_path)
        sessions = []
        for label, (role, order) in sorted(assigned.items(), key=lambda kv: kv[1][1]):
            if label is not None and label not in wanted:
                continue
            t1w, bold, dwi = _session_files(layout, queries, sub, label)
            acq_time = tsv.get(label, {}).get("acq_time") if label is not None else None
            sessions.append(Session(sub, label, role, order, acq_time, t1w, bold, dwi))
        if sessions:
            result.append(Subject(sub, groups.get(sub), tuple(sessions)))
    return result


def session_table(subjects: Sequence[Subject]) -> pd.DataFrame:
    """One row per session, for reports and logs.

    Columns: ``subject, session, role, order, acq_time, group, n_t1w, n_bold, n_dwi,
    missing`` (``missing`` is a comma-separated list of missing modalities, ``""`` if
    none).
    """
    columns = ["subject", "session", "role", "order", "acq_time", "group",
               "n_t1w", "n_bold", "n_dwi", "missing"]
    rows = [
        {"subject": sub.label, "session": ses.label, "role": ses.role, "order": ses.order,
         "acq_time": ses.acq_time, "group": sub.group, "n_t1w": len(ses.t1w),
         "n_bold": len(ses.bold), "n_dwi": len(ses.dwi),
         "missing": ",".join(ses.missing_modalities)}
        for sub in subjects for ses in sub.sessions
    ]
    table = pd.DataFrame(rows, columns=columns)
    return table.astype({"order": int, "n_t1w": int, "n_bold": int, "n_dwi": int})
