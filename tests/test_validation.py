"""Tests of BIDS validation (pipeline/validation.py) with the real bids-validator-deno."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from bids_builder import SessionSpec, build_bids, standard_dataset

from pipeline.validation import (
    BIDSValidationError,
    ValidatorError,
    ValidatorNotFoundError,
    check_bids,
    find_validator,
    format_issues,
    parse_report,
    run_validator,
)


@pytest.fixture(scope="module")
def validator() -> Path:
    try:
        return find_validator()
    except ValidatorNotFoundError:
        pytest.skip("bids-validator-deno is not installed")


# ----------------------------------------------------------------------------- real validator
def test_valid_dataset_accepted(validator: Path, tmp_path: Path) -> None:
    result = check_bids(standard_dataset(tmp_path / "ds"), executable=validator)
    assert result.ok and result.errors == ()
    codes = {issue.code for issue in result.warnings}
    assert "README_FILE_SMALL" in codes  # the builder's one-line README, planted
    readme = next(i for i in result.warnings if i.code == "README_FILE_SMALL")
    assert readme.files == ("/README",) and readme.severity == "warning"


def test_valid_dataset_without_sessions_accepted(validator: Path, tmp_path: Path) -> None:
    root = build_bids(tmp_path / "ds", {"01": {None: SessionSpec()},
                                        "02": {None: SessionSpec(dwi=0)}})
    assert check_bids(root).errors == ()  # executable found on its own


def test_missing_dataset_description_rejected(validator: Path, tmp_path: Path) -> None:
    root = build_bids(tmp_path / "ds", {"01": {None: SessionSpec()}}, dataset_description=False)
    with pytest.raises(BIDSValidationError) as err:
        check_bids(root, executable=validator)
    msg = str(err.value)
    assert "MISSING_DATASET_DESCRIPTION" in msg and "/dataset_description.json" in msg
    assert "--skip-bids-validation" in msg and str(root) in msg


def test_wrongly_named_file_rejected(validator: Path, tmp_path: Path) -> None:
    root = build_bids(tmp_path / "ds", {"01": {"pre": SessionSpec(), "post": SessionSpec()}})
    anat = root / "sub-01" / "ses-pre" / "anat"
    (anat / "sub-01_ses-pre_T1w.nii.gz").rename(anat / "sub-01_ses-pre_T1.nii.gz")
    result = run_validator(root, executable=validator)
    assert not result.ok and result.returncode != 0
    assert [(i.code, i.files) for i in result.errors] == [
        ("NOT_INCLUDED", ("/sub-01/ses-pre/anat/sub-01_ses-pre_T1.nii.gz",))]
    assert "not part of BIDS specification" in result.errors[0].message
    with pytest.raises(BIDSValidationError, match="NOT_INCLUDED") as err:
        check_bids(root, executable=validator)
    assert "/sub-01/ses-pre/anat/sub-01_ses-pre_T1.nii.gz" in str(err.value)
    assert "--skip-bids-validation" in str(err.value)


# ----------------------------------------------------------------------------- no validator needed
def test_parse_report_groups_issues() -> None:
    report = {"issues": {
        "issues": [
            {"code": "NOT_INCLUDED", "severity": "error", "location": "/a.txt"},
            {"code": "NOT_INCLUDED", "severity": "error", "location": "/b.txt"},
            {"code": "NOT_INCLUDED", "severity": "error", "location": "/a.txt"},
            {"code": "INVALID_LOCATION", "severity": "error", "location": "/x_T1w.nii",
             "issueMessage": "Expected location: /sub-01/"},
            {"code": "MISSING_DATASET_DESCRIPTION", "severity": "error",
             "affects": ["/dataset_description.json"]},
            {"code": "JSON_KEY_RECOMMENDED", "subCode": "License", "severity": "warning",
             "location": "/dataset_description.json"},
            {"code": "JSON_KEY_RECOMMENDED", "subCode": "Funding", "severity": "warning",
             "location": "/dataset_description.json"},
        ],
        "codeMessages": {"NOT_INCLUDED": "Files with such naming scheme are not part of BIDS.",
                         "JSON_KEY_RECOMMENDED": "A JSON file is missing a key.\n"},
    }}
    result = parse_report(report, Path("/data"), returncode=16)
    assert [(i.code, i.files) for i in result.errors] == [
        ("NOT_INCLUDED", ("/a.txt", "/b.txt")),
        ("INVALID_LOCATION", ("/x_T1w.nii",)),
        ("MISSING_DATASET_DESCRIPTION", ("/dataset_description.json",)),
    ]
    assert result.errors[0].message == "Files with such naming scheme are not part of BIDS."
    assert result.errors[1].details == ("Expected location: /sub-01/",)
    assert [(w.code, w.sub_code, w.message) for w in result.warnings] == [
        ("JSON_KEY_RECOMMENDED", "License", "A JSON file is missing a key."),
        ("JSON_KEY_RECOMMENDED", "Funding", "A JSON file is missing a key."),
    ]
    assert not result.ok
    text = format_issues(result.errors, max_files=1)
    assert "[ERROR] NOT_INCLUDED: Files with such naming" in text
    assert "/a.txt" in text and "/b.txt" not in text and "... and 1 more files" in text
    assert "[ERROR] MISSING_DATASET_DESCRIPTION\n" in text  # no message known for it


def test_validator_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValidatorNotFoundError) as err:
        find_validator()
    assert "pip install bids-validator-deno" in str(err.value)
    assert "--skip-bids-validation" in str(err.value)
    root = build_bids(tmp_path / "ds", {"01": {None: SessionSpec(bold=0, dwi=0)}})
    with pytest.raises(ValidatorNotFoundError):
        check_bids(root)


def test_validator_found_next_to_python(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    fake = bindir / "bids-validator-deno"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_validator() == fake


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fake-validator"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def test_validator_crash_and_timeout(tmp_path: Path) -> None:
    root = build_bids(tmp_path / "ds", {"01": {None: SessionSpec(bold=0, dwi=0)}})
    crash = _script(tmp_path, "echo 'deno: boom' >&2\nexit 1")
    with pytest.raises(ValidatorError, match="exit code 1") as err:
        run_validator(root, executable=crash)
    assert "deno: boom" in str(err.value) and "--skip-bids-validation" in str(err.value)
    # sleep is a child of sh that keeps stdout open: the whole process group must die
    slow = _script(tmp_path, "sleep 30\necho done")
    start = time.monotonic()
    with pytest.raises(ValidatorError, match=r"did not finish within 0\.3 s"):
        run_validator(root, executable=slow, timeout=0.3)
    assert time.monotonic() - start < 10


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BIDSValidationError, match="does not exist"):
        check_bids(tmp_path / "missing", executable=tmp_path / "unused")
