"""Parcellations: the bundled default atlas, user atlases in BIDS-Atlas layout, and writing them.

An atlas is a label image (``dseg``) plus a table with one row per label:
``index, name, network, hemisphere`` (and optionally ``x, y, z``).  The default
atlas, ``Seitzman300``, turns the 300 ROI coordinates of Seitzman et al. (2018)
that nilearn ships (with network and anatomical labels, including hippocampus
and amygdala) into a volumetric parcellation, so every install has it offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from pipeline.templates import load_template

DEFAULT_ATLAS = "Seitzman300"

#: Seitzman anatomical codes (``seitzman_2018_ROIs_anatomicalLabels.txt``).
SEITZMAN_ANATOMY = {
    0: "cortexMid",
    1: "cortexL",
    2: "cortexR",
    3: "hippocampus",
    4: "amygdala",
    5: "basalGanglia",
    6: "thalamus",
    7: "cerebellum",
}
_DEEP_GREY = {"hippocampus", "amygdala", "basalGanglia", "thalamus"}

#: Canonical network keys the reports and trajectories highlight, by atlas naming scheme.
CANONICAL_NETWORKS = {
    "DefaultMode": "default_mode",
    "Default": "default_mode",
    "Salience": "salience",
    "SalVentAttn": "salience",
    "FrontoParietal": "executive_control",
    "Cont": "executive_control",
}

REQUIRED_COLUMNS = ("index", "name", "network")


class AtlasError(ValueError):
    """An atlas image and its table do not describe the same parcels."""


@dataclass(frozen=True)
class Atlas:
    """A label image with its parcel table.

    Attributes
    ----------
    name : str
        BIDS ``atlas-`` label (alphanumeric).
    image : nibabel.Nifti1Image
        Integer labels, 0 is background.
    table : pandas.DataFrame
        One row per label, ``index`` ascending; at least ``index, name, network``.
    space : str
        Template the image is in.
    """

    name: str
    image: nb.Nifti1Image
    table: pd.DataFrame
    space: str

    @property
    def labels(self) -> np.ndarray:
        """Parcel indices in table order."""
        return self.table["index"].to_numpy()


def _seitzman_tables() -> pd.DataFrame:
    data = resources.files("nilearn.datasets") / "data"
    coords = pd.read_csv(data / "seitzman_2018_ROIs_300inVol_MNI_allInfo.txt", sep=" ")
    anatomy = pd.read_csv(data / "seitzman_2018_ROIs_anatomicalLabels.txt", skiprows=1, header=None)
    table = pd.DataFrame(
        {
            "index": np.arange(1, len(coords) + 1),
            "x": coords["x"].to_numpy(float),
            "y": coords["y"].to_numpy(float),
            "z": coords["z"].to_numpy(float),
            "network": coords["netName"].astype(str).to_numpy(),
            "anatomy": [SEITZMAN_ANATOMY[int(code)] for code in anatomy[0]],
        }
    )
    hemi = np.where(table["x"] < -2, "L", np.where(table["x"] > 2, "R", "M"))
    table["hemisphere"] = hemi
    table["name"] = [
        f"{h}_{a}_{n}_{i:03d}"
        for h, a, n, i in zip(hemi, table["anatomy"], table["network"], table["index"], strict=True)
    ]
    return table[["index", "name", "network", "hemisphere", "anatomy", "x", "y", "z"]]


def build_default_atlas(
    resolution: int = 2, *, radius_mm: float = 8.0, gm_threshold: float = 0.3
) -> Atlas:
    """Build the ``Seitzman300`` volumetric parcellation in the bundled MNI template.

    Each grey-matter voxel is given to its nearest ROI centre when that centre lies
    within ``radius_mm``.  Deep grey ROIs (hippocampus, amygdala, basal ganglia,
    thalamus) take any brain voxel outside CSF, because the template's GM map
    under-represents deep grey matter.

    Parameters
    ----------
    resolution : int, default=2
        Voxel size in mm of the template grid.
    radius_mm : float, default=8.0
        Largest distance from an ROI centre to a voxel it receives.
    gm_threshold : float, default=0.3
        Grey-matter probability above which a cortical/cerebellar voxel counts.

    Returns
    -------
    Atlas
    """
    template = load_template(resolution)
    table = _seitzman_tables()
    affine = template.gm.affine
    gm = np.asarray(template.gm.dataobj)
    csf = np.asarray(template.csf.dataobj)
    brain = np.asarray(template.brain_mask.dataobj) > 0

    ijk = np.argwhere(brain)
    xyz = nb.affines.apply_affine(affine, ijk)
    centres = table[["x", "y", "z"]].to_numpy()
    distance, nearest = cKDTree(centres).query(xyz, distance_upper_bound=radius_mm)
    reached = np.isfinite(distance)
    nearest = np.where(reached, nearest, 0)
    deep = table["anatomy"].isin(_DEEP_GREY).to_numpy()[nearest]
    i, j, k = ijk.T
    tissue_ok = np.where(deep, csf[i, j, k] < 0.5, gm[i, j, k] >= gm_threshold)
    keep = reached & tissue_ok

    labels = np.zeros(gm.shape, dtype=np.int16)
    labels[i[keep], j[keep], k[keep]] = table["index"].to_numpy()[nearest[keep]]
    image = nb.Nifti1Image(labels, affine)
    image.header.set_xyzt_units("mm")
    return Atlas(name=DEFAULT_ATLAS, image=image, table=table, space=template.name)


def check_atlas(image: nb.Nifti1Image, table: pd.DataFrame, *, source: str) -> None:
    """Raise :class:`AtlasError` unless the table and the image hold the same labels.

    ``source`` names the files in the message so the user knows what to fix.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise AtlasError(
            f"{source}: the atlas table lacks column(s) {missing}; it needs "
            f"{list(REQUIRED_COLUMNS)} (tab-separated, one row per label)."
        )
    if table["index"].duplicated().any():
        dup = sorted(table.loc[table["index"].duplicated(), "index"].tolist())
        raise AtlasError(f"{source}: label index repeated in the table: {dup}.")
    in_image = set(np.unique(np.asarray(image.dataobj)).astype(int).tolist()) - {0}
    in_table = set(table["index"].astype(int).tolist())
    if in_image != in_table:
        only_image = sorted(in_image - in_table)[:10]
        only_table = sorted(in_table - in_image)[:10]
        raise AtlasError(
            f"{source}: the table and the image disagree on labels "
            f"(in image only: {only_image}; in table only: {only_table}). "
            "Give one table row per non-zero label of the image."
        )


def load_atlas(path: str | Path, *, name: str | None = None) -> Atlas:
    """Load a BIDS-Atlas folder (``atlas-<name>/``) or a ``*_dseg.nii[.gz]`` with its ``.tsv``.

    Parameters
    ----------
    path : str or Path
        Folder in BIDS-Atlas layout, or the dseg image (the table is the file with
        the same stem and ``.tsv``).
    name : str, optional
        Atlas label; taken from the ``atlas-`` entity or folder name when omitted.

    Raises
    ------
    AtlasError
        When files are missing, or the table does not match the image labels.
    """
    path = Path(path)
    if path.is_dir():
        images = sorted(path.glob("*_dseg.nii.gz")) + sorted(path.glob("*_dseg.nii"))
        if len(images) != 1:
            raise AtlasError(
                f"{path}: expected exactly one *_dseg.nii[.gz] in the atlas folder, "
                f"found {len(images)}; pass the image path to choose one."
            )
        image_path = images[0]
        tables = sorted(path.glob("*_dseg.tsv"))
    else:
        image_path = path
        stem = path.name.removesuffix(".gz").removesuffix(".nii")
        tables = [path.with_name(stem + ".tsv")]
    if not image_path.exists():
        raise AtlasError(f"{image_path}: atlas image not found.")
    if not tables or not tables[0].exists():
        raise AtlasError(
            f"{image_path}: no label table found; write a tab-separated "
            f"'{image_path.name.split('_space-')[0].removesuffix('.nii.gz')}_dseg.tsv' "
            "with columns index, name, network."
        )
    entities = dict(part.split("-", 1) for part in image_path.name.split("_") if "-" in part)
    table = pd.read_csv(tables[0], sep="\t")
    image = nb.load(image_path)
    check_atlas(image, table, source=f"{image_path} / {tables[0].name}")
    if "hemisphere" not in table.columns:
        table["hemisphere"] = "n/a"
    table = table.sort_values("index").reset_index(drop=True)
    return Atlas(
        name=name or entities.get("atlas", path.name.removeprefix("atlas-")),
        image=image,
        table=table,
        space=entities.get("space", "unknown"),
    )


def canonical_network(network: str) -> str | None:
    """Map an atlas network label to ``default_mode``, ``salience`` or ``executive_control``."""
    return CANONICAL_NETWORKS.get(network)


def write_atlas(atlas: Atlas, root: str | Path) -> Path:
    """Write ``atlas`` in BIDS-Atlas layout under ``root/atlases/atlas-<name>/``.

    The file name carries the template space and the voxel size
    (``atlas-<name>_space-<tpl>_res-<r>_dseg.nii.gz``) with the table beside it.
    """
    from pipeline.derivatives import write_tsv, write_with

    folder = Path(root) / "atlases" / f"atlas-{atlas.name}"
    resolution = round(float(atlas.image.header.get_zooms()[0]))
    image_path = folder / f"atlas-{atlas.name}_space-{atlas.space}_res-{resolution}_dseg.nii.gz"
    write_with(image_path, lambda tmp: nb.save(atlas.image, tmp))
    write_tsv(folder / f"atlas-{atlas.name}_dseg.tsv", atlas.table)
    return image_path


def resolve_atlas(spec: str) -> Atlas:
    """An atlas from a command-line value: the bundled name, a BIDS-Atlas folder or a dseg image.

    Raises
    ------
    AtlasError
        When ``spec`` is neither the bundled atlas nor an existing path.
    """
    if spec == DEFAULT_ATLAS:
        return build_default_atlas()
    path = Path(spec)
    if path.exists():
        return load_atlas(path)
    raise AtlasError(
        f"--atlas {spec!r}: not the bundled atlas ({DEFAULT_ATLAS}) and no such file or folder; "
        "give a BIDS-Atlas folder (atlas-<name>/ with *_dseg.nii.gz and *_dseg.tsv) "
        "or a dseg image."
    )
