"""Build small, valid fake BIDS datasets for tests.

The datasets pass the official ``bids-validator-deno`` without errors (tested in
``tests/test_validation.py``) and are deterministic: the same arguments and seed write the
same bytes. Images are tiny (T1w ``(4, 5, 6)``, BOLD ``(4, 5, 6, 24)``, DWI ``(4, 5, 6, 7)``)
so a whole dataset is written in a fraction of a second. BOLD runs have 24 volumes by
default, above the 20 that ``pipeline.inputs`` requires for a functional connectome.

Example
-------
>>> root = build_bids(tmp_path / "ds", {
...     "01": {"pre": SessionSpec(acq_time="2020-01-01T10:00:00"),
...            "post": SessionSpec(dwi=0)},          # DWI missing at post
...     "02": {None: SessionSpec()},                  # no session level
... }, groups={"01": "patient", "02": "control"})

Modalities are given either as a count (``bold=2`` -> ``run-1``, ``run-2``) or as a list of
entity dicts, e.g. ``bold=[{"task": "rest"}, {"task": "faces"}]`` or
``t1w=[{"acq": "mprage"}, {"acq": "fast"}]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

T1W_SHAPE = (4, 5, 6)
BOLD_SHAPE = (4, 5, 6, 24)
DWI_SHAPE = (4, 5, 6, 7)
BVALS = (0, 1000, 1000, 1000, 2000, 2000, 2000)

# BIDS entity order for file names (subset relevant to anat/func/dwi)
_ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo")

Modality = int | Sequence[Mapping[str, str]]

_SESSIONS_JSON = {
    "acq_time": {"Description": "Acquisition time of the first scan of the session"},
    "ect_phase": {
        "Description": "Phase of the ECT course",
        "Levels": {"pre": "before ECT", "post": "after ECT",
                   "maintenance": "maintenance / follow-up"},
    },
}


@dataclass(frozen=True)
class SessionSpec:
    """What to write for one session (or for a subject without session level).

    Parameters
    ----------
    t1w, bold, dwi
        Number of runs (``0`` = modality missing, ``1`` = no run entity, ``n > 1`` =
        ``run-1..n``) or a list of entity dicts (keys like ``task``, ``acq``, ``run``).
    acq_time
        Value of the ``acq_time`` column in ``sub-X_sessions.tsv`` (``None`` -> ``n/a``).
    ect_phase
        Value of the ``ect_phase`` column in ``sub-X_sessions.tsv`` (``None`` -> ``n/a``).
    repetition_time
        ``RepetitionTime`` of the BOLD runs in seconds (sidecar and NIfTI header).
    n_volumes
        Number of BOLD volumes (default ``BOLD_SHAPE[3]``).
    bold_metadata
        Extra keys for the BOLD sidecars.
    """

    t1w: Modality = 1
    bold: Modality = 1
    dwi: Modality = 1
    acq_time: str | None = None
    ect_phase: str | None = None
    repetition_time: float = 2.0
    n_volumes: int = BOLD_SHAPE[3]
    bold_metadata: Mapping[str, object] = field(default_factory=dict)


def _entity_sets(spec: Modality, defaults: Mapping[str, str]) -> list[dict[str, str]]:
    if isinstance(spec, int):
        if spec <= 1:
            return [dict(defaults)] * spec
        return [{**defaults, "run": str(i)} for i in range(1, spec + 1)]
    return [{**defaults, **dict(ents)} for ents in spec]


def _bids_name(entities: Mapping[str, str], suffix: str) -> str:
    unknown = set(entities) - set(_ENTITY_ORDER)
    if unknown:
        raise ValueError(f"bids_builder does not know entities {sorted(unknown)}")
    parts = [f"{key}-{entities[key]}" for key in _ENTITY_ORDER if entities.get(key)]
    return "_".join([*parts, suffix])


def _write_nifti(
    path: Path, shape: tuple[int, ...], rng: np.random.Generator, tr: float | None = None
) -> None:
    data = rng.integers(0, 1000, size=shape, dtype=np.int16)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None:
        img.header["pixdim"][4] = tr
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _write_json(path: Path, content: Mapping[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def _write_tsv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    lines = ["\t".join(header), *("\t".join(row) for row in rows)]
    path.write_text("\n".join(lines) + "\n")


def build_bids(
    root: Path | str,
    subjects: Mapping[str, Mapping[str | None, SessionSpec]],
    *,
    groups: Mapping[str, str] | None = None,
    seed: int = 0,
    dataset_description: bool = True,
    sessions_tsv: bool = True,
    ext: str = ".nii.gz",
) -> Path:
    """Write a fake BIDS dataset and return its root.

    Parameters
    ----------
    root
        Output directory (created).
    subjects
        ``{subject_label: {session_label: SessionSpec}}``; labels without ``sub-``/``ses-``.
        A session label ``None`` (must then be the subject's only entry) writes
        ``sub-X/anat`` directly, without session level.
    groups
        ``{subject_label: group}`` written to a ``group`` column of ``participants.tsv``;
        ``None`` writes no ``group`` column.
    seed
        Seed of the random image content.
    dataset_description
        Write ``dataset_description.json`` (``False`` makes an invalid dataset).
    sessions_tsv
        Write ``sub-X/sub-X_sessions.tsv`` for subjects with sessions. Columns ``acq_time``
        and ``ect_phase`` are only written when some session of the subject sets them.
    ext
        ``.nii.gz`` or ``.nii``.

    Returns
    -------
    Path
        The dataset root.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if dataset_description:
        _write_json(
            root / "dataset_description.json",
            {"Name": "Trajectome fake dataset", "BIDSVersion": "1.9.0", "DatasetType": "raw",
             "Authors": ["Trajectome tests"]},
        )
    _write_text_files(root, subjects, groups)
    if sessions_tsv and any(None not in sessions for sessions in subjects.values()):
        # only with some sessions.tsv: the validator rejects an orphan sessions.json
        _write_json(root / "sessions.json", _SESSIONS_JSON)

    for sub, sessions in sorted(subjects.items()):
        if None in sessions and len(sessions) > 1:
            raise ValueError(f"sub-{sub}: session None must be the only session")
        for ses, spec in sessions.items():
            _write_session(root, sub, ses, spec, rng, ext)
        if sessions_tsv and None not in sessions:
            _write_sessions_tsv(root, sub, sessions)
    return root


def _write_text_files(
    root: Path,
    subjects: Mapping[str, Mapping[str | None, SessionSpec]],
    groups: Mapping[str, str] | None,
) -> None:
    header = ["participant_id"] + (["group"] if groups is not None else [])
    rows = [
        [f"sub-{sub}"] + ([groups.get(sub, "n/a")] if groups is not None else [])
        for sub in sorted(subjects)
    ]
    _write_tsv(root / "participants.tsv", header, rows)
    sidecar: dict[str, object] = {"participant_id": {"Description": "Participant identifier"}}
    if groups is not None:
        sidecar["group"] = {"Description": "Study group", "Levels": {
            "patient": "Treatment-resistant depression", "control": "Healthy control"}}
    _write_json(root / "participants.json", sidecar)
    (root / "README").write_text("Fake dataset written by tests/bids_builder.py\n")


def _write_session(
    root: Path,
    sub: str,
    ses: str | None,
    spec: SessionSpec,
    rng: np.random.Generator,
    ext: str,
) -> None:
    base = root / f"sub-{sub}" / (f"ses-{ses}" if ses is not None else "")
    ents = {"sub": sub, "ses": ses or ""}
    for t1 in _entity_sets(spec.t1w, ents):
        _write_nifti(base / "anat" / (_bids_name(t1, "T1w") + ext), T1W_SHAPE, rng)
    for bold in _entity_sets(spec.bold, {**ents, "task": "rest"}):
        stem = base / "func" / _bids_name(bold, "bold")
        shape = (*BOLD_SHAPE[:3], spec.n_volumes)
        _write_nifti(stem.with_name(stem.name + ext), shape, rng, spec.repetition_time)
        _write_json(
            stem.with_name(stem.name + ".json"),
            {"RepetitionTime": spec.repetition_time, "TaskName": bold["task"],
             "EchoTime": 0.03, "SliceTiming": [0.0, 0.5, 1.0, 1.5, 0.25, 0.75],
             **dict(spec.bold_metadata)},
        )
    for dwi in _entity_sets(spec.dwi, ents):
        stem = base / "dwi" / _bids_name(dwi, "dwi")
        _write_nifti(stem.with_name(stem.name + ext), DWI_SHAPE, rng)
        _write_json(stem.with_name(stem.name + ".json"), {"EchoTime": 0.08})
        stem.with_name(stem.name + ".bval").write_text(" ".join(map(str, BVALS)) + "\n")
        vecs = np.zeros((3, len(BVALS)))
        vecs[:, 1:] = np.tile(np.eye(3), 2)  # b=0 then x, y, z twice
        stem.with_name(stem.name + ".bvec").write_text(
            "\n".join(" ".join(f"{v:g}" for v in row) for row in vecs) + "\n"
        )


def _write_sessions_tsv(root: Path, sub: str, sessions: Mapping[str | None, SessionSpec]) -> None:
    columns = ["session_id"]
    if any(spec.acq_time for spec in sessions.values()):
        columns.append("acq_time")
    if any(spec.ect_phase for spec in sessions.values()):
        columns.append("ect_phase")
    rows = []
    for ses, spec in sessions.items():
        values = {"session_id": f"ses-{ses}", "acq_time": spec.acq_time or "n/a",
                  "ect_phase": spec.ect_phase or "n/a"}
        rows.append([values[col] for col in columns])
    _write_tsv(root / f"sub-{sub}" / f"sub-{sub}_sessions.tsv", columns, rows)


def standard_dataset(root: Path | str, *, seed: int = 0) -> Path:
    """A small longitudinal ECT dataset used by several test modules.

    * ``sub-01`` (patient): ``pre``, ``post``, ``fu1`` and ``fu2`` with ``acq_time``;
      all modalities.
    * ``sub-02`` (patient): ``pre`` and ``post``; ``post`` has no DWI.
    * ``sub-03`` (control): single session ``pre``.
    """
    return build_bids(
        root,
        {
            "01": {
                "pre": SessionSpec(acq_time="2021-01-04T09:00:00"),
                "post": SessionSpec(acq_time="2021-02-15T09:00:00"),
                "fu1": SessionSpec(acq_time="2021-05-03T09:00:00"),
                "fu2": SessionSpec(acq_time="2021-08-02T09:00:00"),
            },
            "02": {"pre": SessionSpec(), "post": SessionSpec(dwi=0)},
            "03": {"pre": SessionSpec()},
        },
        groups={"01": "patient", "02": "patient", "03": "control"},
        seed=seed,
    )
