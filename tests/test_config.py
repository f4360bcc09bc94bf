"""Command-line parsing, TOML configuration and provenance helpers."""

import pytest

from pipeline import config


def _parse(tmp_path, *extra):
    return config.parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", *extra])


def test_defaults_and_paths(tmp_path):
    cfg = _parse(tmp_path)
    assert cfg.plugin == "MultiProc"
    assert cfg.nprocs >= 1 and 1 <= cfg.omp_nthreads <= cfg.nprocs
    assert cfg.output_dir.is_absolute() and cfg.work_dir.is_absolute()


def test_labels_roles_and_plugin_args(tmp_path):
    cfg = _parse(
        tmp_path,
        "--participant-label",
        "sub-01",
        "02",
        "--session-id",
        "ses-pre",
        "--session-roles",
        "A=pre",
        "ses-B=post",
        "C=maintenance",
        "--plugin",
        "Linear",
        "--plugin-args",
        "n_procs=2",
        "overwrite=true",
        "queue=short",
    )
    assert cfg.participant_label == ["sub-01", "02"]
    assert cfg.session_label == ["ses-pre"]
    assert cfg.session_roles == {"A": "pre", "B": "post", "C": "maintenance"}
    assert cfg.plugin_args == {"n_procs": 2, "overwrite": True, "queue": "short"}


def test_plugin_args_json(tmp_path):
    cfg = _parse(tmp_path, "--plugin-args", '{"sbatch_args": "-p short", "max_jobs": 4}')
    assert cfg.plugin_args == {"sbatch_args": "-p short", "max_jobs": 4}


def test_toml_gives_defaults_and_command_line_wins(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'nprocs = 1\nomp-nthreads = 1\nsloppy = true\nparticipant_label = "03"\n'
        'session_roles = { x = "pre", y = "post" }\n'
    )
    cfg = _parse(tmp_path, "--config-file", str(toml), "--participant-label", "04")
    assert cfg.nprocs == 1 and cfg.sloppy is True
    assert cfg.participant_label == ["04"]
    assert cfg.session_roles == {"x": "pre", "y": "post"}


def test_resolved_config_round_trips(tmp_path):
    import tomli_w

    cfg = _parse(tmp_path, "--nprocs", "2", "--omp-nthreads", "1", "--session-roles", "a=pre")
    saved = tmp_path / "saved.toml"
    options = {
        k: v
        for k, v in cfg.to_toml_dict().items()
        if k not in {"bids_dir", "output_dir", "analysis_level", "config_file"}
    }
    saved.write_bytes(tomli_w.dumps(options).encode())
    again = _parse(tmp_path, "--config-file", str(saved))
    assert (
        again.nprocs == 2 and again.session_roles == {"a": "pre"} and again.work_dir == cfg.work_dir
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [("nprocz = 2\n", "unknown option"), ("nprocs = \n", "not valid TOML")],
)
def test_bad_toml(tmp_path, content, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(content)
    with pytest.raises(config.ConfigError, match=message):
        _parse(tmp_path, "--config-file", str(toml))


def test_bad_options(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot exceed"):
        _parse(tmp_path, "--nprocs", "1", "--omp-nthreads", "2")
    with pytest.raises(config.ConfigError, match="KEY=VALUE"):
        _parse(tmp_path, "--plugin-args", "novalue")
    with pytest.raises(config.ConfigError, match="must differ"):
        config.parse_args([str(tmp_path), str(tmp_path), "participant"])


def test_bids_filter_file(tmp_path):
    good = tmp_path / "filter.json"
    good.write_text('{"bold": {"acquisition": "mb"}}')
    assert _parse(tmp_path, "--bids-filter-file", str(good)).bids_filters() == {
        "bold": {"acquisition": "mb"}
    }
    bad = tmp_path / "bad.json"
    bad.write_text('{"bolt": {}}')
    with pytest.raises(config.ConfigError, match="keys among"):
        _parse(tmp_path, "--bids-filter-file", str(bad)).bids_filters()


def test_versions_include_core_packages():
    versions = config.dependency_versions()
    assert {"nipype", "nibabel", "numpy"} <= set(versions)
