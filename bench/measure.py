"""Per-stage wall time, CPU time and peak memory, each stage in its own process.

A stage runs in a forked child so that its peak resident memory is its own
(``os.wait4`` returns the child's rusage), not the high-water mark of the bench.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class StageResult:
    """Resources one stage used."""

    name: str
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    value: Any = None

    def row(self) -> str:
        """A fixed-width table row."""
        return f"{self.name:<38}{self.wall_s:>10.2f}{self.cpu_s:>10.2f}{self.peak_rss_mb:>12.0f}"


HEADER = f"{'stage':<38}{'wall s':>10}{'CPU s':>10}{'peak MB':>12}"


def run_stage(name: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> StageResult:
    """Run ``func(*args, **kwargs)`` in a forked child and measure it.

    The return value must be picklable; it comes back in ``StageResult.value``.
    """
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as handle:
        result_path = handle.name
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            value = func(*args, **kwargs)
            with open(result_path, "wb") as out:
                pickle.dump(value, out)
        except BaseException as err:  # report, never fall back into the parent's code
            print(f"stage {name} failed: {type(err).__name__}: {err}", file=sys.stderr)
            code = 1
        finally:
            os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    try:
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"stage {name} failed")
        with open(result_path, "rb") as handle:
            value = pickle.load(handle)
    finally:
        os.unlink(result_path)
    # ru_maxrss is in kilobytes on Linux
    return StageResult(name, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, value)


def print_table(results: list[StageResult]) -> None:
    """Print the per-stage table."""
    print(HEADER)
    for result in results:
        print(result.row())
