"""Tests for pipeline.anat (and the longitudinal template of pipeline.registration).

Phantoms are the bundled MNI template seen through known maps on 3 mm grids:
a head (skull shell, bias field, noise) for N4 / brain extraction / tissues, and
sessions of one subject that differ by rigid head moves, one of them with a
planted +5 % expansion around the left hippocampus.
"""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from pipeline.anat import (
    brain_extraction,
    coarse_copy,
    head_mask,
    jacobian_volume_se,
    jacobian_volumes,
    label_volumes,
    n4_bias_correction,
    regional_volumes,
    segment_tissues,
    session_jacobian_volumes,
    structure_volumes,
    tissue_volumes,
    warp_tissue_priors,
)
from pipeline.atlas import build_default_atlas
from pipeline.registration import (
    apply_transform,
    atlas_to_native,
    build_subject_template,
    register_to_mni,
)
from pipeline.templates import load_template

VOXEL = 3.0


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def _rigid(angles_deg, shift, scale=1.0) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix() * scale
    out[:3, 3] = shift
    return out


def _grid(shape, voxel=VOXEL, centre=(0.0, -18.0, 8.0), rotation=None) -> np.ndarray:
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = np.asarray(centre) - voxel * (np.asarray(shape) - 1) / 2
    return rotation @ affine if rotation is not None else affine


def _resample(img, shape, affine, point_map, order=1) -> np.ndarray:
    xyz = nb.affines.apply_affine(affine, np.indices(shape).reshape(3, -1).T)
    ijk = nb.affines.apply_affine(np.linalg.inv(img.affine), point_map(xyz))
    data = np.asarray(img.dataobj, dtype=np.float64)
    return ndimage.map_coordinates(data, ijk.T, order=order, mode="constant").reshape(shape)


def _warp(xyz: np.ndarray, amplitude=2.0) -> np.ndarray:
    out = np.zeros_like(xyz)
    out[:, 0] = amplitude * np.sin(xyz[:, 1] / 25.0)
    out[:, 1] = amplitude * np.sin(xyz[:, 2] / 30.0 + 0.5)
    out[:, 2] = amplitude * np.cos(xyz[:, 0] / 28.0)
    return out


def _expansion(centre, factor, r0=18.0, r1=36.0):
    """Native -> subject point map: the ball of radius r0 grows ``factor`` in volume."""
    k = factor ** (-1 / 3)

    def point_map(xyz):
        d = xyz - centre
        t = np.clip((np.linalg.norm(d, axis=1) - r0) / (r1 - r0), 0, 1)
        return centre + d * (k + (1 - k) * t * t * (3 - 2 * t))[:, None]

    return point_map


def _dice(a, b) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


# --------------------------------------------------------------------------- head phantom


@pytest.fixture(scope="module")
def head():
    """Oblique 3 mm head: warped template brain, CSF/bone/scalp shell, bias field, noise."""
    rng = np.random.default_rng(0)
    template = load_template(2)
    shape = (62, 72, 60)
    affine = _grid(shape, rotation=_rigid([5, -4, 8], [0, 0, 0]))
    truth = _rigid([4, 3, -6], [3, -4, 2], 1.03)

    def point_map(xyz):
        moved = nb.affines.apply_affine(truth, xyz)
        return moved + _warp(moved)

    brain = _resample(template.t1w, shape, affine, point_map)
    mask = _resample(template.brain_mask, shape, affine, point_map) > 0.5
    distance = ndimage.distance_transform_edt(~mask, sampling=VOXEL)
    wm = np.percentile(brain[mask], 90)
    image = brain.copy()
    for (lo, hi), level in {(0, 3): 0.12, (3, 8): 0.04, (8, 14): 0.85}.items():
        image[(distance > lo) & (distance <= hi)] = level * wm
    xyz = nb.affines.apply_affine(affine, np.indices(shape).reshape(3, -1).T)
    bias = np.exp(0.25 * np.sin(xyz[:, 0] / 50) + 0.2 * xyz[:, 2] / 80).reshape(shape)
    noisy = np.abs(image * bias + rng.normal(0, 0.02 * wm, shape)).astype(np.float32)
    tissues = {name: _resample(getattr(template, name.lower()), shape, affine, point_map)
               for name in ("GM", "WM", "CSF")}
    return {"image": nb.Nifti1Image(noisy, affine), "bias": bias, "mask": mask,
            "tissues": tissues}


@pytest.fixture(scope="module")
def corrected(head):
    return n4_bias_correction(head["image"], settings="sloppy")


def test_n4_recovers_planted_bias_field(head, corrected):
    image, field = corrected
    inside = np.asarray(head_mask(head["image"]).dataobj) > 0
    log_fit, log_true = np.log(field.get_fdata()[inside]), np.log(head["bias"][inside])
    assert np.corrcoef(log_fit, log_true)[0, 1] > 0.97
    # the field is only defined up to a constant; after removing it, the fit is within 3 %
    residual = (log_fit - log_fit.mean()) - (log_true - log_true.mean())
    assert np.abs(residual).mean() < 0.03
    np.testing.assert_allclose(image.get_fdata() * field.get_fdata(),
                               head["image"].get_fdata(), rtol=1e-4, atol=1e-3)


def test_brain_extraction_and_tissues_on_skull_phantom(head, corrected, tmp_path):
    image, _ = corrected
    result = brain_extraction(image, resolution=3, settings="sloppy", work_dir=tmp_path)
    mask = result.mask.get_fdata() > 0
    assert _dice(mask, head["mask"]) >= 0.95
    np.testing.assert_array_equal(result.brain.get_fdata()[~mask], 0)

    priors = warp_tissue_priors(result.template_to_native, image, resolution=3)
    seg = segment_tissues(image, result.mask, priors)
    truth = head["mask"] & mask
    for tissue, floor in (("GM", 0.8), ("WM", 0.9)):
        r = np.corrcoef(seg[tissue].get_fdata()[truth], head["tissues"][tissue][truth])[0, 1]
        assert r > floor, (tissue, r)
    total = sum(seg[t].get_fdata() for t in ("GM", "WM", "CSF"))
    np.testing.assert_allclose(total[mask], 1.0, atol=1e-5)
    assert set(np.unique(seg["dseg"].get_fdata()[mask])) <= {1, 2, 3}


def test_coarse_copy_keeps_world_positions():
    """A 1 mm blob seen on the 2 mm copy stays where it was in world space."""
    shape = (40, 36, 30)
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (20.0, -18.0, -15.0)
    centre_vox = np.array([17.0, 20.0, 12.0])
    grid = np.indices(shape).reshape(3, -1).T
    data = np.exp(-((grid - centre_vox) ** 2).sum(1) / (2 * 4.0**2)).reshape(shape)
    fine = nb.Nifti1Image(data.astype(np.float32), affine)

    coarse = coarse_copy(fine, 2.0)

    assert coarse.header.get_zooms()[:3] == (2.0, 2.0, 2.0)
    assert coarse.shape == (20, 18, 15)
    values = np.asarray(coarse.dataobj)
    weights = values / values.sum()
    centroid_vox = np.indices(coarse.shape).reshape(3, -1) @ weights.ravel()
    world_coarse = coarse.affine[:3, :3] @ centroid_vox + coarse.affine[:3, 3]
    world_fine = affine[:3, :3] @ centre_vox + affine[:3, 3]
    assert np.allclose(world_coarse, world_fine, atol=0.05)
    # total signal (mass per unit volume) is kept by the pre-smoothing + interpolation
    assert values.sum() * 8 == pytest.approx(data.sum(), rel=0.01)
    # already at (or coarser than) the target: the very same image comes back
    assert coarse_copy(coarse, 2.0) is coarse


def test_segmentation_recovers_planted_classes(rng):
    """Three intensity classes with fuzzy priors: labels and class means are recovered."""
    truth = rng.integers(1, 4, size=(7, 8, 9))
    means = {1: 60.0, 2: 100.0, 3: 20.0}  # GM, WM, CSF
    image = np.vectorize(means.get)(truth) + rng.normal(0, 6, truth.shape)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    priors = {name: nb.Nifti1Image(np.where(truth == k + 1, 0.6, 0.2), affine)
              for k, name in enumerate(("GM", "WM", "CSF"))}
    mask = nb.Nifti1Image(np.ones(truth.shape, np.uint8), affine)
    seg = segment_tissues(nb.Nifti1Image(image.astype(np.float32), affine), mask, priors)
    assert (seg["dseg"].get_fdata() == truth).mean() > 0.99


# --------------------------------------------------------------------------- volumes


def test_volume_tables_match_counts(rng):
    affine = np.diag([2.0, 3.0, 1.5, 1.0])  # voxel = 9 mm3
    labels = rng.integers(0, 5, size=(7, 8, 9)).astype(np.int16)
    table = pd.DataFrame({
        "index": [1, 2, 3, 4, 5],
        "name": ["a", "b", "c", "d", "absent"],
        "anatomy": ["hippocampus", "hippocampus", "amygdala", "cortexL", "hippocampus"],
        "hemisphere": ["L", "L", "R", "L", "R"],
    })
    img = nb.Nifti1Image(labels, affine)
    vols = label_volumes(img, table)
    expected = [9.0 * (labels == k).sum() for k in range(1, 6)]
    np.testing.assert_allclose(vols["volume_mm3"], expected)

    jac = rng.uniform(0.8, 1.2, size=labels.shape)
    jvols = jacobian_volumes(img, nb.Nifti1Image(jac.astype(np.float32), affine), table)
    np.testing.assert_allclose(
        jvols["volume_mm3"], [9.0 * jac[labels == k].sum() for k in range(1, 6)], rtol=1e-5)

    summary = structure_volumes(vols, table)
    assert summary["hippocampus_L"] == pytest.approx(expected[0] + expected[1])
    assert summary["amygdala_R"] == pytest.approx(expected[2])
    assert summary["hippocampus_R"] == 0.0

    mask = nb.Nifti1Image((labels > 0).astype(np.uint8), affine)
    assert tissue_volumes(mask)["TICV"] == pytest.approx(9.0 * (labels > 0).sum())
    table_out = regional_volumes(vols, table, mask).set_index("region")["volume_mm3"]
    assert table_out["TICV"] == pytest.approx(9.0 * (labels > 0).sum())
    assert table_out["b"] == pytest.approx(expected[1])
    with pytest.raises(ValueError, match="anatomy"):
        structure_volumes(vols, table.drop(columns="anatomy"))


def test_volume_se_recovers_a_planted_noise_floor_despite_changed_parcels(rng):
    # 300 parcels of 100-900 mm3 whose session/template log ratio is noise of SD
    # k / sqrt(T); 10 parcels also truly grow by 5 %, and the whole session is 2 % larger
    n, k = 300, 0.8
    template = rng.uniform(100, 900, n)
    log_ratio = 0.02 + rng.standard_normal(n) * k / np.sqrt(template)
    log_ratio[:10] += np.log(1.05)
    session = template * np.exp(log_ratio)
    table = pd.DataFrame({
        "index": np.arange(1, n + 1), "name": [f"p{i}" for i in range(n)],
        "anatomy": ["hippocampus", "hippocampus"] + ["cortex"] * (n - 2),
        "hemisphere": ["L"] * n,
    })
    se = jacobian_volume_se(pd.DataFrame({"index": table["index"], "volume_mm3": session}),
                            pd.DataFrame({"index": table["index"], "volume_mm3": template}),
                            table)
    expected = session * k / np.sqrt(template)
    got = np.array([se[f"p{i}"] for i in range(n)])
    # the robust spread of 300 draws: within 15 % of the planted noise floor
    np.testing.assert_allclose(got / expected, got[0] / expected[0], rtol=1e-12)
    assert got[0] / expected[0] == pytest.approx(1.0, abs=0.15)
    # a structure made of two parcels: their errors in quadrature
    assert se["hippocampus_L"] == pytest.approx(np.hypot(got[0], got[1]))
    assert "amygdala_L" not in se


def test_volume_se_needs_enough_parcels():
    table = pd.DataFrame({"index": [1, 2, 3], "name": ["a", "b", "c"]})
    vols = pd.DataFrame({"index": [1, 2, 3], "volume_mm3": [100.0, 110.0, 90.0]})
    assert jacobian_volume_se(vols, vols, table) == {}


# --------------------------------------------------------------------------- longitudinal


@pytest.fixture(scope="module")
def sessions():
    """Three sessions of one subject on 3 mm grids, moved rigidly; ses-3 has +5 % left
    hippocampal region.  Each is sampled independently from the 2 mm template, as an
    acquisition would be."""
    source = load_template(2)
    atlas = build_default_atlas(3)
    table = atlas.table
    left = table[(table.anatomy == "hippocampus") & (table.hemisphere == "L")]["index"]
    labels = np.asarray(atlas.image.dataobj)
    centre = nb.affines.apply_affine(atlas.image.affine,
                                     np.argwhere(np.isin(labels, left))).mean(0)
    grow = _expansion(centre, 1.05)
    shape = (60, 70, 58)
    moves = [_rigid([0, 0, 0], [0, 0, 0]), _rigid([6, -3, 4], [4, -3, 5]),
             _rigid([-4, 5, -3], [-3, 5, -2])]
    images, masks, maps = [], [], []
    for k, move in enumerate(moves):
        def point_map(xyz, move=move, k=k):
            subject = nb.affines.apply_affine(move, xyz)
            subject = grow(subject) if k == 2 else subject
            return subject + _warp(subject)

        affine = _grid(shape)
        images.append(nb.Nifti1Image(
            _resample(source.t1w, shape, affine, point_map).astype(np.float32), affine))
        masks.append(nb.Nifti1Image(
            (_resample(source.brain_mask, shape, affine, point_map) > 0.5).astype(np.uint8),
            affine))
        maps.append(point_map)
    return {"images": images, "masks": masks, "maps": maps, "atlas": atlas}


def _jacobian_table(result, atlas, work):
    to_mni = register_to_mni(result.image, result.mask, resolution=3, settings="sloppy",
                             work_dir=work)
    in_template = apply_transform(atlas.image, to_mni.inverted(), result.image,
                                  interpolation="nearestNeighbor")
    return [session_jacobian_volumes(in_template, tx, atlas.table, work)
            for tx in result.transforms], to_mni


def _changes(volumes, table, k):
    big = volumes[0]["volume_mm3"].to_numpy() > 1000
    parcels = volumes[k]["volume_mm3"].to_numpy()[big] / volumes[0]["volume_mm3"].to_numpy()[big]
    s0, sk = structure_volumes(volumes[0], table), structure_volumes(volumes[k], table)
    return 100 * (parcels - 1), {key: 100 * (sk[key] / s0[key] - 1) for key in s0}


@pytest.fixture(scope="module")
def unbiased(sessions, tmp_path_factory):
    work = tmp_path_factory.mktemp("unbiased")
    result = build_subject_template(sessions["images"], sessions["masks"], mode="unbiased",
                                    settings="sloppy", work_dir=work)
    volumes, to_mni = _jacobian_table(result, sessions["atlas"], work)
    return result, volumes, to_mni


def test_unbiased_template_centres_sessions_and_keeps_volumes(sessions, unbiased):
    result, volumes, _ = unbiased
    assert result.image is not None and len(result.transforms) == 3
    table = sessions["atlas"].table
    parcels, structures = _changes(volumes, table, 1)  # ses-2: same anatomy, moved
    print(f"unbiased ses-2 vs ses-1: parcel mean {parcels.mean():.2f}% "
          f"sd {parcels.std():.2f}%", structures)
    assert abs(parcels.mean()) < 1.0
    assert abs(np.median(parcels)) < 1.0
    # the longitudinal SyN is tuned for 2 mm data (light regularisation to recover sub-voxel
    # change, see test_anat_groundtruth.py: identical 2 mm sessions within 1 %); on these
    # 3 mm phantoms a single structure moves up to ~3.5 % (measured -3.3 %)
    for key in ("hippocampus_L", "hippocampus_R"):
        assert abs(structures[key]) < 4.0


def test_planted_hippocampal_expansion_has_right_sign(sessions, unbiased):
    _, volumes, to_mni = unbiased
    atlas = sessions["atlas"]
    _, jac = _changes(volumes, atlas.table, 2)
    # label counts of the atlas brought to each native grid by the composed transforms
    result = unbiased[0]
    counts = [label_volumes(atlas_to_native(atlas.image, tx.then(to_mni), img), atlas.table)
              for tx, img in zip(result.transforms, sessions["images"], strict=True)]
    _, lab = _changes(counts, atlas.table, 2)
    # truth: volume of {x: map(x) in parcel} on a fine 1 mm grid, with and without expansion
    true = _fine_volume(atlas, sessions["maps"][2]) / _fine_volume(atlas, sessions["maps"][0])
    true = 100 * (true - 1)
    print(f"planted L hippocampus change: truth {true:.2f}%, "
          f"jacobian {jac['hippocampus_L']:.2f}%, labels {lab['hippocampus_L']:.2f}%")
    assert 3.5 < true < 5.0  # part of the parcel lies in the blend zone of the expansion
    # right sign, beyond the +/-2 % noise of identical sessions; magnitude is under-estimated
    # at 3 mm with sloppy settings (measured 2.48 % vs 3.97 % truth, see the report)
    assert jac["hippocampus_L"] > 1.5
    assert jac["hippocampus_L"] - jac["hippocampus_R"] > 1.5
    assert lab["hippocampus_L"] > 0


def _fine_volume(atlas, point_map) -> float:
    """Native volume (mm3) of the left hippocampus parcels under ``point_map`` (1 mm grid)."""
    table = atlas.table
    left = table[(table.anatomy == "hippocampus") & (table.hemisphere == "L")]["index"]
    axes = [np.arange(-60.0, 10.0), np.arange(-60.0, 10.0), np.arange(-45.0, 25.0)]
    xyz = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    # the rigid head move of a session does not change volumes: undo it by sampling in
    # subject coordinates, i.e. drop the move from the map for the first session grid
    ijk = nb.affines.apply_affine(np.linalg.inv(atlas.image.affine), point_map(xyz))
    labels = ndimage.map_coordinates(np.asarray(atlas.image.dataobj), ijk.T, order=0)
    return float(np.isin(labels, left).sum())


def test_first_mode_is_anchored_on_first_session(sessions, unbiased, tmp_path):
    first = build_subject_template(sessions["images"][:2], sessions["masks"][:2], mode="first",
                                   settings="sloppy", work_dir=tmp_path)
    np.testing.assert_array_equal(first.mask.get_fdata(), sessions["masks"][0].get_fdata())
    volumes, _ = _jacobian_table(first, sessions["atlas"], tmp_path)
    # the first session maps by the identity: its Jacobian is exactly 1
    native0 = volumes[0]["volume_mm3"].sum()
    labels_total = volumes[0]["volume_mm3"].to_numpy()
    assert native0 > 0 and np.all(labels_total >= 0)
    parcels, structures = _changes(volumes, sessions["atlas"].table, 1)
    unb, _ = _changes(unbiased[1], sessions["atlas"].table, 1)
    print(f"first ses-2 vs ses-1: parcel mean {parcels.mean():.2f}% sd {parcels.std():.2f}%",
          structures)
    # anchoring on ses-1 biases ses-2 volumes (ses-1 is never resampled); the unbiased
    # template removes that bias (measured: first -1.96 %, unbiased -0.03 %)
    assert abs(unb.mean()) < 0.5
    assert abs(parcels.mean()) > abs(unb.mean())


def test_sessionwise_mode_is_identity(sessions, tmp_path):
    result = build_subject_template(sessions["images"][:2], mode="sessionwise",
                                    settings="sloppy", work_dir=tmp_path)
    assert result.image is None
    moved = apply_transform(sessions["images"][1], result.transforms[1], sessions["images"][1])
    np.testing.assert_allclose(moved.get_fdata(), sessions["images"][1].get_fdata(), atol=1e-4)
