"""Validate a BIDS dataset with the official validator (``bids-validator-deno``).

The validator (PyPI package ``bids-validator-deno``) runs offline with its bundled schema.
:func:`run_validator` returns its issues in a structured form; :func:`check_bids` raises
:class:`BIDSValidationError` when there are errors and returns the result otherwise
(warnings never raise).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXECUTABLE = "bids-validator-deno"
SKIP_HINT = "pass --skip-bids-validation to run without validation (at your own risk)"
DEFAULT_TIMEOUT = 600.0  # seconds; large datasets take a few minutes
_MAX_FILES_SHOWN = 5


class BIDSValidationError(ValueError):
    """The dataset failed validation; the message lists the validator's errors."""


class ValidatorError(RuntimeError):
    """The validator could not produce a report (crash, timeout)."""


class ValidatorNotFoundError(ValidatorError):
    """``bids-validator-deno`` is not installed."""


@dataclass(frozen=True)
class ValidationIssue:
    """One validator issue code (e.g. ``NOT_INCLUDED``) with all the files it affects.

    ``sub_code`` is the validator's ``subCode`` (e.g. the missing JSON key), ``message``
    the validator's description of ``code``, ``details`` the distinct per-file messages.
    """

    code: str
    severity: str
    message: str
    files: tuple[str, ...]
    sub_code: str | None = None
    details: tuple[str, ...] = ()


@dataclass(frozen=True)
class ValidationResult:
    """Validator outcome: ``errors`` and ``warnings`` grouped by (code, sub_code)."""

    errors: tuple[ValidationIssue, ...]
    warnings: tuple[ValidationIssue, ...]
    bids_dir: Path
    returncode: int

    @property
    def ok(self) -> bool:
        """``True`` when the validator reported no error."""
        return not self.errors


def find_validator() -> Path:
    """Locate ``bids-validator-deno``: next to ``sys.executable`` first, then on ``PATH``.

    Raises
    ------
    ValidatorNotFoundError
        When it is in neither place.
    """
    # the venv's bin/ is not necessarily on PATH (e.g. /tmp/venv/bin/python -m ...)
    local = Path(sys.executable).parent / EXECUTABLE
    if local.is_file() and os.access(local, os.X_OK):
        return local
    found = shutil.which(EXECUTABLE)
    if found:
        return Path(found)
    raise ValidatorNotFoundError(
        f"The BIDS validator '{EXECUTABLE}' was not found next to {sys.executable} nor on "
        f"PATH. Install it with `pip install bids-validator-deno`, or {SKIP_HINT}."
    )


def _group_issues(
    issues: list[dict[str, Any]], code_messages: dict[str, str], severity: str
) -> tuple[ValidationIssue, ...]:
    grouped: dict[tuple[str, str | None], dict[str, list[str]]] = {}
    for issue in issues:
        if issue.get("severity") != severity:
            continue
        key = (str(issue.get("code", "UNKNOWN")), issue.get("subCode"))
        entry = grouped.setdefault(key, {"files": [], "details": []})
        for path in [issue.get("location"), *issue.get("affects", [])]:
            if path and path not in entry["files"]:
                entry["files"].append(path)
        detail = issue.get("issueMessage")
        if detail and detail.strip() not in entry["details"]:
            entry["details"].append(detail.strip())
    return tuple(
        ValidationIssue(
            code=code,
            severity=severity,
            message=code_messages.get(code, "").strip(),
            files=tuple(entry["files"]),
            sub_code=sub_code,
            details=tuple(entry["details"]),
        )
        for (code, sub_code), entry in grouped.items()
    )


def parse_report(report: dict[str, Any], bids_dir: Path, returncode: int = 0) -> ValidationResult:
    """Turn the validator's JSON (``--format json``) into a :class:`ValidationResult`."""
    section = report.get("issues", {})
    issues = section.get("issues", [])
    messages = section.get("codeMessages", {})
    return ValidationResult(
        errors=_group_issues(issues, messages, "error"),
        warnings=_group_issues(issues, messages, "warning"),
        bids_dir=bids_dir,
        returncode=returncode,
    )


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[str, str, int]:
    """Run ``cmd``; on timeout kill its whole process group (children would keep pipes open)."""
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return stdout, stderr, proc.returncode


def run_validator(
    bids_dir: Path | str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    executable: Path | str | None = None,
    extra_args: tuple[str, ...] = (),
) -> ValidationResult:
    """Run ``bids-validator-deno --format json`` on a dataset.

    Parameters
    ----------
    bids_dir
        Root of the dataset.
    timeout
        Seconds before the validator is killed.
    executable
        Validator to run; found with :func:`find_validator` when ``None``.
    extra_args
        More validator options, e.g. ``("--ignoreNiftiHeaders",)``.

    Returns
    -------
    ValidationResult

    Raises
    ------
    BIDSValidationError
        ``bids_dir`` is not a directory.
    ValidatorNotFoundError
        The validator is missing.
    ValidatorError
        The validator timed out or produced no JSON report.
    """
    root = Path(bids_dir)
    if not root.is_dir():
        raise BIDSValidationError(f"BIDS directory {root} does not exist or is not a directory.")
    exe = Path(executable) if executable is not None else find_validator()
    cmd = [str(exe), "--format", "json", *extra_args, str(root)]
    env = {**os.environ, "NO_COLOR": "1"}
    try:
        stdout, stderr, returncode = _run(cmd, env, timeout)
    except FileNotFoundError as err:
        raise ValidatorNotFoundError(
            f"Cannot run {exe}: {err}. Install `bids-validator-deno`, or {SKIP_HINT}."
        ) from err
    except subprocess.TimeoutExpired as err:
        raise ValidatorError(
            f"The BIDS validator did not finish within {timeout:g} s on {root}; "
            f"{SKIP_HINT}."
        ) from err
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError as err:
        raise ValidatorError(
            f"The BIDS validator ({exe}) failed on {root} (exit code {returncode}) "
            f"without a JSON report:\n{stderr.strip()[-2000:]}\nFix the problem or {SKIP_HINT}."
        ) from err
    return parse_report(report, root, returncode)


def format_issues(issues: tuple[ValidationIssue, ...], max_files: int = _MAX_FILES_SHOWN) -> str:
    """Human-readable listing: one block per code, with up to ``max_files`` files."""
    lines = []
    for issue in issues:
        code = issue.code + (f" ({issue.sub_code})" if issue.sub_code else "")
        message = " ".join(issue.message.split())
        lines.append(f"[{issue.severity.upper()}] {code}" + (f": {message}" if message else ""))
        for detail in issue.details[:max_files]:
            lines.append(f"    {' '.join(detail.split())}")
        for path in issue.files[:max_files]:
            lines.append(f"    {path}")
        if len(issue.files) > max_files:
            lines.append(f"    ... and {len(issue.files) - max_files} more files")
    return "\n".join(lines)


def check_bids(
    bids_dir: Path | str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    executable: Path | str | None = None,
) -> ValidationResult:
    """Validate a dataset and raise if the official validator reports errors.

    Warnings are returned in the result, never raised.

    Raises
    ------
    BIDSValidationError
        The message lists the validator's error codes, messages and files and mentions
        ``--skip-bids-validation``.
    ValidatorError
        The validator is not installed (:class:`ValidatorNotFoundError`) or could not run.
    """
    result = run_validator(bids_dir, timeout=timeout, executable=executable)
    if result.errors:
        raise BIDSValidationError(
            f"The BIDS validator found {len(result.errors)} error type(s) in "
            f"{result.bids_dir}:\n{format_issues(result.errors)}\n"
            f"Fix the dataset (see https://bids-specification.readthedocs.io), or {SKIP_HINT}."
        )
    return result
