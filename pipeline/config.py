"""Command-line options and their resolved configuration.

The configuration is read here, once, and handed to the workflow factories as
keyword arguments: nothing deeper in the code reads a global.  A TOML file given
with ``--config-file`` supplies defaults; options on the command line win.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

ANALYSIS_LEVELS = ("participant", "group")
MODALITIES = ("anat", "func", "dwi")
#: Streamlines per session: real runs, and ``--sloppy`` runs (tests) unless given.
DEFAULT_STREAMLINES, SLOPPY_STREAMLINES = 1_000_000, 20_000
#: Nipype plugins we know by name; any other plugin Nipype can import is accepted too.
KNOWN_PLUGINS = (
    "MultiProc",
    "Linear",
    "LegacyMultiProc",
    "SLURM",
    "SLURMGraph",
    "SGE",
    "SGEGraph",
    "PBS",
    "PBSGraph",
    "LSF",
    "OAR",
    "Condor",
    "DAGMan",
    "IPython",
)


class ConfigError(ValueError):
    """An option or configuration file the user must fix."""


@dataclass
class Config:
    """Every option of a run, resolved (command line over config file over defaults)."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    participant_label: list[str] | None = None
    session_label: list[str] | None = None
    session_roles: dict[str, str] = field(default_factory=dict)
    bids_filter_file: Path | None = None
    work_dir: Path | None = None
    nprocs: int = 0
    omp_nthreads: int = 0
    registration_nthreads: int = 1
    mem_gb: float | None = None
    plugin: str = "MultiProc"
    plugin_args: dict[str, Any] = field(default_factory=dict)
    skip_bids_validation: bool = False
    sloppy: bool = False
    resource_monitor: bool = False
    boilerplate_only: bool = False
    seed: int = 42
    atlas: list[str] = field(default_factory=lambda: ["Seitzman300"])
    anat_reference: str = "unbiased"
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    derivatives: list[Path] = field(default_factory=list)
    fmriprep_dir: Path | None = None
    qsiprep_dir: Path | None = None
    denoise_strategy: str = "8P"
    fd_threshold: float | None = None
    min_minutes: float = 4.0
    fc_estimators: list[str] = field(default_factory=lambda: ["pearson"])
    slice_timing: bool = False
    save_bold: bool = False
    streamlines: int | None = None
    tracking: str = "probabilistic"
    seeding: str = "wm"
    fod_model: str = "auto"
    stopping: str = "threshold"
    save_tractogram: bool = False
    graph_density: float | None = None
    include_flagged: bool = False
    config_file: Path | None = None

    def __post_init__(self) -> None:
        cpus = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
        self.nprocs = self.nprocs or cpus
        self.omp_nthreads = self.omp_nthreads or min(self.nprocs, 8)
        if self.omp_nthreads > self.nprocs:
            raise ConfigError(
                f"--omp-nthreads ({self.omp_nthreads}) cannot exceed --nprocs ({self.nprocs})."
            )
        if self.work_dir is None:
            self.work_dir = Path.cwd() / "work"
        self.bids_dir = Path(self.bids_dir).absolute()
        self.output_dir = Path(self.output_dir).absolute()
        self.work_dir = Path(self.work_dir).absolute()
        if self.output_dir == self.bids_dir:
            raise ConfigError("OUTPUT_DIR must differ from BIDS_DIR; write derivatives elsewhere.")
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown:
            raise ConfigError(f"--modalities {sorted(unknown)}: choose among {list(MODALITIES)}.")
        if self.resource_monitor and importlib.util.find_spec("psutil") is None:
            raise ConfigError(
                "--resource-monitor needs psutil (Nipype samples memory and CPU with it): "
                "pip install psutil, or run without --resource-monitor."
            )
        if self.streamlines is None:
            self.streamlines = SLOPPY_STREAMLINES if self.sloppy else DEFAULT_STREAMLINES
        if self.streamlines < 1:
            raise ConfigError(f"--streamlines {self.streamlines}: must be a positive count.")
        if self.graph_density is not None and not 0 < self.graph_density <= 1:
            raise ConfigError(
                f"--graph-density {self.graph_density}: a proportion in (0, 1], e.g. 0.15."
            )
        if self.min_minutes < 0 or (self.fd_threshold is not None and self.fd_threshold <= 0):
            raise ConfigError("--min-minutes must be >= 0 and --fd-threshold > 0 (mm).")
        self._sort_derivatives()

    def _sort_derivatives(self) -> None:
        """Assign each ``--derivatives`` folder to fMRIPrep or QSIPrep from its description."""
        for path in self.derivatives:
            path = Path(path).absolute()
            kind = derivatives_kind(path)
            if kind == "fmriprep" and self.fmriprep_dir is None:
                self.fmriprep_dir = path
            elif kind == "qsiprep" and self.qsiprep_dir is None:
                self.qsiprep_dir = path
        for key in ("fmriprep_dir", "qsiprep_dir"):
            value = getattr(self, key)
            if value is not None:
                value = Path(value).absolute()
                if not value.is_dir():
                    raise ConfigError(f"{value}: derivatives folder does not exist.")
                setattr(self, key, value)
        self.derivatives = [Path(p).absolute() for p in self.derivatives]

    def to_toml_dict(self) -> dict[str, Any]:
        """Plain types only, so the file round-trips through ``--config-file``."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if value is None:
                continue
            if isinstance(value, list):
                value = [str(v) if isinstance(v, Path) else v for v in value]
            out[key] = str(value) if isinstance(value, Path) else value
        return out

    def bids_filters(self) -> dict[str, Any] | None:
        """The ``--bids-filter-file`` content, checked."""
        if self.bids_filter_file is None:
            return None
        path = Path(self.bids_filter_file)
        try:
            filters = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: --bids-filter-file does not exist.") from err
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: --bids-filter-file is not valid JSON ({err}).") from err
        allowed = {"t1w", "bold", "dwi"}
        if not isinstance(filters, dict) or set(filters) - allowed:
            raise ConfigError(
                f"{path}: --bids-filter-file must be a JSON object with keys among "
                f"{sorted(allowed)}, "
                'e.g. {"bold": {"task": "rest", "acquisition": "mb"}}.'
            )
        return filters


def derivatives_kind(path: Path) -> str:
    """``fmriprep`` or ``qsiprep``, from ``dataset_description.json`` ``GeneratedBy``/``Name``.

    Raises
    ------
    ConfigError
        When the folder is missing, has no readable description, or was made by another tool.
    """
    description = Path(path) / "dataset_description.json"
    try:
        data = json.loads(description.read_text())
    except FileNotFoundError as err:
        raise ConfigError(
            f"{description}: --derivatives folders must be BIDS-Derivatives with a "
            "dataset_description.json (fMRIPrep or QSIPrep output)."
        ) from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"{description}: not valid JSON ({err}).") from err
    names = [str(g.get("Name", "")) for g in data.get("GeneratedBy", []) if isinstance(g, dict)]
    names.append(str(data.get("Name", "")))
    text = " ".join(names).lower()
    for kind in ("fmriprep", "qsiprep"):
        if kind in text:
            return kind
    raise ConfigError(
        f"{description}: GeneratedBy names {names}; Trajectome reads fMRIPrep or QSIPrep "
        "derivatives (use --fmriprep-dir/--qsiprep-dir to force one)."
    )


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_key_values(items: Sequence[str] | None, option: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``; a single JSON object is accepted too."""
    if not items:
        return {}
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        value = _parse_value(items[0])
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{option}: not a JSON object: {items[0]!r}")
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option}: expected KEY=VALUE, got {item!r}.")
        out[key.strip()] = _parse_value(value.strip())
    return out


def package_version() -> str:
    """Installed version of Trajectome."""
    try:
        return metadata.version("trajectome")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def dependency_versions() -> dict[str, str]:
    """Versions of the packages that shape the results, for provenance."""
    names = (
        "trajectome",
        "nipype",
        "nilearn",
        "nibabel",
        "dipy",
        "numpy",
        "scipy",
        "pandas",
        "pybids",
        "antspyx",
        "statsmodels",
        "bids-validator-deno",
    )
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def build_parser() -> argparse.ArgumentParser:
    """The ``trajectome`` argument parser (BIDS-App conventions)."""
    parser = argparse.ArgumentParser(
        prog="trajectome",
        description="Longitudinal functional and structural connectomes from a BIDS dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("bids_dir", type=Path, help="root of the BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="where derivatives are written")
    parser.add_argument("analysis_level", choices=ANALYSIS_LEVELS)
    parser.add_argument("--version", action="version", version=f"trajectome {package_version()}")

    sel = parser.add_argument_group("selecting data")
    sel.add_argument(
        "--participant-label",
        "--participant_label",
        nargs="+",
        metavar="LABEL",
        help="subjects to process (with or without 'sub-'); default all",
    )
    sel.add_argument(
        "--session-label",
        "--session-id",
        nargs="+",
        metavar="LABEL",
        dest="session_label",
        help="sessions to process (with or without 'ses-'); default all",
    )
    sel.add_argument(
        "--session-roles",
        nargs="+",
        metavar="LABEL=ROLE",
        help="assign roles (pre, post, maintenance) to session labels explicitly",
    )
    sel.add_argument(
        "--bids-filter-file",
        type=Path,
        metavar="FILE",
        help='JSON with pybids filters per modality, e.g. {"bold": {"acquisition": "mb"}}',
    )
    sel.add_argument(
        "--skip-bids-validation",
        action="store_true",
        default=None,
        help="do not run bids-validator-deno on the input",
    )

    run = parser.add_argument_group("execution")
    run.add_argument(
        "-w", "--work-dir", type=Path, help="Nipype working directory (reruns resume from it)"
    )
    run.add_argument(
        "--nprocs", "--n-cpus", type=int, help="CPUs for all processes (default: all available)"
    )
    run.add_argument(
        "--omp-nthreads", type=int, help="threads per process (default: min(nprocs, 8))"
    )
    run.add_argument(
        "--registration-nthreads",
        type=int,
        help="threads of each ANTs registration (default 1: multithreaded ANTs registration "
        "is not bit-reproducible; more is faster, capped at --omp-nthreads)",
    )
    run.add_argument("--mem-gb", type=float, help="memory available to the scheduler, GB")
    run.add_argument(
        "--plugin", help="Nipype execution plugin (MultiProc, Linear, SLURMGraph, ...)"
    )
    run.add_argument(
        "--plugin-args",
        nargs="+",
        metavar="KEY=VALUE",
        help="arguments passed to the Nipype plugin (KEY=VALUE pairs or one JSON object)",
    )
    run.add_argument("--config-file", type=Path, help="TOML file of options; the command line wins")
    run.add_argument(
        "--sloppy", action="store_true", default=None, help="cheap settings, for testing only"
    )
    run.add_argument(
        "--resource-monitor",
        action="store_true",
        default=None,
        help="record each step's peak memory and CPU use in its Nipype result file "
        "(sampled every 0.5 s; needs psutil)",
    )
    run.add_argument(
        "--boilerplate-only",
        action="store_true",
        default=None,
        help="write the methods text and citations, then stop",
    )
    run.add_argument("--seed", type=int, help="random seed for everything stochastic")

    proc = parser.add_argument_group("processing")
    proc.add_argument(
        "--atlas",
        nargs="+",
        metavar="ATLAS",
        help="atlases: 'Seitzman300' (bundled, default), a BIDS-Atlas folder, or a "
        "dseg NIfTI with a TSV beside it (index, name, network)",
    )
    proc.add_argument(
        "--anat-reference",
        choices=("unbiased", "first", "sessionwise"),
        help="within-subject anatomical reference (default: unbiased template)",
    )
    proc.add_argument(
        "--modalities",
        nargs="+",
        choices=MODALITIES,
        help="what to process (default: anat func dwi; func/dwi need anat unless derivatives)",
    )
    proc.add_argument(
        "--derivatives",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="fMRIPrep and/or QSIPrep output folders to start from (told apart by their "
        "dataset_description.json)",
    )
    proc.add_argument("--fmriprep-dir", type=Path, help="fMRIPrep output folder (explicit)")
    proc.add_argument("--qsiprep-dir", type=Path, help="QSIPrep output folder (explicit)")

    func = parser.add_argument_group("functional connectome")
    func.add_argument(
        "--denoise-strategy",
        metavar="NAME_OR_YAML",
        help="8P (default: motion, WM, CSF), 24P, 36P, acompcor, acompcor_gsr, or a strategy YAML",
    )
    func.add_argument(
        "--fd-threshold", type=float, help="censor volumes above this FD, mm (strategy default)"
    )
    func.add_argument(
        "--min-minutes",
        type=float,
        help="flag sessions with less uncensored data (minutes; default 4)",
    )
    func.add_argument(
        "--fc-estimators",
        nargs="+",
        choices=("pearson", "partial", "ledoit_wolf"),
        help="connectivity estimators (default pearson)",
    )
    func.add_argument(
        "--slice-timing", action="store_true", default=None, help="slice-timing correction"
    )
    func.add_argument(
        "--save-bold", action="store_true", default=None, help="also write the MNI-space BOLD"
    )

    dwi = parser.add_argument_group("structural connectome")
    dwi.add_argument(
        "--streamlines", type=int, help="streamlines per session (default 1000000; sloppy 20000)"
    )
    dwi.add_argument("--tracking", choices=("probabilistic", "deterministic"))
    dwi.add_argument(
        "--seeding", choices=("wm", "gmwmi"), help="seed in WM or at the GM/WM interface"
    )
    dwi.add_argument(
        "--fod-model",
        choices=("auto", "csd", "msmt_csd", "csa"),
        help="fibre orientation model (auto: chosen from the shells and directions)",
    )
    dwi.add_argument(
        "--stopping",
        choices=("cmc", "act", "threshold"),
        help="tractography stopping: FA below the grey-matter level (default), continuous map "
        "criterion, or ACT",
    )
    dwi.add_argument(
        "--save-tractogram", action="store_true", default=None, help="write the tractogram (TCK)"
    )

    net = parser.add_argument_group("network metrics and statistics")
    net.add_argument(
        "--graph-density",
        type=float,
        help="proportional threshold for graph measures (default: all positive weights)",
    )
    net.add_argument(
        "--include-flagged",
        action="store_true",
        default=None,
        help="keep QC-flagged sessions in group statistics",
    )
    return parser


_OPTION_FIELDS = {f.name for f in fields(Config)} - {
    "bids_dir",
    "output_dir",
    "analysis_level",
    "config_file",
}


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: --config-file does not exist.") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err}).") from err
    data = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = set(data) - _OPTION_FIELDS
    if unknown:
        raise ConfigError(
            f"{path}: unknown option(s) {sorted(unknown)}; valid: {sorted(_OPTION_FIELDS)}."
        )
    return data


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse the command line (and the optional TOML file) into a :class:`Config`.

    Raises
    ------
    ConfigError
        With a message the user can act on.
    """
    from pipeline.bids import parse_session_roles

    args = build_parser().parse_args(argv)
    values: dict[str, Any] = _load_toml(args.config_file) if args.config_file else {}
    for key in _OPTION_FIELDS:
        cli_value = getattr(args, key, None)
        if cli_value is not None:
            values[key] = cli_value
    if isinstance(values.get("plugin_args"), list):
        values["plugin_args"] = parse_key_values(values["plugin_args"], "--plugin-args")
    roles = values.get("session_roles")
    if isinstance(roles, list):
        values["session_roles"] = parse_session_roles(roles)
    elif isinstance(roles, dict):
        values["session_roles"] = parse_session_roles([f"{k}={v}" for k, v in roles.items()])
    for key in ("work_dir", "bids_filter_file", "fmriprep_dir", "qsiprep_dir"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    if values.get("derivatives") is not None:
        items = values["derivatives"]
        values["derivatives"] = [Path(p) for p in ([items] if isinstance(items, str) else items)]
    for key in ("participant_label", "session_label"):
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
    return Config(
        bids_dir=args.bids_dir,
        output_dir=args.output_dir,
        analysis_level=args.analysis_level,
        config_file=args.config_file,
        **values,
    )
