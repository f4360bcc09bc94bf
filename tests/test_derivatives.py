"""Output naming, atomic writes and the derivatives description."""

import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import derivatives


def test_build_name_orders_entities_by_schema():
    name = derivatives.build_name(
        {
            "stat": "pearsoncorrelation",
            "atlas": "Seitzman300",
            "sub": "01",
            "space": "MNI",
            "task": "rest",
            "session": "pre",
        },
        "relmat",
        ".tsv",
    )
    assert (
        name
        == "sub-01_ses-pre_task-rest_space-MNI_atlas-Seitzman300_stat-pearsoncorrelation_relmat.tsv"
    )


def test_build_name_accepts_prefixed_labels_and_skips_none():
    assert (
        derivatives.build_name({"sub": "sub-01", "ses": None}, "sessions", ".tsv")
        == "sub-01_sessions.tsv"
    )


@pytest.mark.parametrize("bad", [{"sub": "0_1"}, {"sub": ""}, {"colour": "red"}])
def test_build_name_rejects_bad_entities(bad):
    with pytest.raises(ValueError, match="entit"):
        derivatives.build_name(bad, "x", ".tsv")


def test_build_path_subject_level_has_no_session_folder():
    assert derivatives.build_path({"sub": "01"}, "sessions", ".tsv", None) == Path(
        "sub-01/sub-01_sessions.tsv"
    )
    assert derivatives.build_path({"sub": "01", "ses": "a"}, "T1w", ".nii.gz", "anat") == Path(
        "sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz"
    )


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.tsv"
    target.write_text("old\n")
    with pytest.raises(OSError, match="No space"), derivatives.atomic_write(target) as handle:
        handle.write("half")
        raise OSError(28, "No space left on device")
    assert target.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [target]


def test_write_with_keeps_extension_and_cleans_up(tmp_path):
    seen = []

    def writer(tmp):
        seen.append(tmp.name)
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        derivatives.write_with(tmp_path / "img.nii.gz", writer)
    assert seen[0].endswith(".nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_write_tsv_is_deterministic_and_uses_na(tmp_path):
    table = pd.DataFrame({"a": [0.1 + 0.2, np.nan], "b": ["x", "y"]})
    first = derivatives.write_tsv(tmp_path / "a.tsv", table).read_bytes()
    second = derivatives.write_tsv(tmp_path / "b.tsv", table).read_bytes()
    assert first == second == b"a\tb\n0.3\tx\nn/a\ty\n"


def test_dataset_description_concurrent_writers_never_corrupt(tmp_path):
    description = derivatives.dataset_description(name="t", version="1.2.3")
    errors = []

    def worker():
        try:
            for _ in range(30):
                derivatives.ensure_dataset_description(tmp_path, description)
                json.loads((tmp_path / "dataset_description.json").read_text())
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    content = json.loads((tmp_path / "dataset_description.json").read_text())
    assert content["DatasetType"] == "derivative"
    assert content["GeneratedBy"][0] == {"Name": "Trajectome", "Version": "1.2.3"}
    assert [p.name for p in tmp_path.iterdir()] == ["dataset_description.json"]


def test_remove_stale_temporaries_spares_live_writes(tmp_path):
    import os

    folder = tmp_path / "sub-01" / "ses-pre"
    folder.mkdir(parents=True)
    orphan = folder / ".sub-01_ses-pre_relmat.tsv.k3j2h1g0.tmp"
    orphan_nii = folder / ".sub-01_T1w.nii.gz.a1b2c3d4.tmp.nii.gz"
    live = folder / ".sub-01_ses-pre_timeseries.tsv.z9y8x7w6.tmp"
    kept = [folder / "sub-01_ses-pre_relmat.tsv", folder / ".bidsignore", tmp_path / "notes.tmp"]
    for path in (orphan, orphan_nii, live, *kept):
        path.write_text("x")
    for path in (orphan, orphan_nii, kept[0], kept[2]):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    assert derivatives.remove_stale_temporaries(tmp_path) == sorted([orphan, orphan_nii])
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [live.name, kept[0].name, ".bidsignore"])
    assert (tmp_path / "notes.tmp").exists()


def test_temporaries_of_a_dead_writer_are_removed_at_once(tmp_path):
    import subprocess
    import sys

    # a real process that has exited: its PID names a dead writer on this host
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    dead_pid = int(child.stdout)
    host = derivatives._owner().split("@")[1]
    dead = tmp_path / f".sub-01_relmat.tsv.pid{dead_pid}@{host}.ab12cd34.tmp"
    mine = tmp_path / f".sub-01_other.tsv.{derivatives._owner()}.ef56gh78.tmp"
    elsewhere = tmp_path / f".sub-01_more.tsv.pid{dead_pid}@another-node.ij90kl12.tmp"
    for path in (dead, mine, elsewhere):
        path.write_text("half")
    assert derivatives.remove_stale_temporaries(tmp_path) == [dead]
    assert mine.exists() and elsewhere.exists()  # live writer; other host: wait for age


def test_temporary_names_carry_their_writer(tmp_path):
    seen = []

    def writer(path):
        seen.append(path.name)
        path.write_text("x")

    derivatives.write_with(tmp_path / "a.tsv", writer)
    assert seen[0].startswith(f".a.tsv.{derivatives._owner()}.") and seen[0].endswith(".tmp.tsv")
