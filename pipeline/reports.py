"""Self-contained HTML reports: one per subject (``sub-X.html``) and one for the group.

Figures are matplotlib SVG text inlined in the page (raster parts such as slices and matrices
become base64 PNG data URIs inside the SVG); the style sheet is inlined too, so a report is a
single file with no external resource.  Reports only *read* the derivatives folder: inputs
are found by globbing BIDS entities (suffix, ``stat``, ``desc``, ``atlas``), and a section
whose inputs are missing or unreadable says so instead of failing the report.

Determinism: matplotlib's ``svg.hashsalt`` is fixed, the SVG metadata (date) is dropped and
SVG ids are renamed per figure in page order, so the same inputs give the same bytes.

Trajectory tables (``sub-X/sub-X_desc-trajectories*.tsv``) are accepted in two layouts:

* long: one row per metric and session, columns ``metric`` (+ optional ``network_a``,
  ``network_b``, ``network``, ``modality``, ``scope``, ``node``, ``atlas``), ``value``,
  ``session`` (or ``session_id``), ``role``, ``order``, optional ``se``;
* wide: one row per metric with a column per role (``pre``, ``post``, ``maintenance``) and
  optional ``<role>_se``.

Either may carry ``maintenance_class``, ``class_probability`` (or ``p_<class>`` columns),
``acute_change``, ``maintenance_change`` and ``group``.
"""

from __future__ import annotations

import functools
import html
import io
import json
import re
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import matplotlib
import nibabel as nb
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pipeline.bids import ROLES, infer_role
from pipeline.derivatives import atomic_write
from pipeline.groupstats import GROUP_OUTPUTS
from pipeline.longitudinal import NO_ACUTE_CHANGE

#: rcParams of every figure; the fixed hash salt makes SVG ids reproducible.
_RC = {
    "svg.hashsalt": "trajectome",
    "svg.fonttype": "none",  # text stays text: smaller and searchable
    "svg.image_inline": True,
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 9,
    "savefig.dpi": 100,
    "figure.dpi": 100,
    "image.interpolation": "nearest",
    "path.simplify": True,
}

#: Metrics shown on the trajectory page: DMN/salience/frontoparietal FC, coupling, hippocampus.
KEY_METRIC_PATTERN = re.compile(
    r"default|dmn|salien|sal.?vent|frontopariet|executive|\bcont\b|coupling|hippocamp",
    re.IGNORECASE,
)
#: Networks of the key metrics (the trajectory page, :func:`_metric_rank`).
_KEY_NETWORK = re.compile(r"default|dmn|salien|sal.?vent|frontopariet|executive|^cont$",
                          re.IGNORECASE)
_IDENTITY_COLUMNS = ("metric", "modality", "scope", "network", "network_a", "network_b",
                     "node", "atlas")
_SE_COLUMNS = ("se", "stderr", "value_se", "sem", "standard_error")
_Q_COLUMNS = ("q", "q_value", "qvalue", "q_fdr", "fdr", "p_fdr")
_P_COLUMNS = ("p", "p_value", "pvalue", "p_val")
_CONTROL_NAMES = ("control", "controls", "hc", "healthy", "ctl")
_MAX_TRAJECTORIES = 24
_MAX_EFFECT_PLOTS = 6
_MAX_TABLE_ROWS = 50  # longer group tables show this many rows, the rest folded
_ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}
#: Legends under the x tick labels: inside the axes they hid data points.
_LEGEND_BELOW = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.2), "ncol": 2,
                 "fontsize": 6, "frameon": False}
_NETWORK_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                   "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


# --------------------------------------------------------------------------- SVG figures


def svg_from_figure(fig: Figure) -> str:
    """Serialise a matplotlib figure as inline-ready SVG text (no XML prolog, no metadata)."""
    buffer = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL)
    # namespace declarations are implied for <svg> inside HTML5 and are URLs we do not need
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text)
    return text.strip() + "\n"


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=_RC["figure.dpi"])


def _styled(function: Callable[..., str]) -> Callable[..., str]:
    """Draw under :data:`_RC` only: text sizes are read when artists are made, and the
    caller's global rcParams must neither leak in (determinism) nor be changed."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> str:
        with matplotlib.rc_context(_RC):
            return function(*args, **kwargs)

    return wrapper


def _prefix_ids(svg: str, prefix: str) -> str:
    """Make SVG ids unique in the page: many figures share one HTML id namespace."""
    for oid in sorted(set(re.findall(r'\sid="([^"]+)"', svg)), key=len, reverse=True):
        new = f"{prefix}-{oid}"
        svg = svg.replace(f'id="{oid}"', f'id="{new}"')
        svg = svg.replace(f'"#{oid}"', f'"#{new}"').replace(f"#{oid})", f"#{new})")
    return svg


def _canonical_data(img: nb.Nifti1Image) -> tuple[np.ndarray, tuple[float, ...]]:
    ras = nb.as_closest_canonical(img)
    data = np.asarray(ras.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    return data, tuple(float(z) for z in ras.header.get_zooms()[:3])


@_styled
def anat_mosaic_svg(
    t1w: nb.Nifti1Image,
    *,
    mask: nb.Nifti1Image | None = None,
    gm: nb.Nifti1Image | None = None,
    wm: nb.Nifti1Image | None = None,
    labels: nb.Nifti1Image | None = None,
    n_axial: int = 3,
    title: str = "",
) -> str:
    """Axial, coronal and sagittal slices of a T1w with brain-mask, GM and WM contours.

    Overlays must be on the T1w grid (same shape once reoriented to RAS); others are skipped.

    Parameters
    ----------
    t1w : nibabel.Nifti1Image
        Anatomical image (3-D).
    mask, gm, wm : nibabel.Nifti1Image, optional
        Brain mask (contour at 0.5, red), GM and WM probabilities (contour at 0.5; green, blue).
    labels : nibabel.Nifti1Image, optional
        Integer label image (e.g. an atlas warped to the T1w) shown as translucent colours.
    n_axial : int
        Axial slices, evenly spread over the brain's extent; one coronal and one sagittal
        slice through the centre follow.
    title : str
        Figure title.

    Returns
    -------
    str
        SVG text.
    """
    data, zooms = _canonical_data(t1w)
    overlays = []
    for img, color in ((mask, "#e41a1c"), (gm, "#4daf4a"), (wm, "#377eb8")):
        if img is None:
            continue
        odata, _ = _canonical_data(img)
        if odata.shape == data.shape:
            overlays.append((odata, color))
    label_data = None
    if labels is not None:
        label_data = np.rint(_canonical_data(labels)[0]).astype(int)
        label_data = label_data if label_data.shape == data.shape else None
    mask_ok = bool(overlays) and mask is not None and overlays[0][1] == "#e41a1c"
    extent_source = overlays[0][0] > 0.5 if mask_ok else data > 0
    if not extent_source.any():
        extent_source = np.ones(data.shape, bool)
    nz = np.argwhere(extent_source)
    lo, hi = nz.min(axis=0), nz.max(axis=0)
    centre = ((lo + hi) // 2).astype(int)
    axial = np.unique(np.round(np.linspace(lo[2], hi[2], n_axial + 2)[1:-1]).astype(int))
    positive = data[data > 0]
    vmax = float(np.percentile(positive, 99.5)) if positive.size else 1.0

    def cut(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
        return np.take(volume, index, axis=axis).T

    cuts = [(2, int(k), zooms[1] / zooms[0]) for k in axial]
    cuts += [(1, int(centre[1]), zooms[2] / zooms[0]), (0, int(centre[0]), zooms[2] / zooms[1])]
    fig = _new_figure(1.6 * len(cuts), 1.9)
    axes = fig.subplots(1, len(cuts))
    for ax, (axis, index, aspect) in zip(np.atleast_1d(axes), cuts, strict=True):
        ax.imshow(cut(data, axis, index), cmap="gray", vmin=0, vmax=vmax, origin="lower",
                  aspect=aspect)
        if label_data is not None:
            plane = cut(label_data, axis, index)
            # neighbouring labels get distinct colours; background stays transparent
            shown = np.ma.masked_equal(plane, 0) % 10
            ax.imshow(shown, cmap="tab10", vmin=0, vmax=9, alpha=0.7, origin="lower",
                      aspect=aspect, interpolation="nearest")
        for odata, color in overlays:
            plane = cut(odata, axis, index)
            if plane.min() < 0.5 < plane.max():
                contour = ax.contour(plane, levels=[0.5], colors=color, linewidths=0.6)
                contour.set_rasterized(True)  # keeps the file small on 1 mm images
        ax.set_title(f"{'xyz'[axis]}={index}", fontsize=7)
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return svg_from_figure(fig)


@_styled
def fd_trace_svg(
    fd: np.ndarray,
    *,
    censored: np.ndarray | None = None,
    non_steady: np.ndarray | None = None,
    threshold: float | None = None,
    run_starts: Sequence[int] = (),
    title: str = "Framewise displacement",
) -> str:
    """Framewise displacement per volume, censored volumes shaded, threshold as a dashed line.

    Parameters
    ----------
    fd : (n,) array
        FD in mm (NaN allowed, e.g. the first volume).
    censored, non_steady : (n,) bool arrays, optional
        Volumes removed for motion (red band) and initial non-steady-state ones (grey band).
    threshold : float, optional
        FD censoring threshold (mm).
    run_starts : sequence of int
        Volume indices where a new run starts (dotted vertical lines).
    """
    fd = np.asarray(fd, dtype=float)
    x = np.arange(fd.size)
    fig = _new_figure(7.0, 1.8)
    ax = fig.subplots()
    for flags, color, label in ((non_steady, "#999999", "non-steady-state"),
                                (censored, "#e41a1c", "censored")):
        if flags is not None and np.any(flags):
            # one bar per run of consecutive flagged volumes, full height
            spans = [(start - 0.5, stop - start)
                     for _, start, stop in _blocks(np.asarray(flags, bool).tolist()) if _]
            ax.broken_barh(spans, (0, 1), color=color, alpha=0.25, linewidth=0,
                           transform=ax.get_xaxis_transform(),
                           label=f"{label} ({int(np.sum(flags))})")
    ax.plot(x, fd, color="#222222", linewidth=0.8)
    if threshold is not None and np.isfinite(threshold):
        ax.axhline(threshold, color="#e41a1c", linestyle="--", linewidth=0.8,
                   label=f"threshold {threshold:g} mm")
    for start in run_starts:
        ax.axvline(start - 0.5, color="#555555", linestyle=":", linewidth=0.8)
    ax.set_xlim(-0.5, max(fd.size - 0.5, 0.5))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("volume")
    ax.set_ylabel("FD (mm)")
    ax.set_title(title, loc="left")
    if ax.get_legend_handles_labels()[0]:  # above the axes: spikes sit anywhere
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=6,
                  frameon=False, borderaxespad=0.2)
    return svg_from_figure(fig)


def _network_order(
    names: Sequence[str], networks: Mapping[str, str] | None
) -> tuple[np.ndarray, list[str]]:
    """Permutation grouping nodes by network (atlas order of networks), and the labels."""
    networks = networks or {}
    labels = [str(networks.get(name, "unknown")) for name in names]
    rank = {net: i for i, net in enumerate(dict.fromkeys(networks.values()))}
    order = np.array(sorted(range(len(names)), key=lambda i: (rank.get(labels[i], len(rank)), i)),
                     dtype=int)
    return order, [labels[i] for i in order]


def _blocks(labels: Sequence[Any]) -> list[tuple[Any, int, int]]:
    """Runs of equal labels as ``(label, start, stop)``."""
    out: list[tuple[Any, int, int]] = []
    for i, label in enumerate(labels):
        if out and out[-1][0] == label:
            out[-1] = (label, out[-1][1], i + 1)
        else:
            out.append((label, i, i + 1))
    return out


def _thin_ticks(ax: Any, blocks: Sequence[tuple[Any, int, int]], n: int, axis: str,
                fontsize: float) -> list[tuple[float, str]]:
    """Tick (position, label) per network block, leaving out labels that would overlap
    their neighbour (small networks between big ones); the block outlines stay."""
    box = ax.get_position()
    inches = (box.height * ax.figure.get_figheight() if axis == "y"
              else box.width * ax.figure.get_figwidth())
    min_gap = n * 1.15 * fontsize / 72 / max(inches, 1e-6)  # rows per label height
    kept: list[tuple[float, str]] = []
    for label, start, stop in blocks:
        centre = (start + stop - 1) / 2
        if not kept or centre - kept[-1][0] >= min_gap:
            kept.append((centre, str(label)))
    return kept


@_styled
def matrix_svg(
    matrix: pd.DataFrame,
    networks: Mapping[str, str] | None = None,
    *,
    title: str = "",
    kind: str = "fc",
) -> str:
    """A connectivity matrix ordered by network, blocks outlined and labelled.

    Parameters
    ----------
    matrix : pandas.DataFrame
        Square, parcel names as index and columns.
    networks : mapping, optional
        Parcel name -> network; unknown parcels go last as ``unknown``.
    title : str
        Figure title.
    kind : {"fc", "sc"}
        ``fc``: signed colour scale symmetric about 0; ``sc``: log(1 + count).
    """
    names = [str(n) for n in matrix.index]
    order, labels = _network_order(names, networks)
    values = matrix.to_numpy(dtype=float)[np.ix_(order, order)]
    fig = _new_figure(4.2, 3.8)
    ax = fig.subplots()
    off = values[~np.eye(len(values), dtype=bool)]
    off = off[np.isfinite(off)]
    if kind == "sc":
        shown = np.log1p(np.clip(values, 0, None))
        image = ax.imshow(shown, cmap="viridis", vmin=0, interpolation="nearest")
        bar_label = "log(1 + streamlines)"
    else:
        vmax = float(np.max(np.abs(off))) if off.size else 1.0
        vmax = vmax if vmax > 0 else 1.0
        image = ax.imshow(values, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        bar_label = "r"
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=bar_label)
    blocks = _blocks(labels)
    for _, start, stop in blocks:
        ax.add_patch(Rectangle(
            (start - 0.5, start - 0.5), stop - start, stop - start, fill=False,
            edgecolor="black", linewidth=0.6))
    if len(blocks) > 1:
        ticks = _thin_ticks(ax, blocks, len(names), "y", 7)
        ax.set_xticks([t for t, _ in ticks], [lab for _, lab in ticks], rotation=90, fontsize=7)
        ax.set_yticks([t for t, _ in ticks], [lab for _, lab in ticks], fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title)
    return svg_from_figure(fig)


@_styled
def carpet_svg(
    timeseries: pd.DataFrame,
    networks: Mapping[str, str] | None = None,
    *,
    title: str = "Parcel time series (z-scored)",
) -> str:
    """Carpet plot of parcel time series (rows grouped by network, columns = time points)."""
    names = [str(c) for c in timeseries.columns]
    order, labels = _network_order(names, networks)
    data = timeseries.to_numpy(dtype=float)[:, order].T
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (data - np.nanmean(data, axis=1, keepdims=True)) / np.nanstd(data, axis=1,
                                                                          keepdims=True)
    z = np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
    fig = _new_figure(7.0, 2.4)
    ax = fig.subplots()
    ax.imshow(z, cmap="gray", vmin=-2, vmax=2, aspect="auto", interpolation="nearest")
    blocks = _blocks(labels)
    for _, start, _stop in blocks[1:]:
        ax.axhline(start - 0.5, color="#e41a1c", linewidth=0.5)
    if len(blocks) > 1:
        ticks = _thin_ticks(ax, blocks, len(names), "y", 7)
        ax.set_yticks([t for t, _ in ticks], [lab for _, lab in ticks], fontsize=7)
    ax.set_xlabel("kept volume (censored volumes removed)")
    ax.set_title(title)
    return svg_from_figure(fig)


@_styled
def trajectory_svg(
    points: pd.DataFrame,
    *,
    control: pd.DataFrame | None = None,
    title: str = "",
) -> str:
    """One metric across sessions with SE error bars and the control mean +/- 1 SD band.

    Parameters
    ----------
    points : pandas.DataFrame
        In session order; columns ``tick`` (axis label), ``value``, optional ``se`` and ``role``.
    control : pandas.DataFrame, optional
        Columns ``role``, ``mean``, ``sd``: the band is drawn at the sessions of each role.
    title : str
        Figure title.
    """
    x = np.arange(len(points))
    values = points["value"].to_numpy(dtype=float)
    se = points["se"].to_numpy(dtype=float) if "se" in points else np.full(len(points), np.nan)
    fig = _new_figure(3.4, 2.2)
    ax = fig.subplots()
    if control is not None and len(control) and "role" in points:
        band = points[["role"]].merge(control, on="role", how="left")
        mean, sd = band["mean"].to_numpy(dtype=float), band["sd"].to_numpy(dtype=float)
        if np.isfinite(mean).any():
            ax.fill_between(x, mean - sd, mean + sd, color="#999999", alpha=0.3, linewidth=0,
                            label="controls ±1 SD")
            ax.plot(x, mean, color="#777777", linewidth=0.8, linestyle="--")
    if np.isfinite(se).any():
        ax.errorbar(x, values, yerr=np.nan_to_num(se), color="#1f4e79", marker="o",
                    markersize=4, linewidth=1.2, capsize=3)
    else:
        ax.plot(x, values, color="#1f4e79", marker="o", markersize=4, linewidth=1.2)
    ax.set_xticks(x, list(points["tick"]), fontsize=6)
    ax.set_xlim(-0.4, len(points) - 0.6)
    # a long label would widen the figure past its card
    ax.set_title(textwrap.fill(title, 52, break_on_hyphens=False), fontsize=8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**_LEGEND_BELOW)
    return svg_from_figure(fig)


@_styled
def effects_by_role_svg(values: pd.DataFrame, *, title: str = "") -> str:
    """Each subject's value per role (lines join a subject's sessions), coloured by group.

    Parameters
    ----------
    values : pandas.DataFrame
        Columns ``subject``, ``group``, ``role``, ``value``.
    """
    roles = [r for r in ROLES if r in set(values["role"])] + sorted(
        set(values["role"].dropna()) - set(ROLES))
    xpos = {r: i for i, r in enumerate(roles)}
    groups = sorted(set(values["group"].fillna("unknown")))
    fig = _new_figure(3.4, 2.4)
    ax = fig.subplots()
    for g_index, group in enumerate(groups):
        color = _NETWORK_COLORS[g_index % len(_NETWORK_COLORS)]
        shift = (g_index - (len(groups) - 1) / 2) * 0.12
        part = values[values["group"].fillna("unknown") == group]
        for _, rows in part.groupby("subject", sort=True):
            rows = rows[rows["role"].isin(xpos)]
            xs = rows["role"].map(xpos).to_numpy(dtype=float) + shift
            ax.plot(xs, rows["value"].to_numpy(dtype=float), color=color, alpha=0.35,
                    linewidth=0.7, marker="o", markersize=2.5)
        means = part.groupby("role")["value"].mean()
        present = [r for r in roles if r in means.index]
        ax.plot([xpos[r] + shift for r in present], [means[r] for r in present], color=color,
                marker="D", markersize=5, linewidth=2, label=f"{group} mean")
    ax.set_xticks(range(len(roles)), roles)
    ax.set_xlim(-0.5, len(roles) - 0.5)
    ax.set_title(title, fontsize=8)
    ax.legend(**_LEGEND_BELOW)
    return svg_from_figure(fig)


# --------------------------------------------------------------------------- finding inputs


def parse_entities(name: str) -> tuple[dict[str, str], str, str]:
    """Entities, suffix and extension of a BIDS file name.

    Examples
    --------
    >>> parse_entities("sub-1_ses-a_stat-mean_timeseries.tsv")
    ({'sub': '1', 'ses': 'a', 'stat': 'mean'}, 'timeseries', '.tsv')
    """
    stem, dot, ext = name.partition(".")
    parts = stem.split("_")
    entities = dict(p.split("-", 1) for p in parts[:-1] if "-" in p)
    return entities, parts[-1], dot + ext


def find_files(folder: Path, suffix: str, extension: str = ".tsv", **entities: str | None
               ) -> list[Path]:
    """Files in ``folder`` with that suffix/extension and entities (``None``: entity absent)."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        ents, suf, ext = parse_entities(path.name)
        if suf != suffix or ext != extension or path.name.startswith("."):
            continue
        if all(ents.get(k) == v for k, v in entities.items()):
            found.append(path)
    return found


def _first(*candidates: list[Path]) -> Path | None:
    for paths in candidates:
        if paths:
            return paths[0]
    return None


def _read_tsv(path: Path, **kwargs: Any) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=["n/a"], **kwargs)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _sidecar(path: Path) -> dict[str, Any]:
    name = path.name.split(".")[0] + ".json"
    return _read_json(path.with_name(name))


def read_relmat(path: Path) -> pd.DataFrame:
    """A relmat TSV (first column ``Node``) as a square DataFrame indexed by parcel name."""
    table = _read_tsv(path, index_col=0)
    table.index = table.index.astype(str)
    if list(table.index) != [str(c) for c in table.columns]:
        raise ValueError(f"{path}: not a square relmat (row and column names differ)")
    return table


def _label(subject: str) -> str:
    return subject.removeprefix("sub-")


def _session_table(output_dir: Path, subject: str) -> pd.DataFrame:
    """Sessions of a subject in timeline order with their roles."""
    sub_dir = output_dir / f"sub-{subject}"
    rows: dict[str, dict[str, Any]] = {}
    table_path = sub_dir / f"sub-{subject}_sessions.tsv"
    if table_path.exists():
        try:
            table = pd.read_csv(table_path, sep="\t", dtype=str, keep_default_na=False)
            for i, row in table.iterrows():
                label = str(row.get("session_id", "")).removeprefix("ses-")
                if label:
                    order = pd.to_numeric(row.get("order", ""), errors="coerce")
                    rows[label] = {"role": row.get("role") or infer_role(label),
                                   "order": float(order) if pd.notna(order) else float(i) + 1}
        except (OSError, ValueError):
            pass
    if sub_dir.is_dir():
        for folder in sorted(sub_dir.glob("ses-*")):
            label = folder.name.removeprefix("ses-")
            if folder.is_dir() and label not in rows:
                role = infer_role(label)
                rank = _ROLE_RANK.get(role or "", len(ROLES))
                rows[label] = {"role": role, "order": 1000.0 + rank}
    out = pd.DataFrame([{"session": k, **v} for k, v in rows.items()],
                       columns=["session", "role", "order"])
    return out.sort_values(["order", "session"], kind="stable").reset_index(drop=True)


def _atlas_networks(output_dir: Path, atlas: str,
                    atlas_tables: Mapping[str, pd.DataFrame] | None) -> dict[str, str] | None:
    table = (atlas_tables or {}).get(atlas)
    if table is None:
        path = output_dir / "atlases" / f"atlas-{atlas}" / f"atlas-{atlas}_dseg.tsv"
        if path.exists():
            try:
                table = _read_tsv(path)
            except (OSError, ValueError):
                table = None
    if table is None or not {"name", "network"} <= set(table.columns):
        return None
    if "index" in table:
        table = table.sort_values("index", kind="stable")
    return dict(zip(table["name"].astype(str), table["network"].astype(str), strict=True))


# --------------------------------------------------------------------------- HTML pieces


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: object) -> str:
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):
            return "n/a"
        return f"{float(value):.4g}"
    if value is None or (isinstance(value, str) and value == ""):
        return "n/a"
    try:
        if pd.isna(value):
            return "n/a"
    except (TypeError, ValueError):
        pass
    return str(value)


def _fmt_distinct(values: Sequence[float]) -> list[str]:
    """Format numbers with enough significant digits (4 to 10) for unequal values to read
    unequal: 356.475 and 356.485 must not both print as 356.5 next to a change of 0.0095."""
    finite = np.array([v for v in values if np.isfinite(v)], dtype=float)
    digits = 4
    if finite.size > 1:
        spread = np.abs(np.diff(np.unique(finite)))
        scale = float(np.max(np.abs(finite)))
        if spread.size and scale > 0:
            digits = int(np.clip(np.ceil(np.log10(scale / spread.min())) + 1, 4, 10))
    return [f"{v:.{digits}g}" if np.isfinite(v) else "n/a" for v in np.asarray(values, float)]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool)


def _cell_class(value: object) -> str:
    if _is_number(value):
        return ""
    # a file or node name longer than a column may break anywhere ("long" in the CSS)
    long = any(len(word) > 30 for word in _fmt(value).split())
    return ' class="text long"' if long else ' class="text"'


def table_html(table: pd.DataFrame, *, row_class: Sequence[str] | None = None) -> str:
    """An HTML table (numbers to 4 significant digits, ``n/a`` for missing values).

    ``row_class`` gives a CSS class per row (``"highlight"``, ``"flag"`` or ``""``).
    """
    # long snake_case names may wrap after an underscore, never inside a word
    head = "".join(f"<th>{_esc(c).replace('_', '_<wbr>')}</th>" for c in table.columns)
    body = []
    classes = list(row_class) if row_class is not None else [""] * len(table)
    for cls, row in zip(classes, table.itertuples(index=False), strict=True):
        cells = "".join(f"<td{_cell_class(v)}>{_esc(_fmt(v))}</td>" for v in row)
        attr = f' class="{cls}"' if cls else ""
        body.append(f"<tr{attr}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>\n"


def _folded(summary: str, body: str) -> str:
    """A long part the reader opens on demand (no script: an HTML ``<details>``)."""
    return f"<details><summary>{_esc(summary)}</summary>\n{body}</details>\n"


def _na(what: str) -> str:
    return f'<p class="na">{_esc(what)}: not available.</p>\n'


class _Page:
    """Collects figures with page-unique SVG ids."""

    def __init__(self) -> None:
        self.n_figures = 0

    def figure(self, svg: str, caption: str = "") -> str:
        self.n_figures += 1
        svg = _prefix_ids(svg, f"f{self.n_figures}")
        cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
        return f"<figure>{svg}{cap}</figure>\n"

    def guarded(self, what: str, build: Callable[[], str]) -> str:
        """Run a section builder; an unreadable input becomes a message, never a crash."""
        try:
            return build()
        except Exception as error:  # a report must survive any bad input
            return (f'<p class="error">{_esc(what)}: could not be drawn '
                    f"({_esc(type(error).__name__)}: {_esc(error)}).</p>\n")


def _document(title: str, nav: Sequence[tuple[str, str]], body: str) -> str:
    css = resources.files("pipeline").joinpath("data/report/report.css").read_text()
    links = " ".join(f'<a href="#{_esc(anchor)}">{_esc(text)}</a>' for anchor, text in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_esc(title)}</title>\n<style>\n{css}</style>\n</head>\n<body>\n"
        f"<header><h1>{_esc(title)}</h1><nav>{links}</nav></header>\n{body}</body>\n</html>\n"
    )


def _write(path: Path, text: str) -> Path:
    with atomic_write(path) as handle:
        handle.write(text)
    return path


# --------------------------------------------------------------------------- session sections


def _anat_section(page: _Page, anat: Path, session: str) -> str:
    t1w = _first(find_files(anat, "T1w", ".nii.gz", desc="preproc", space=None),
                 find_files(anat, "T1w", ".nii.gz", desc="preproc", space="T1w"))
    out = "<h3>Anatomy</h3>\n"
    if t1w is None:
        out += _na(f"Preprocessed T1w (ses-{session}/anat/*_desc-preproc_T1w.nii.gz)")
    else:
        def build() -> str:
            mask = _first(find_files(anat, "mask", ".nii.gz", desc="brain", space=None),
                          find_files(anat, "mask", ".nii.gz", desc="brain", space="T1w"))
            tissues = {}
            for tissue in ("GM", "WM"):
                tissues[tissue] = _first(
                    find_files(anat, "probseg", ".nii.gz", label=tissue, space=None),
                    find_files(anat, "probseg", ".nii.gz", label=tissue, space="T1w"))
            shown = [p.name for p in (mask, tissues["GM"], tissues["WM"]) if p is not None]
            svg = anat_mosaic_svg(
                nb.load(t1w), mask=nb.load(mask) if mask else None,
                gm=nb.load(tissues["GM"]) if tissues["GM"] else None,
                wm=nb.load(tissues["WM"]) if tissues["WM"] else None)
            caption = (f"{t1w.name}; contours: brain mask (red), GM (green), WM (blue) where "
                       f"available ({', '.join(shown) or 'none found'}).")
            return f'<div class="figures">{page.figure(svg, caption)}</div>\n'
        out += page.guarded("Anatomy", build)
    out += "<h4>T1w to MNI</h4>\n"
    mni = [p for p in find_files(anat, "T1w", ".nii.gz", desc="preproc")
           if parse_entities(p.name)[0].get("space", "T1w") not in ("T1w", "")]
    if not mni:
        # the pipeline keeps the T1w native and brings the atlases in through the inverse
        # of the MNI registration: the atlas on the T1w shows that registration
        atlases = [p for p in find_files(anat, "dseg", ".nii.gz", space="T1w")
                   if parse_entities(p.name)[0].get("atlas")]
        if t1w is None or not atlases:
            out += _na("MNI-space T1w (*_space-MNI*_desc-preproc_T1w.nii.gz) or atlas on the "
                       "T1w (*_atlas-*_space-T1w_dseg.nii.gz); check skipped")
            return out

        def build_atlas() -> str:
            mask = _first(find_files(anat, "mask", ".nii.gz", desc="brain", space=None))
            svg = anat_mosaic_svg(nb.load(t1w), mask=nb.load(mask) if mask else None,
                                  labels=nb.load(atlases[0]))
            atlas = parse_entities(atlases[0].name)[0]["atlas"]
            caption = (f"{atlases[0].name}: atlas {atlas} warped from MNI to the T1w "
                       "(colours) and brain mask (red); parcels should sit in grey matter.")
            return f'<div class="figures">{page.figure(svg, caption)}</div>\n'
        return out + page.guarded("T1w to MNI", build_atlas)

    def build_mni() -> str:
        space = parse_entities(mni[0].name)[0]["space"]
        mask = _first(find_files(anat, "mask", ".nii.gz", desc="brain", space=space))
        svg = anat_mosaic_svg(nb.load(mni[0]), mask=nb.load(mask) if mask else None)
        return (f'<div class="figures">'
                f"{page.figure(svg, f'{mni[0].name} (brain-mask contour in red)')}</div>\n")
    return out + page.guarded("T1w to MNI", build_mni)


def _fd_table(func: Path, atlas: str | None) -> tuple[pd.DataFrame, Path] | None:
    """Per-volume FD with censoring flags: the outliers TSV, else the confounds TSVs."""
    outliers = _first(find_files(func, "outliers", atlas=atlas) if atlas else [],
                      [p for p in find_files(func, "outliers")
                       if parse_entities(p.name)[0].get("desc") != "planted"])
    if outliers is not None:
        return _read_tsv(outliers), outliers
    confounds = find_files(func, "timeseries", desc="confounds")
    if not confounds:
        return None
    tables = []
    for run, path in enumerate(confounds, start=1):
        table = _read_tsv(path)
        table["run"] = run
        flags = [c for c in table.columns if c == "censored" or c.startswith("motion_outlier")]
        if flags and "censored" not in table:
            table["censored"] = (table[flags].fillna(0) != 0).any(axis=1).astype(int)
        tables.append(table)
    return pd.concat(tables, ignore_index=True), confounds[0]


def _fd_threshold(*paths: Path | None) -> float | None:
    for path in paths:
        if path is None:
            continue
        value = _sidecar(path).get("FDThreshold")
        if isinstance(value, int | float):
            return float(value)
    return None


def _bold_section(page: _Page, func: Path, session: str, atlas: str | None,
                  networks: Mapping[str, str] | None) -> str:
    out = "<h3>BOLD QC</h3>\n"
    qc_path = _first(find_files(func, "bold", desc="qc", atlas=atlas) if atlas else [],
                     find_files(func, "bold", desc="qc"))

    def build_fd() -> str:
        found = _fd_table(func, atlas)
        if found is None or "framewise_displacement" not in found[0]:
            return _na(f"Framewise displacement (ses-{session}/func/*_outliers.tsv or "
                       "*_desc-confounds_timeseries.tsv)")
        table, source = found
        threshold = _fd_threshold(qc_path, source)
        run_starts = []
        if "run" in table:
            runs = table["run"].to_numpy()
            run_starts = [int(i) for i in np.flatnonzero(runs[1:] != runs[:-1]) + 1]
        censored = table["censored"].fillna(0).to_numpy() != 0 if "censored" in table else None
        steady = (table["non_steady_state"].fillna(0).to_numpy() != 0
                  if "non_steady_state" in table else None)
        fd = table["framewise_displacement"].to_numpy(dtype=float)
        svg = fd_trace_svg(fd, censored=censored, non_steady=steady, threshold=threshold,
                           run_starts=run_starts)
        n_cens = int(np.sum(censored)) if censored is not None else 0
        caption = (f"{source.name}: {fd.size} volumes, mean FD {np.nanmean(fd):.3f} mm, "
                   f"{n_cens} censored; threshold "
                   + (f"{threshold:g} mm." if threshold is not None else "unknown."))
        return page.figure(svg, caption)

    def build_carpet() -> str:
        ts = _first(find_files(func, "timeseries", stat="mean", atlas=atlas) if atlas else [],
                    find_files(func, "timeseries", stat="mean"))
        if ts is None:
            return _na(f"Carpet plot (ses-{session}/func/*_stat-mean_timeseries.tsv)")
        table = _read_tsv(ts)
        return page.figure(carpet_svg(table, networks),
                           f"{ts.name}: {table.shape[1]} parcels x {table.shape[0]} volumes.")

    out += ('<div class="figures">' + page.guarded("FD trace", build_fd)
            + page.guarded("Carpet plot", build_carpet) + "</div>\n")
    return out


def _connectome_section(page: _Page, ses_dir: Path, session: str, atlases: Sequence[str],
                        networks: Mapping[str, Mapping[str, str] | None]) -> str:
    out = "<h3>Connectomes</h3>\n"
    if not atlases:
        return out + _na("Connectivity matrices (no *_relmat.tsv found)")
    for atlas in atlases:
        figs = []
        for kind, folder, stat, label in (
                ("fc", ses_dir / "func", "pearsoncorrelation", "FC (Pearson r)"),
                ("sc", ses_dir / "dwi", "streamlinecount", "SC (streamline count)")):
            path = _first(find_files(folder, "relmat", atlas=atlas, stat=stat, desc=None),
                          find_files(folder, "relmat", atlas=atlas, stat=stat))
            if path is None:
                figs.append(_na(f"{label}, atlas {atlas} "
                                f"(ses-{session}/{folder.name}/*_stat-{stat}_relmat.tsv)"))
                continue

            def build(path: Path = path, kind: str = kind, label: str = label,
                      atlas: str = atlas) -> str:
                matrix = read_relmat(path)
                svg = matrix_svg(matrix, networks.get(atlas), title=f"{label}, {atlas}",
                                 kind=kind)
                unknown = "" if networks.get(atlas) else " (atlas table not found: unordered)"
                return page.figure(svg, f"{path.name}: {len(matrix)} parcels{unknown}.")
            figs.append(page.guarded(f"{label} {atlas}", build))
        out += f'<div class="figures">{"".join(figs)}</div>\n'
    return out


def _tractography_section(dwi: Path, session: str, atlases: Sequence[str]) -> str:
    out = "<h3>Tractography</h3>\n"
    rows = []
    for atlas in atlases or [None]:
        sc = _first(find_files(dwi, "relmat", atlas=atlas, stat="streamlinecount")
                    if atlas else [])
        if sc is None:
            continue
        meta = _sidecar(sc)
        matrix = read_relmat(sc).to_numpy(dtype=float)
        upper = matrix[np.triu_indices(len(matrix), 1)]
        rows.append({
            "atlas": atlas,
            "streamlines generated": meta.get("n_streamlines", meta.get("NumberOfStreamlines")),
            "fraction assigned (two parcels)": meta.get("fraction_assigned_two_parcels"),
            "streamlines in matrix": float(np.nansum(upper)),
            "connected pairs": int(np.sum(upper > 0)),
            "parcels without streamlines": int(np.sum(np.nansum(matrix, axis=0) == 0)),
            "fibre model": meta.get("FibreModel"),
        })
    qc = find_files(dwi, "dwi", desc="qc") or [p for p in sorted(dwi.glob("*desc-qc*.tsv"))]
    if not rows and not qc:
        return out + _na(f"Tractography summary (ses-{session}/dwi/*_stat-streamlinecount_relmat"
                         ".tsv and DWI QC TSV)")
    if rows:
        out += table_html(pd.DataFrame(rows))
    if qc:
        out += f"<p>{_esc(qc[0].name)}</p>\n" + table_html(_read_tsv(qc[0]))
    return out


def _qc_flags(func: Path, dwi: Path) -> pd.DataFrame:
    """One row per QC table row of the session: modality, atlas, key numbers, verdict."""
    rows = []
    for modality, folder, suffix in (("bold", func, "bold"), ("dwi", dwi, "dwi")):
        paths = find_files(folder, suffix, desc="qc") or sorted(folder.glob("*desc-qc*.tsv"))
        for path in paths:
            table = _read_tsv(path)
            for _, qc in table.iterrows():
                passed = qc.get("qc_pass", qc.get("pass"))
                reason = qc.get("qc_reason", qc.get("flag", qc.get("reason")))
                verdict = "n/a" if pd.isna(passed) else ("pass" if int(passed) else "FLAG")
                rows.append({
                    "modality": modality, "atlas": qc.get("atlas"),
                    "mean FD (mm)": qc.get("mean_fd"), "max FD (mm)": qc.get("max_fd"),
                    "% censored": qc.get("percent_censored"),
                    "minutes left": qc.get("remaining_minutes"),
                    "tSNR": qc.get("tsnr_median"),
                    "dropped parcels": qc.get("n_dropped_parcels"),
                    "verdict": verdict, "reason": reason, "file": path.name,
                })
    return pd.DataFrame(rows)


def _flags_section(func: Path, dwi: Path, session: str) -> str:
    flags = _qc_flags(func, dwi)
    if flags.empty:
        return "<h3>QC flags</h3>\n" + _na(f"QC tables (ses-{session}/*/*_desc-qc_*.tsv)")
    classes = ["flag" if v == "FLAG" else "" for v in flags["verdict"]]
    return "<h3>QC flags</h3>\n" + table_html(flags, row_class=classes)


# --------------------------------------------------------------------------- trajectories


def _metric_labels(table: pd.DataFrame) -> pd.Series:
    """A readable label per row from its identity columns (``metric · network · ...``)."""
    columns = [c for c in _IDENTITY_COLUMNS if c in table]

    def label(row: pd.Series) -> str:
        parts = []
        for c in columns:
            value = row[c]
            if pd.isna(value) or str(value) in ("", "n/a"):
                continue
            if c == "network_b" and str(value) == str(row.get("network_a", "")):
                continue
            parts.append(str(value))
        return " · ".join(dict.fromkeys(parts))
    if not columns:
        return pd.Series(["value"] * len(table), index=table.index)
    return table.apply(label, axis=1)


def _pick(row: Mapping[str, Any], names: Iterable[str]) -> Any:
    for name in names:
        if name in row and not pd.isna(row[name]):
            return row[name]
    return None


def load_trajectories(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Normalise a trajectories TSV (long or wide, see the module docstring).

    Returns
    -------
    points : pandas.DataFrame
        ``label, session, role, order, value, se``, one row per metric and session.
    summary : pandas.DataFrame
        ``label, maintenance_class, class_probability, probabilities, acute_change,
        maintenance_change, group`` and the identity columns of the table (``metric``,
        ``modality``, ``network`` ...), one row per metric, in file order.
    """
    table = _read_tsv(path)
    if "metric" not in table:
        raise ValueError(f"{path}: a trajectories table needs a 'metric' column")
    table = table.assign(label=_metric_labels(table))
    se_col = next((c for c in _SE_COLUMNS if c in table), None)
    if "value" in table:
        ses_col = next((c for c in ("session", "session_id") if c in table), None)
        points = pd.DataFrame({
            "label": table["label"],
            "session": (table[ses_col].astype(str).str.removeprefix("ses-") if ses_col
                        else table.get("role", pd.Series("", index=table.index)).astype(str)),
            "role": table["role"] if "role" in table else None,
            "order": pd.to_numeric(table["order"], errors="coerce") if "order" in table
            else np.nan,
            "value": pd.to_numeric(table["value"], errors="coerce"),
            "se": pd.to_numeric(table[se_col], errors="coerce") if se_col else np.nan,
        })
    else:
        long = []
        for role in ROLES:
            if role not in table:
                continue
            se = next((table[c] for c in (f"{role}_se", f"se_{role}") if c in table), np.nan)
            long.append(pd.DataFrame({
                "label": table["label"], "session": role, "role": role,
                "order": float(_ROLE_RANK[role] + 1),
                "value": pd.to_numeric(table[role], errors="coerce"),
                "se": pd.to_numeric(se, errors="coerce")}))
        if not long:
            raise ValueError(f"{path}: neither a 'value' column nor role columns "
                             f"({', '.join(ROLES)})")
        points = pd.concat(long, ignore_index=True)
    points["rank"] = points["role"].map(_ROLE_RANK)
    points = points.sort_values(["label", "order", "rank", "session"], kind="stable")
    points = points.drop(columns="rank").reset_index(drop=True)
    prob_cols = [c for c in table.columns
                 if re.match(r"^(p|prob|probability)_(?!value$|fdr$)", c)]
    summary = []
    for label, rows in table.groupby("label", sort=False):
        row = rows.iloc[0].to_dict()
        probabilities = {re.sub(r"^(p|prob|probability)_", "", c): rows[c].dropna().iloc[0]
                         for c in prob_cols if rows[c].notna().any()}
        klass = _pick(row, ("maintenance_class", "class", "trajectory_class"))
        prob = _pick(row, ("class_probability", "maintenance_class_probability", "probability"))
        if prob is None and probabilities and (klass is None or str(klass) in probabilities):
            # only the called class's own probability; a class outside the probability
            # columns (no_acute_change) has none
            key = str(klass) if klass is not None else max(
                probabilities, key=lambda k: probabilities[k])
            prob = probabilities[key]
            klass = klass if klass is not None else key
        summary.append({
            **{c: row[c] for c in _IDENTITY_COLUMNS if c in row},
            "label": label, "maintenance_class": klass,
            "class_probability": prob, "probabilities": probabilities,
            "acute_change": _pick(row, ("acute_change", "change_acute", "delta_acute")),
            "maintenance_change": _pick(row, ("maintenance_change", "change_maintenance",
                                              "delta_maintenance")),
            "group": _pick(row, ("group",)),
        })
    identity = [c for c in _IDENTITY_COLUMNS if c in table]
    return points, pd.DataFrame(summary, columns=[
        "label", "maintenance_class", "class_probability", "probabilities", "acute_change",
        "maintenance_change", "group", *identity])


def _trajectory_files(output_dir: Path, subject: str) -> list[Path]:
    return sorted((output_dir / f"sub-{subject}").glob(f"sub-{subject}_*desc-trajectories*.tsv"))


def _subject_groups(output_dir: Path) -> dict[str, str]:
    """``{subject label: group}`` from the group tables or a participants.tsv in the output."""
    groups: dict[str, str] = {}
    for path in (output_dir / "participants.tsv", output_dir / "group" / "cohort_sessions.tsv"):
        if not path.exists():
            continue
        try:
            table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        except (OSError, ValueError):
            continue
        if {"participant_id", "group"} <= set(table.columns):
            for pid, group in zip(table["participant_id"], table["group"], strict=True):
                if group:
                    groups[pid.removeprefix("sub-")] = group
    return groups


def _is_control(group: object) -> bool:
    return isinstance(group, str) and group.strip().lower() in _CONTROL_NAMES


def _cohort_trajectories(output_dir: Path) -> pd.DataFrame:
    """Every subject's trajectory points with ``subject``, ``group`` and the identity columns
    of the metric (unreadable tables skipped)."""
    groups = _subject_groups(output_dir)
    frames = []
    for sub_dir in sorted(output_dir.glob("sub-*")):
        subject = sub_dir.name.removeprefix("sub-")
        for path in _trajectory_files(output_dir, subject):
            try:
                points, summary = load_trajectories(path)
            except (OSError, ValueError, KeyError):
                continue
            group = groups.get(subject) or next(
                (g for g in summary["group"] if isinstance(g, str) and g), None)
            # identity columns too: they choose the key metrics (_metric_rank)
            identity = summary[["label", *(c for c in _IDENTITY_COLUMNS if c in summary)]]
            frames.append(points.merge(identity, on="label", how="left").assign(
                subject=subject, group=group))
    if not frames:
        return pd.DataFrame(columns=["label", "session", "role", "order", "value", "se",
                                     "subject", "group"])
    return pd.concat(frames, ignore_index=True)


def control_ranges(cohort: pd.DataFrame) -> pd.DataFrame:
    """Control mean and SD (ddof=1) per metric label and role; needs two controls or more.

    A control's sessions of the same role are averaged first.
    """
    controls = cohort[cohort["group"].map(_is_control)]
    per_subject = controls.groupby(["label", "role", "subject"], as_index=False)["value"].mean()
    stats = per_subject.groupby(["label", "role"])["value"].agg(["mean", "std", "count"])
    stats = stats[stats["count"] >= 2].reset_index().rename(columns={"std": "sd"})
    return stats[["label", "role", "mean", "sd", "count"]]


def _text(value: object) -> str:
    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def _metric_rank(identity: Mapping[str, Any]) -> int | None:
    """Place of a metric on the trajectory page, ``None`` for metrics not shown.

    In order: FC between/within the DMN, salience and frontoparietal networks; global
    coupling; hippocampal volume; SC between those networks; coupling in them; other FC
    measures of them; other hippocampal measures (anchored connectivity); other measures of
    those networks.  With only a label (no identity columns), :data:`KEY_METRIC_PATTERN`.
    """
    get = {k: _text(identity.get(k)) for k in (*_IDENTITY_COLUMNS, "label")}
    metric, modality = get["metric"].lower(), get["modality"].lower()
    networks = [get[k] for k in ("network", "network_a", "network_b") if get[k]]
    if not metric:
        return 8 if KEY_METRIC_PATTERN.search(get["label"]) else None
    all_key = bool(networks) and all(_KEY_NETWORK.search(n) for n in networks)
    any_key = any(_KEY_NETWORK.search(n) for n in networks)
    coupling = modality == "coupling" or bool(re.search(r"coupling|sc_fc", metric))
    hippocampus = "hippocamp" in f"{metric} {get['node']} {' '.join(networks)}".lower()
    structural = modality == "sc"
    if metric == "connectivity" and all_key:
        return 3 if structural else 0
    if coupling and not networks and not get["node"]:
        return 1
    if hippocampus and (modality == "anat" or "volume" in metric):
        return 2
    if coupling and any_key:
        return 4
    if any_key and not structural:
        return 5
    if hippocampus:
        return 6
    if any_key:
        return 7
    return None


def _choose_metrics(table: pd.DataFrame) -> list[str]:
    """Labels of at most :data:`_MAX_TRAJECTORIES` key metrics (:func:`_metric_rank` order;
    the first ones in file order when none is a key metric)."""
    rows = table.to_dict("records")
    ranked = sorted(((rank, i, row["label"]) for i, row in enumerate(rows)
                     if (rank := _metric_rank(row)) is not None), key=lambda r: r[:2])
    labels = [label for _, _, label in ranked] or [row["label"] for row in rows]
    return list(dict.fromkeys(labels))[:_MAX_TRAJECTORIES]


def _class_text(info: Mapping[str, Any]) -> str:
    parts = []
    klass = info.get("maintenance_class")
    if klass == NO_ACUTE_CHANGE:
        # the acute change is within noise, so "toward pre-ECT" has no direction: the
        # class probabilities (still in the table) mean nothing and are not shown
        parts.append(f'Maintenance class: <span class="class">{_esc(klass)}</span> '
                     "(acute change within noise: no class probability)")
    elif klass is not None:
        prob = info.get("class_probability")
        if prob is not None and not pd.isna(prob):
            prob_text = f" (p = {_fmt(prob)})"
        elif info.get("no_se"):
            prob_text = " (no standard error: a point classification, no probability)"
        else:
            prob_text = " (no class probability)"
        parts.append(f'Maintenance class: <span class="class">{_esc(klass)}</span>'
                     f"{_esc(prob_text)}")
    else:
        parts.append("Maintenance class: not available")
    probabilities = info.get("probabilities") or {}
    if probabilities and klass != NO_ACUTE_CHANGE:
        parts.append("Class probabilities: " + ", ".join(
            f"{_esc(k)} {_esc(_fmt(v))}" for k, v in probabilities.items()))
    for key, text in (("acute_change", "Acute change (post - pre)"),
                      ("maintenance_change", "Maintenance change (maintenance - post)")):
        if info.get(key) is not None:
            parts.append(f"{text}: {_esc(_fmt(info[key]))}")
    return "<br>".join(parts)


def _trajectory_page(page: _Page, output_dir: Path, subject: str) -> str:
    out = '<section class="page" id="trajectories"><h2>Trajectories</h2>\n'
    files = _trajectory_files(output_dir, subject)
    if not files:
        return out + _na(f"Trajectories (sub-{subject}/sub-{subject}_desc-trajectories*.tsv)") \
            + "</section>\n"
    try:
        cohort = _cohort_trajectories(output_dir)
        ranges = control_ranges(cohort)
    except Exception:  # the control band is optional
        ranges = pd.DataFrame(columns=["label", "role", "mean", "sd", "count"])
    if ranges.empty:
        out += ('<p class="na">Control range: not available (needs trajectories of at least '
                "two controls).</p>\n")
    for path in files:
        def build(path: Path = path) -> str:
            points, summary = load_trajectories(path)
            chosen = _choose_metrics(summary)
            text = (f"<h3>{_esc(path.name)}</h3>\n<p>{len(chosen)} of {len(summary)} metrics: "
                    "FC of the default-mode, salience and frontoparietal networks, "
                    "structure-function coupling and hippocampal volume first; every metric "
                    f'is in the table.</p>\n<div class="trajectories">\n')
            for label in chosen:
                pts = points[points["label"] == label].copy()
                pts["tick"] = [f"{s}\n({r})" if isinstance(r, str) and r and r != s else str(s)
                               for s, r in zip(pts["session"], pts["role"], strict=True)]
                band = ranges[ranges["label"] == label][["role", "mean", "sd"]]
                svg = trajectory_svg(pts, control=band if len(band) else None, title=label)
                info = summary[summary["label"] == label].iloc[0].to_dict()
                info["no_se"] = bool(pts["se"].isna().all())
                values = ", ".join(f"{s}: {v}" for s, v in zip(
                    pts["session"], _fmt_distinct(pts["value"].to_numpy(float)), strict=True))
                text += (f'<div class="trajectory">{page.figure(svg)}<div class="info">'
                         f"<b>{_esc(label)}</b><br>{_class_text(info)}<br>"
                         f"Values: {_esc(values)}</div></div>\n")
            return text + "</div>\n"
        out += page.guarded(path.name, build)
    return out + "</section>\n"


# --------------------------------------------------------------------------- logs


def _methods_section(output_dir: Path) -> str:
    path = output_dir / "logs" / "CITATION.md"
    out = '<section class="page" id="methods"><h2>Methods</h2>\n'
    if not path.exists():
        return out + _na("Methods text (logs/CITATION.md)") + "</section>\n"
    text = path.read_text(errors="replace")
    return out + f'<pre class="methods">{_esc(text)}</pre>\n</section>\n'


def crash_summaries(output_dir: Path, subject: str | None = None) -> pd.DataFrame:
    """Node and last error line of every Nipype crash file under ``logs/`` (optionally one
    subject's, recognised by ``sub_<label>_wf`` or ``sub-<label>`` in the node name)."""
    rows = []
    for crash in sorted((output_dir / "logs").glob("**/crash-*.txt")):
        text = crash.read_text(errors="replace")
        node = re.search(r"^Node: (.+)$", text, flags=re.MULTILINE)
        name = node.group(1).strip() if node else crash.name
        if subject is not None and not re.search(
                rf"sub[_-]{re.escape(subject)}(?![0-9A-Za-z])", name):
            continue
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        message = next((line for line in reversed(lines)
                        if re.match(r"^[A-Za-z_.]+(Error|Exception)\b", line)),
                       lines[-1] if lines else "unknown error")
        session = re.search(r"[._]ses_([0-9A-Za-z]+)(?=$|[._])", name)
        rows.append({"file": str(crash.relative_to(output_dir)),
                     "session": session.group(1) if session else None,
                     "node": name.split("_wf.")[-1], "error": message})
    return pd.DataFrame(rows, columns=["file", "session", "node", "error"])


def _errors_section(output_dir: Path, subject: str | None) -> str:
    out = '<section class="page" id="errors"><h2>Errors</h2>\n'
    crashes = crash_summaries(output_dir, subject)
    if crashes.empty:
        return out + "<p>No crash reports found under logs/.</p>\n</section>\n"
    crashes = crashes[["session", "node", "error", "file"]]  # the long path last
    return out + table_html(crashes, row_class=["flag"] * len(crashes)) + "</section>\n"


# --------------------------------------------------------------------------- reports


def _atlases(output_dir: Path, subject: str,
             atlas_tables: Mapping[str, pd.DataFrame] | None) -> list[str]:
    if atlas_tables:
        return sorted(atlas_tables)
    found = {parse_entities(p.name)[0].get("atlas")
             for p in (output_dir / f"sub-{subject}").glob("ses-*/*/*_relmat.tsv")}
    return sorted(a for a in found if a)


def write_subject_report(
    output_dir: Path,
    subject: str,
    *,
    atlas_tables: dict[str, pd.DataFrame] | None = None,
) -> Path:
    """Write ``OUTPUT/sub-<subject>.html``: per-session QC and connectomes, trajectories,
    methods and errors, as one self-contained file.

    Parameters
    ----------
    output_dir : Path
        Trajectome derivatives folder.
    subject : str
        Subject label, with or without ``sub-``.
    atlas_tables : dict, optional
        Atlas tables (``index, name, network``) by atlas name, to order matrices by network;
        by default read from ``OUTPUT/atlases/atlas-<name>/atlas-<name>_dseg.tsv``.

    Returns
    -------
    Path
        The report.
    """
    output_dir = Path(output_dir)
    subject = _label(subject)
    page = _Page()
    sessions = _session_table(output_dir, subject)
    atlases = _atlases(output_dir, subject, atlas_tables)
    networks = {a: _atlas_networks(output_dir, a, atlas_tables) for a in atlases}
    primary = atlases[0] if atlases else None
    body, nav = [], []
    if sessions.empty:
        body.append(_na(f"Sessions (no sub-{subject}/ses-* folder or sessions.tsv)"))
    for session, role in zip(sessions["session"], sessions["role"], strict=True):
        ses_dir = output_dir / f"sub-{subject}" / f"ses-{session}"
        role_text = f" ({role})" if isinstance(role, str) and role else ""
        nav.append((f"ses-{session}", f"ses-{session}"))
        parts = [f'<section class="session" id="ses-{_esc(session)}">'
                 f"<h2>Session {_esc(session)}{_esc(role_text)}</h2>\n"]
        parts.append(page.guarded("Anatomy", lambda d=ses_dir, s=session:
                                  _anat_section(page, d / "anat", s)))
        parts.append(page.guarded("BOLD QC", lambda d=ses_dir, s=session: _bold_section(
            page, d / "func", s, primary, networks.get(primary) if primary else None)))
        parts.append(page.guarded("Connectomes", lambda d=ses_dir, s=session:
                                  _connectome_section(page, d, s, atlases, networks)))
        parts.append(page.guarded("Tractography", lambda d=ses_dir, s=session:
                                  _tractography_section(d / "dwi", s, atlases)))
        parts.append(page.guarded("QC flags", lambda d=ses_dir, s=session:
                                  _flags_section(d / "func", d / "dwi", s)))
        body.append("".join(parts) + "</section>\n")
    body.append(page.guarded("Trajectories",
                             lambda: _trajectory_page(page, output_dir, subject)))
    body.append(page.guarded("Methods", lambda: _methods_section(output_dir)))
    body.append(page.guarded("Errors", lambda: _errors_section(output_dir, subject)))
    nav += [("trajectories", "Trajectories"), ("methods", "Methods"), ("errors", "Errors")]
    text = _document(f"Trajectome report: sub-{subject}", nav, "".join(body))
    return _write(output_dir / f"sub-{subject}.html", text)


def _cohort_sessions(output_dir: Path) -> pd.DataFrame:
    path = output_dir / "group" / "cohort_sessions.tsv"
    if path.exists():
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    frames = []
    for table_path in sorted(output_dir.glob("sub-*/sub-*_sessions.tsv")):
        table = pd.read_csv(table_path, sep="\t", dtype=str, keep_default_na=False)
        table.insert(0, "participant_id", table_path.parent.name)
        frames.append(table)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _cohort_qc(output_dir: Path) -> pd.DataFrame:
    rows = []
    for ses_dir in sorted(output_dir.glob("sub-*/ses-*")):
        if not ses_dir.is_dir():
            continue
        flags = _qc_flags(ses_dir / "func", ses_dir / "dwi")
        if flags.empty:
            continue
        flags.insert(0, "session", ses_dir.name)
        flags.insert(0, "participant_id", ses_dir.parent.name)
        rows.append(flags.drop(columns="file"))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def _cohort_section(output_dir: Path) -> str:
    out = '<section class="page" id="cohort"><h2>Cohort and QC</h2>\n'
    sessions = _cohort_sessions(output_dir)
    if sessions.empty:
        out += _na("Cohort sessions (group/cohort_sessions.tsv or sub-*/sub-*_sessions.tsv)")
    else:
        n_sub = sessions["participant_id"].nunique() if "participant_id" in sessions else "n/a"
        out += f"<p>{_esc(n_sub)} subjects, {len(sessions)} sessions.</p>\n"
        if "group" in sessions:
            counts = sessions.groupby("group")["participant_id"].nunique().reset_index()
            out += table_html(counts.rename(columns={"participant_id": "subjects"}))
        out += table_html(sessions)
    qc = _cohort_qc(output_dir)
    if qc.empty:
        return out + _na("Session QC tables (sub-*/ses-*/*/*_desc-qc_*.tsv)") + "</section>\n"
    n_flag = int((qc["verdict"] == "FLAG").sum())
    out += f"<h3>Session QC</h3>\n<p>{n_flag} of {len(qc)} QC rows flagged.</p>\n"
    return out + table_html(qc, row_class=["flag" if v == "FLAG" else ""
                                           for v in qc["verdict"]]) + "</section>\n"


def _stats_table(output_dir: Path) -> tuple[pd.DataFrame, Path] | None:
    # not any *_stats.tsv: the maintenance-class counts are stats too, but no model
    default = output_dir / GROUP_OUTPUTS["lme"]
    paths = [default] if default.exists() else sorted(
        (output_dir / "group").glob("*lme*stats*.tsv"))
    if not paths:
        return None
    return _read_tsv(paths[0]), paths[0]


def _compact_stats(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One ``metric`` label column instead of the identity columns, without the columns
    that say nothing (empty everywhere, or a fit flag at its normal value everywhere)."""
    identity = [c for c in _IDENTITY_COLUMNS if c in table]
    shown = table.drop(columns=[*identity, "skipped"], errors="ignore")
    if identity:
        shown.insert(0, "metric", _metric_labels(table).to_numpy())
    notes = []
    for column, normal, text in (("converged", True, "every fit converged"),
                                 ("singular", False, "no fit was singular")):
        if column in shown and shown[column].astype(str).str.lower().eq(str(normal).lower()
                                                                        ).all():
            shown = shown.drop(columns=column)
            notes.append(text)
    empty = [c for c in shown.columns
             if shown[c].isna().all() or shown[c].astype(str).str.strip().eq("").all()]
    return shown.drop(columns=empty), notes


def _stats_section(output_dir: Path) -> tuple[str, list[str]]:
    out = '<section class="page" id="models"><h2>Mixed models</h2>\n'
    found = _stats_table(output_dir)
    if found is None:
        return out + _na(f"Mixed-model statistics ({GROUP_OUTPUTS['lme']})") + "</section>\n", []
    table, path = found
    reason = (table["skipped"].fillna("").astype(str).str.strip() if "skipped" in table
              else pd.Series("", index=table.index))
    skipped, table = table[reason != ""], table[reason == ""]
    q_col = next((c for c in _Q_COLUMNS if c in table), None)
    p_col = next((c for c in _P_COLUMNS if c in table), None)
    sort_col = q_col or p_col
    if sort_col:
        table = table.assign(**{sort_col: pd.to_numeric(table[sort_col], errors="coerce")})
        table = table.sort_values(sort_col, kind="stable", na_position="last")
    table = table.reset_index(drop=True)
    significant = (table[q_col] < 0.05).to_numpy() if q_col else np.zeros(len(table), bool)
    if table.empty:
        out += (f"<p>{_esc(path.name)}: no contrast could be estimated (reasons below).</p>\n")
    else:
        shown, notes = _compact_stats(table)
        out += (f"<p>{_esc(path.name)}: {len(table)} fitted contrasts, "
                f"{int(significant.sum())} with q &lt; 0.05 (highlighted), sorted by "
                f"{_esc(sort_col or 'file order')}" + "".join(f"; {_esc(n)}" for n in notes)
                + ".</p>\n")
        if q_col is None:
            out += '<p class="na">q-values: not available (no q column).</p>\n'
        classes = ["highlight" if s else "" for s in significant]
        n_top = max(_MAX_TABLE_ROWS, int(significant.sum()))
        out += table_html(shown.iloc[:n_top], row_class=classes[:n_top])
        if len(shown) > n_top:
            out += _folded(f"The other {len(shown) - n_top} contrasts",
                           table_html(shown.iloc[n_top:], row_class=classes[n_top:]))
    if len(skipped):
        # one line per reason: tens of identical "not fitted" rows would bury the results
        why = skipped.assign(reason=reason[reason != ""])
        keys = [c for c in ("model", "reason") if c in why]
        counts = why.groupby(keys, sort=True).size().reset_index(name="contrasts")
        out += (f"<h3>Not fitted</h3>\n<p>{len(skipped)} contrasts of {_esc(path.name)} "
                "were not estimated:</p>\n" + table_html(counts))
    top = list(dict.fromkeys(_metric_labels(table))) if "metric" in table else []
    return out + "</section>\n", top


def _effects_section(page: _Page, cohort: pd.DataFrame, top: Sequence[str]) -> str:
    out = '<section class="page" id="effects"><h2>Effects by role</h2>\n'
    if cohort.empty:
        return out + _na("Trajectories of the cohort (sub-*/sub-*_desc-trajectories*.tsv)") \
            + "</section>\n"
    labels = set(cohort["label"])
    chosen = [lab for lab in top if lab in labels] or _choose_metrics(
        cohort.drop_duplicates("label"))
    figs = []
    for label in chosen[:_MAX_EFFECT_PLOTS]:
        part = cohort[cohort["label"] == label]
        figs.append(page.guarded(label, lambda p=part, lab=label: page.figure(
            effects_by_role_svg(p, title=lab), f"{lab}: {p['subject'].nunique()} subjects.")))
    return out + f'<div class="figures">{"".join(figs)}</div>\n</section>\n'


def _classes_section(output_dir: Path) -> str:
    """Maintenance-class counts over patients, as the group level computed them (controls and
    QC-flagged sessions are left out there; recounting the trajectory tables would not)."""
    relative = GROUP_OUTPUTS["class_counts"]
    out = '<section class="page" id="classes"><h2>Maintenance classes</h2>\n'
    path = output_dir / relative
    if not path.exists():
        return out + _na(f"Maintenance classes ({relative}; run the group level)") \
            + "</section>\n"
    table = _read_tsv(path)
    if table.empty:
        return out + f"<p>{_esc(relative)}: no patient with a maintenance session.</p>\n" \
            + "</section>\n"
    counts = [c for c in table.columns if c.startswith("n_") and c != "n_subjects"]
    shown = pd.DataFrame({"metric": _metric_labels(table)})
    for column in ("n_subjects", *counts, "median_retention",
                   *(c for c in table.columns if c.startswith("mean_p_"))):
        if column in table:
            name = "patients" if column == "n_subjects" else column
            shown[name.removeprefix("n_") if column in counts else name] = table[column]
    meta = _sidecar(path)
    flagged = ("included" if meta.get("IncludeFlagged") else "left out"
               ) if "IncludeFlagged" in meta else "as configured at the group level"
    out += (f"<p>{_esc(relative)}: patients only, each at their last maintenance session; "
            f"QC-flagged sessions {_esc(flagged)}. Columns regression … no_acute_change count "
            "patients; mean_p_* average the class probabilities of every patient counted, "
            "no_acute_change ones included.</p>\n")
    if len(shown) <= _MAX_TABLE_ROWS:
        return out + table_html(shown) + "</section>\n"
    # hundreds of metrics: totals, then the key metrics, then everything folded
    totals = pd.DataFrame([{"metrics": len(shown),
                            **{c.removeprefix("n_"): int(table[c].sum()) for c in counts}}])
    ranks = [_metric_rank(row) for row in table.to_dict("records")]
    key = sorted((r, i) for i, r in enumerate(ranks) if r is not None)
    out += "<p>Patient x metric counts over all metrics:</p>\n" + table_html(totals)
    if key:
        rows = [i for _, i in key[:_MAX_TRAJECTORIES]]
        out += "<h3>Key metrics</h3>\n" + table_html(shown.iloc[rows])
    return out + _folded(f"All {len(shown)} metrics", table_html(shown)) + "</section>\n"


def write_group_report(output_dir: Path) -> Path:
    """Write ``OUTPUT/group.html``: cohort QC, mixed-model table (q < 0.05 highlighted),
    effects by role for the top metrics and maintenance-class counts per metric.

    Parameters
    ----------
    output_dir : Path
        Trajectome derivatives folder.

    Returns
    -------
    Path
        The report.
    """
    output_dir = Path(output_dir)
    page = _Page()
    body = [page.guarded("Cohort", lambda: _cohort_section(output_dir))]
    try:
        stats, top = _stats_section(output_dir)
    except Exception as error:  # one bad table must not sink the report
        stats, top = (f'<p class="error">Mixed models: could not be read ({_esc(error)}).</p>\n',
                      [])
    body.append(stats)
    body.append(page.guarded("Effects", lambda: _effects_section(
        page, _cohort_trajectories(output_dir), top)))
    body.append(page.guarded("Classes", lambda: _classes_section(output_dir)))
    body.append(page.guarded("Methods", lambda: _methods_section(output_dir)))
    body.append(page.guarded("Errors", lambda: _errors_section(output_dir, None)))
    nav = [("cohort", "Cohort"), ("models", "Mixed models"), ("effects", "Effects"),
           ("classes", "Classes"), ("methods", "Methods"), ("errors", "Errors")]
    text = _document("Trajectome group report", nav, "".join(body))
    return _write(output_dir / "group.html", text)
