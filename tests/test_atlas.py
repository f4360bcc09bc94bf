"""The bundled Seitzman300 atlas and user atlases in BIDS-Atlas layout."""

from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from pipeline import atlas as atlas_mod

SHARED_ATLASES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "atlases"


@pytest.fixture(scope="module")
def default_atlas():
    return atlas_mod.build_default_atlas(resolution=2)


def test_default_atlas_has_every_parcel_near_its_coordinate(default_atlas):
    labels = np.asarray(default_atlas.image.dataobj)
    table = default_atlas.table
    assert len(table) == 300
    assert set(np.unique(labels)) - {0} == set(table["index"])
    ijk = np.argwhere(labels > 0)
    xyz = nb.affines.apply_affine(default_atlas.image.affine, ijk)
    owner = labels[tuple(ijk.T)]
    centres = table.set_index("index")[["x", "y", "z"]].loc[owner].to_numpy()
    # every voxel lies within the 8 mm radius (plus half a voxel diagonal) of its ROI centre
    assert np.linalg.norm(xyz - centres, axis=1).max() <= 8.0 + np.sqrt(3)


def test_default_atlas_has_key_networks_and_hippocampus(default_atlas):
    table = default_atlas.table
    networks = set(table["network"])
    assert {"DefaultMode", "Salience", "FrontoParietal"} <= networks
    assert {atlas_mod.canonical_network(n) for n in networks} >= {
        "default_mode",
        "salience",
        "executive_control",
    }
    labels = np.asarray(default_atlas.image.dataobj)
    voxel_mm3 = float(np.prod(default_atlas.image.header.get_zooms()))
    for structure in ("hippocampus", "amygdala"):
        for hemi in ("L", "R"):
            rows = table[(table["anatomy"] == structure) & (table["hemisphere"] == hemi)]
            assert len(rows) >= 1
            volume = np.isin(labels, rows["index"]).sum() * voxel_mm3
            assert 1000 < volume < 6000, (structure, hemi, volume)


def test_default_atlas_is_deterministic(default_atlas):
    again = atlas_mod.build_default_atlas(resolution=2)
    assert np.array_equal(np.asarray(again.image.dataobj), np.asarray(default_atlas.image.dataobj))


def test_write_and_load_round_trip(default_atlas, tmp_path):
    image_path = atlas_mod.write_atlas(default_atlas, tmp_path)
    assert image_path.name == "atlas-Seitzman300_space-MNI152NLin2009aSym_res-2_dseg.nii.gz"
    loaded = atlas_mod.load_atlas(image_path.parent)
    assert loaded.name == "Seitzman300" and loaded.space == "MNI152NLin2009aSym"
    pd.testing.assert_frame_equal(
        loaded.table[["index", "name", "network"]],
        default_atlas.table[["index", "name", "network"]],
    )
    assert np.array_equal(np.asarray(loaded.image.dataobj), np.asarray(default_atlas.image.dataobj))


def test_table_image_mismatch_names_the_files(tmp_path):
    data = np.zeros((7, 8, 9), np.int16)
    data[1, 1, 1], data[2, 2, 2], data[3, 3, 3] = 1, 2, 5
    image_path = tmp_path / "atlas-X_space-MNI_dseg.nii.gz"
    nb.save(nb.Nifti1Image(data, np.eye(4)), image_path)
    pd.DataFrame({"index": [1, 2, 3], "name": list("abc"), "network": list("nnn")}).to_csv(
        tmp_path / "atlas-X_space-MNI_dseg.tsv", sep="\t", index=False
    )
    with pytest.raises(
        atlas_mod.AtlasError,
        match=r"atlas-X_space-MNI_dseg.*in image only: \[5\].*"
        r"in table only: \[3\]",
    ):
        atlas_mod.load_atlas(image_path)
    pd.DataFrame({"index": [1, 2, 5], "name": list("abc")}).to_csv(
        tmp_path / "atlas-X_space-MNI_dseg.tsv", sep="\t", index=False
    )
    with pytest.raises(atlas_mod.AtlasError, match="lacks column"):
        atlas_mod.load_atlas(image_path)


@pytest.mark.shared
@pytest.mark.skipif(not SHARED_ATLASES.exists(), reason="../shared/data/atlases not present")
def test_shared_schaefer_tian_atlas_loads():
    loaded = atlas_mod.load_atlas(SHARED_ATLASES / "atlas-Schaefer200TianS1")
    assert loaded.name == "Schaefer200TianS1"
    assert loaded.space == "MNI152NLin2009cAsym"
    assert len(loaded.table) == 216
    assert {"Default", "SalVentAttn", "Cont", "Subcortical"} <= set(loaded.table["network"])
