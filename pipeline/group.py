"""Group level: gather participant-level tables into cohort tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline import derivatives


class GroupInputError(ValueError):
    """The participant level has not produced what the group level needs."""


def collect_sessions(
    output_dir: str | Path, participants_tsv: str | Path | None = None
) -> pd.DataFrame:
    """One row per processed session of every subject, with the subject's group when known.

    Raises
    ------
    GroupInputError
        When no ``sub-*/sub-*_sessions.tsv`` exists under ``output_dir``.
    """
    output_dir = Path(output_dir)
    paths = sorted(output_dir.glob("sub-*/sub-*_sessions.tsv"))
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
        participants = pd.read_csv(participants_tsv, sep="\t", dtype=str, keep_default_na=False)
        if "group" in participants.columns:
            cohort = cohort.merge(
                participants[["participant_id", "group"]], on="participant_id", how="left"
            )
    return cohort


def write_group_sessions(output_dir: str | Path, bids_dir: str | Path) -> Path:
    """Write ``group/cohort_sessions.tsv`` (+ JSON) and return its path."""
    cohort = collect_sessions(output_dir, Path(bids_dir) / "participants.tsv")
    out = Path(output_dir) / "group" / "cohort_sessions.tsv"
    derivatives.write_tsv(out, cohort.fillna(""))
    sidecar = {
        "participant_id": {"Description": "Subject label with its 'sub-' prefix."},
        "group": {"Description": "Group from the input participants.tsv (e.g. patient, control)."},
    }
    derivatives.write_json(out.with_suffix(".json"), sidecar)
    return out
