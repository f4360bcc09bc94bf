"""Kill a participant run midway and rerun it: the rerun resumes (issue 8).

The run goes through the real command line, ``run_workflow`` (MultiProc, 2 processes), the
work-directory cache and the real ``DerivativesSink``; only the anatomical workflow is a
cheap fake (``tests/resume_launcher.py``: 7 nodes that sleep 1 s, in the shape of the real
graph). It runs in a subprocess in its own process group, so a kill reaches the scheduler
and every worker at once, as a batch scheduler or the OOM killer would.

A node counts as finished when Nipype would reuse it: ``result_<node>.pklz`` and a final
(not ``_unfinished``) hash file in its work folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from bids_builder import SessionSpec, build_bids
from resume_launcher import EXEC_LOG_VARIABLE, fake_node_count

from pipeline.derivatives import is_temporary

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, uses killpg"),
]

LAUNCHER = Path(__file__).with_name("resume_launcher.py")
#: Generous: a start takes ~10 s on 2 idle cores.
TIMEOUT = 240.0
POLL = 0.05


# --------------------------------------------------------------------------- helpers
def _start(bids: Path, root: Path, log_name: str) -> subprocess.Popen:
    """Start the launcher with output ``root/out`` and work ``root/work``, in a new group."""
    command = [sys.executable, str(LAUNCHER), str(bids), str(root / "out"), "participant",
               "-w", str(root / "work"), "--nprocs", "2", "--skip-bids-validation",
               "--modalities", "anat"]
    env = os.environ | {EXEC_LOG_VARIABLE: str(root / "executions.log")}
    with (root / log_name).open("w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _executions(root: Path) -> list[str]:
    """Work folders of the fake nodes, one entry per execution, in start order."""
    log = root / "executions.log"
    return log.read_text().splitlines() if log.exists() else []


def _finished(work: Path) -> dict[str, tuple[int, int]]:
    """Nodes Nipype would reuse: work folder -> (inode, mtime in ns) of the result file."""
    done = {}
    for result in work.rglob("result_*.pklz"):
        hashes = [p.name for p in result.parent.glob("_0x*.json")]
        if any(not name.endswith("_unfinished.json") for name in hashes):
            stat = result.stat()
            done[str(result.parent)] = (stat.st_ino, stat.st_mtime_ns)
    return done


def _group_alive(pgid: int) -> bool:
    """Whether any process (zombies aside) of process group ``pgid`` is still running."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _kill_when(proc: subprocess.Popen, sig: int, ready: Callable[[], bool], log: Path) -> None:
    """Poll until ``ready()``, then send ``sig`` to the run's process group and reap it."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        assert proc.poll() is None, (
            f"the run ended (exit {proc.returncode}) before the kill point:\n{_tail(log)}")
        assert time.monotonic() < deadline, f"kill point not reached:\n{_tail(log)}"
        time.sleep(POLL)
    os.killpg(proc.pid, sig)
    proc.wait(timeout=TIMEOUT)
    while _group_alive(proc.pid):  # the workers die with the group; wait until they are gone
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"signal {sig} left processes of the run alive; they were SIGKILLed")
        time.sleep(POLL)


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` except ``logs/``: relative path -> bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] != "logs"}


def _node_outputs(out: Path) -> dict[str, tuple[int, int]]:
    """Outputs written by workflow nodes (under ``sub-*``): path -> (inode, mtime in ns).

    A writer's temporary caught by a kill is not an output: the next start removes it, and
    the final comparison checks none is left.
    """
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in out.glob("sub-*/**/*") if p.is_file() and not is_temporary(p)}


# --------------------------------------------------------------------------- the test
def test_killed_run_resumes_without_redoing_finished_nodes(tmp_path):
    bids = build_bids(tmp_path / "ds", {"01": {"pre": SessionSpec(bold=0, dwi=0),
                                               "post": SessionSpec(bold=0, dwi=0)}})
    n_fake = fake_node_count(2)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    reference.mkdir()
    killed.mkdir()
    # the reference runs alongside: the kills are driven by the killed run's own state
    ref_proc = _start(bids, reference, "run.log")

    # start 1 is SIGKILLed once both step1 nodes finished, inside the template node;
    # start 2 is SIGTERMed once step2 finished for both sessions, inside step3.
    # start 3 runs to the end.
    kills = []  # per kill: (finished nodes, fake nodes killed while executing, outputs)
    for number, (sig, threshold) in enumerate([(signal.SIGKILL, 2), (signal.SIGTERM, 5)], 1):
        offset = len(_executions(killed))
        log = killed / f"start-{number}.log"
        proc = _start(bids, killed, log.name)

        def ready(offset=offset, threshold=threshold):
            ran = _executions(killed)
            done = _finished(killed / "work")
            fake_done = set(ran) & set(done)
            return len(fake_done) >= threshold and bool(set(ran[offset:]) - set(done))

        _kill_when(proc, sig, ready, log)
        assert proc.returncode == -sig, _tail(log)
        done = _finished(killed / "work")
        running = set(_executions(killed)[offset:]) - set(done)
        fake_done = set(_executions(killed)) & set(done)
        assert threshold <= len(fake_done) < n_fake, "the kill must fall midway"
        assert running, "the kill must interrupt a node while it executes"
        kills.append((done, running, _node_outputs(killed / "out")))

    final = _start(bids, killed, "start-3.log")
    assert final.wait(timeout=TIMEOUT) == 0, _tail(killed / "start-3.log")
    assert ref_proc.wait(timeout=TIMEOUT) == 0, _tail(reference / "run.log")

    # the reference ran every fake node once; the killed run has the same nodes
    ref_runs = Counter(Path(p).relative_to(reference) for p in _executions(reference))
    assert len(ref_runs) == n_fake and set(ref_runs.values()) == {1}
    runs = Counter(_executions(killed))
    assert {Path(p).relative_to(killed) for p in runs} == set(ref_runs)

    # a node ran once, plus once per kill that interrupted it: a finished node never reran,
    # an interrupted one ran again
    assert runs == Counter({node: 1 + sum(node in running for _, running, _ in kills)
                            for node in runs})
    end = _finished(killed / "work")
    for done, _, node_outputs in kills:
        # every computing node finished before a kill kept its result (sinks rerun by
        # design, always_run), and every output written before the kill is the same file,
        # not rewritten
        computed = {n: v for n, v in done.items() if not Path(n).name.startswith("ds_")}
        assert computed and {node: end.get(node) for node in computed} == computed
        assert {path: _node_outputs(killed / "out").get(path) for path in node_outputs} == (
            node_outputs)

    # the same outputs, byte for byte, and no temporary left behind
    expected, got = _outputs(reference / "out"), _outputs(killed / "out")
    assert sorted(got) == sorted(expected)
    assert [path for path in got if got[path] != expected[path]] == []
    assert sum(path.startswith("sub-01/") for path in got) == 2 * n_fake + 2  # + sessions
    assert [p for p in (killed / "out").rglob("*") if ".tmp" in p.name] == []


def test_outputs_deleted_after_a_run_come_back_from_the_work_dir(tmp_path):
    """A rerun with the same work directory restores deleted outputs and leaves the rest."""
    bids = build_bids(tmp_path / "ds", {"01": {"pre": SessionSpec(bold=0, dwi=0)}})
    root = tmp_path / "run"
    root.mkdir()
    assert _start(bids, root, "first.log").wait(timeout=TIMEOUT) == 0
    before = _node_outputs(root / "out")
    victim = sorted(before)[0]
    Path(victim).unlink()
    executions = len(_executions(root))
    assert _start(bids, root, "second.log").wait(timeout=TIMEOUT) == 0, _tail(
        root / "second.log")
    after = _node_outputs(root / "out")
    assert Path(victim).is_file() and sorted(after) == sorted(before)
    assert {p: after[p] for p in before if p != victim} == {  # untouched: same inode, mtime
        p: before[p] for p in before if p != victim}
    assert len(_executions(root)) == executions  # nothing recomputed
