#!/usr/bin/env python
"""Kill a Trajectome run at seeded random times, rerun it, and compare with an uninterrupted run.

    scripts/fault_injection.py [--bids-dir DIR] [--kills N] [--seed S] [--scratch DIR]
                               [-- extra trajectome options]

Default: ``bids_examples/ds-ect --participant-label ctl01 --sloppy --modalities anat
--omp-nthreads 1`` (with more threads per process the ANTs registrations are not
reproducible even without a kill, so the comparison would not isolate the kills' effect).

1. A reference run (fresh output and work directories) is timed.
2. A second run, in its own output and work directories, is killed ``N`` times (SIGKILL of
   its whole process group, as a scheduler or the OOM killer would) after a random
   fraction of the reference wall time; each time it is restarted with the same ``-w``.
   The ``N + 1``-th start runs to the end.
3. Every TSV, JSON and NIfTI outside ``logs/`` is compared with the reference: text files
   by SHA-256 of their bytes, NIfTI by their data array (shape, dtype, values) and affine.
   Temporary files (``.*.tmp*``) left in the output directory count as differences.

For each start the table shows the nodes that ran and how many of them had already
finished in an earlier start (``redone``: those should be 0 - a finished node is cached).
Exit code: 0 outputs identical, 1 outputs differ or the final run failed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nb
import numpy as np

REPO = Path(__file__).resolve().parents[1]
# One thread per process: ANTs registrations with more threads differ from run to run
# (ITK hands work units to threads dynamically), which would hide what a kill changes.
DEFAULT_ARGS = ("--participant-label", "ctl01", "--sloppy", "--modalities", "anat",
                "--omp-nthreads", "1")
COMPARED = (".tsv", ".json", ".nii", ".nii.gz")


def trajectome_cmd(bids: Path, out: Path, work: Path, extra: list[str]) -> list[str]:
    """The command line of one participant-level run."""
    return [sys.executable, "-m", "workflows.cli", str(bids), str(out), "participant",
            "-w", str(work), *extra]


def node_results(work: Path) -> dict[str, float]:
    """Finished Nipype nodes in ``work``: result file -> modification time."""
    return {str(p.parent.relative_to(work)): p.stat().st_mtime
            for p in work.rglob("result_*.pklz")}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so a kill reaches every worker)."""
    handle = log.open("w")
    return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def fingerprint(path: Path) -> str:
    """Content hash: NIfTI by data array and affine, anything else by its bytes."""
    digest = hashlib.sha256()
    if path.name.endswith((".nii", ".nii.gz")):
        img = nb.load(path)
        data = np.ascontiguousarray(np.asanyarray(img.dataobj))
        digest.update(f"{data.shape}{data.dtype}".encode())
        digest.update(data.tobytes())
        digest.update(np.asarray(img.affine, dtype=np.float64).tobytes())
    else:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def outputs(root: Path) -> dict[str, str]:
    """Compared outputs under ``root`` (outside ``logs/``): relative path -> fingerprint."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or rel.parts[0] == "logs":
            continue
        if ".tmp" in path.name:
            found[str(rel)] = "TEMP-FILE"
        elif path.name.endswith(COMPARED):
            found[str(rel)] = fingerprint(path)
    return found


def main(argv: list[str] | None = None) -> int:
    """Run the experiment and print the tables; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bids-dir", type=Path, default=REPO / "bids_examples" / "ds-ect")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", type=Path, default=None,
                        help="where outputs and work dirs go (default: a new temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("extra", nargs="*", help="trajectome options (after --)")
    args = parser.parse_args(argv)
    extra = list(args.extra) or list(DEFAULT_ARGS)
    # the validator is not what is tested here, and its run time would blur the kill times
    if "--skip-bids-validation" not in extra:
        extra.append("--skip-bids-validation")
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="trajectome-faults-"))
    scratch.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    bids = args.bids_dir.resolve()

    print(f"# scratch {scratch}\n# trajectome {' '.join(extra)}", flush=True)
    ref_out, ref_work = scratch / "reference" / "out", scratch / "reference" / "work"
    began = time.monotonic()
    ref = start(trajectome_cmd(bids, ref_out, ref_work, extra), scratch / "reference.log")
    ref_code = ref.wait()
    ref_time = time.monotonic() - began
    print(f"# reference run: exit {ref_code} in {ref_time:.1f} s, "
          f"{len(node_results(ref_work))} nodes", flush=True)
    if ref_code != 0:
        print(f"reference run failed; see {scratch / 'reference.log'}")
        return 1

    out, work = scratch / "killed" / "out", scratch / "killed" / "work"
    cmd = trajectome_cmd(bids, out, work, extra)
    rows = []
    code = None
    for attempt in range(args.kills + 1):
        before = node_results(work)
        began = time.monotonic()
        proc = start(cmd, scratch / f"attempt-{attempt + 1}.log")
        delay = float(rng.uniform(0.1, 0.9)) * ref_time if attempt < args.kills else None
        try:
            code = proc.wait(timeout=delay)
            event = f"finished (exit {code})"
        except subprocess.TimeoutExpired:
            kill_group(proc)
            event = f"killed at {delay:.1f} s"
        after = node_results(work)
        ran = {k for k, mtime in after.items() if before.get(k) != mtime}
        redone = sorted(k for k in ran if k in before)
        rows.append((attempt + 1, event, time.monotonic() - began, len(ran), len(redone)))
        for name in redone:
            print(f"#   attempt {attempt + 1} redid finished node {name}")
        if attempt < args.kills and event.startswith("finished"):
            # nothing left to interrupt: the remaining kills would test nothing
            break

    print("\nstart  event                 wall (s)  nodes run  redone")
    for number, event, wall, ran, redone in rows:
        print(f"{number:>5}  {event:<20}  {wall:>8.1f}  {ran:>9}  {redone:>6}")

    reference, result = outputs(ref_out), outputs(out)
    differences = 0
    print(f"\n{'output':<70}  {'reference':<12}  {'interrupted':<12}  status")
    for rel in sorted(set(reference) | set(result)):
        a, b = reference.get(rel, "-"), result.get(rel, "-")
        status = "same" if a == b else "DIFFERENT"
        differences += a != b
        print(f"{rel:<70}  {a:<12}  {b:<12}  {status}")
    print(f"\n{len(reference)} reference outputs, {differences} difference(s); "
          f"final exit code {code}.")
    if not args.keep and args.scratch is None and differences == 0 and code == 0:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if differences == 0 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
