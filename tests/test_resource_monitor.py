"""``--resource-monitor``: the option, its provenance, and what it makes Nipype record."""

from pathlib import Path

import numpy as np
import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from nipype.utils.filemanip import loadpkl

from pipeline import config as config_module
from pipeline.config import ConfigError, parse_args
from workflows.run import MONITOR_INTERVAL_S, run_workflow

ALLOCATED_MB = 300


def _hold_memory(megabytes: int, seconds: float) -> float:
    """Keep ``megabytes`` resident and a core busy for ``seconds``; return the CPU s used."""
    import time

    import numpy as np

    cpu = time.process_time()
    block = np.ones(megabytes * 2**20 // 8)  # float64: touched, so resident
    total, end = 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        total += float(block[::4096].sum())
    return time.process_time() - cpu


def _run(tmp_path: Path, monitor: bool, plugin: str = "MultiProc") -> object:
    node = pe.Node(niu.Function(input_names=["megabytes", "seconds"], output_names=["cpu_s"],
                                function=_hold_memory), name="hold")
    node.inputs.megabytes, node.inputs.seconds = ALLOCATED_MB, 1.5
    workflow = pe.Workflow(name="monitor_wf")
    workflow.add_nodes([node])
    failures = run_workflow(workflow, work_dir=tmp_path / "work", crash_dir=tmp_path / "crash",
                            plugin=plugin, nprocs=1, resource_monitor=monitor)
    assert failures == []
    return loadpkl(tmp_path / "work" / "monitor_wf" / "hold" / "result_hold.pklz")


def test_flag_parses_and_is_recorded(tmp_path):
    pytest.importorskip("psutil")
    base = [str(tmp_path / "bids"), str(tmp_path / "out"), "participant"]
    assert parse_args(base).resource_monitor is False
    cfg = parse_args([*base, "--resource-monitor"])
    assert cfg.resource_monitor is True
    assert cfg.to_toml_dict()["resource_monitor"] is True
    toml = tmp_path / "run.toml"
    toml.write_text("resource-monitor = true\n")
    assert parse_args([*base, "--config-file", str(toml)]).resource_monitor is True


def test_flag_without_psutil_is_a_usage_error(tmp_path, monkeypatch):
    real = config_module.importlib.util.find_spec
    monkeypatch.setattr(config_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "psutil" else real(name, *a))
    with pytest.raises(ConfigError, match="psutil"):
        parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "participant",
                    "--resource-monitor"])


def test_run_workflow_records_peak_memory_and_cpu(tmp_path, monkeypatch):
    pytest.importorskip("psutil")
    from nipype import config as nipype_config

    monkeypatch.chdir(tmp_path)
    result = _run(tmp_path / "on", monitor=True)
    runtime = result.runtime
    samples = runtime.prof_dict
    # the node allocated ALLOCATED_MB above what its process held when monitoring began
    assert runtime.mem_peak_gb == pytest.approx(max(samples["rss_GiB"]))
    assert runtime.mem_peak_gb - samples["rss_GiB"][0] >= 0.9 * ALLOCATED_MB / 1024
    times = np.diff(samples["time"])
    assert len(times) >= 3
    assert np.median(times) == pytest.approx(MONITOR_INTERVAL_S, abs=0.15)
    # each sample's CPU % covers the interval before it: the integral is the CPU time used,
    # which the function measured itself (the machine may be loaded: not 100 % of a core)
    sampled_cpu_s = float(np.sum(np.asarray(samples["cpus"][1:]) / 100 * times))
    used = result.outputs.cpu_s
    assert used > 0.1 and runtime.cpu_percent > 0
    assert sampled_cpu_s == pytest.approx(used, rel=0.3, abs=0.3)
    # process-global Nipype config is put back: later runs in this process are unmonitored
    assert not nipype_config.resource_monitor
    assert float(nipype_config.get("execution", "resource_monitor_frequency", 1)) == 1
    # the monitor's sample files go to the work directory, not the caller's
    assert not list(tmp_path.glob(".proc-*"))
    assert list((tmp_path / "on" / "work" / "resource_monitor").glob(".proc-*"))
    off = _run(tmp_path / "off", monitor=False, plugin="Linear").runtime
    assert getattr(off, "mem_peak_gb", None) is None
