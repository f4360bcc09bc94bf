"""The anatomical maths against the simulator's planted ground truth (bids_examples/ds-ect).

One patient, pre- and post-ECT, with the ``--sloppy`` settings: brain-mask and
parcel Dice against the true native masks/parcels, and the planted post-ECT
hippocampal expansion recovered by Jacobian integration on the subject template.
A second subject made of one session and a rigidly moved copy of it checks that
the unbiased template adds no volume change of its own.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from pipeline.anat import (
    brain_extraction,
    n4_bias_correction,
    segment_tissues,
    session_jacobian_volumes,
    structure_volumes,
    warp_tissue_priors,
)
from pipeline.atlas import build_default_atlas
from pipeline.registration import (
    apply_transform,
    atlas_to_native,
    build_subject_template,
    register_to_mni,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1] / "bids_examples" / "ds-ect"
GT = ROOT / "derivatives" / "groundtruth"
SUB, SESSIONS = "sub-pat01", ("preECT", "postECT")
SETTINGS, THREADS = "sloppy", 2


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _gt(ses: str, suffix: str) -> Path:
    return GT / SUB / f"ses-{ses}" / "anat" / f"{SUB}_ses-{ses}_{suffix}"


def _hippocampus(volumes: pd.DataFrame, table: pd.DataFrame) -> float:
    summary = structure_volumes(volumes, table)
    return summary["hippocampus_L"] + summary["hippocampus_R"]


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    """N4 + brain extraction + tissues of each session, as the app runs them."""
    out = {}
    for ses in SESSIONS:
        work = tmp_path_factory.mktemp(ses)
        t1w = ROOT / SUB / f"ses-{ses}" / "anat" / f"{SUB}_ses-{ses}_T1w.nii.gz"
        corrected, _ = n4_bias_correction(t1w, settings=SETTINGS, n_threads=THREADS)
        bet = brain_extraction(corrected, settings=SETTINGS, work_dir=work, n_threads=THREADS)
        priors = warp_tissue_priors(bet.template_to_native, corrected, n_threads=THREADS)
        tissues = segment_tissues(corrected, bet.mask, priors)
        out[ses] = {"t1w": corrected, "mask": bet.mask, "brain": bet.brain, "tissues": tissues}
    return out


def _longitudinal(brains, masks, work):
    """Unbiased template, template -> MNI, atlas on the template, Jacobian volumes."""
    atlas = build_default_atlas(2)
    result = build_subject_template(brains, masks, settings=SETTINGS, work_dir=work,
                                    n_threads=THREADS)
    to_mni = register_to_mni(result.image, result.mask, settings=SETTINGS, work_dir=work,
                             n_threads=THREADS)
    in_template = apply_transform(atlas.image, to_mni.inverted(), result.image,
                                  interpolation="nearestNeighbor", n_threads=THREADS)
    volumes = [session_jacobian_volumes(in_template, tx, atlas.table, work, n_threads=THREADS)
               for tx in result.transforms]
    return atlas, result, to_mni, volumes


@pytest.fixture(scope="module")
def longitudinal(preprocessed, tmp_path_factory):
    sessions = [preprocessed[s] for s in SESSIONS]
    return _longitudinal([s["brain"] for s in sessions], [s["mask"] for s in sessions],
                         tmp_path_factory.mktemp("template"))


def test_brain_masks_match_truth(preprocessed):
    for ses in SESSIONS:
        truth = np.asarray(nb.load(_gt(ses, "space-T1w_desc-brain_mask.nii.gz")).dataobj) > 0
        found = np.asarray(preprocessed[ses]["mask"].dataobj) > 0
        dice = _dice(found, truth)
        print(f"{ses}: brain-mask Dice {dice:.4f}")
        assert dice >= 0.95  # measured 0.993-0.994
        # tissue probabilities partition the mask
        total = sum(np.asarray(preprocessed[ses]["tissues"][t].dataobj) for t in ("GM", "WM",
                                                                                   "CSF"))
        np.testing.assert_allclose(total[found], 1.0, atol=1e-5)


def test_native_parcels_match_truth(preprocessed, longitudinal):
    atlas, result, to_mni, _ = longitudinal
    for k, ses in enumerate(SESSIONS):
        native = atlas_to_native(atlas.image, result.transforms[k].then(to_mni),
                                 preprocessed[ses]["t1w"], n_threads=THREADS)
        labels = np.asarray(native.dataobj).astype(int)
        truth = np.asarray(nb.load(
            _gt(ses, "space-T1w_atlas-Seitzman300_desc-planted_dseg.nii.gz")).dataobj).astype(int)
        sizes = np.bincount(truth.ravel(), minlength=labels.max() + 1) * 8.0  # 2 mm voxels
        big = [i for i in atlas.table["index"] if sizes[i] > 500]
        dices = [_dice(labels == i, truth == i) for i in big]
        print(f"{ses}: mean parcel Dice {np.mean(dices):.3f} over {len(big)} parcels")
        assert len(big) > 250
        assert np.mean(dices) >= 0.8  # measured 0.85 (3 sessions)


def test_planted_hippocampal_change_recovered(longitudinal):
    atlas, _, _, volumes = longitudinal
    planted = [pd.read_csv(_gt(s, "atlas-Seitzman300_desc-planted_stat-volume_morph.tsv"),
                           sep="\t").set_index("name")["volume_mm3"] for s in SESSIONS]
    true = [p["left_hippocampus"] + p["right_hippocampus"] for p in planted]
    true_change = 100 * (true[1] / true[0] - 1)
    found = [_hippocampus(v, atlas.table) for v in volumes]
    change = 100 * (found[1] / found[0] - 1)
    print(f"hippocampus post vs pre: found {change:+.2f} %, planted {true_change:+.2f} %")
    assert 4.5 < true_change < 5.2  # the dataset's planted value
    assert 0.7 * true_change < change < 1.3 * true_change
    # absolute volumes: template parcels come from an MNI registration, so within 10 %
    np.testing.assert_allclose(found, true, rtol=0.1)


def _rigid_copy(img: nb.Nifti1Image, matrix: np.ndarray, order: int) -> nb.Nifti1Image:
    """``img`` seen after a rigid head move, resampled on its own grid."""
    ijk = np.indices(img.shape).reshape(3, -1).T
    xyz = nb.affines.apply_affine(matrix @ img.affine, ijk)
    src = nb.affines.apply_affine(np.linalg.inv(img.affine), xyz)
    data = ndimage.map_coordinates(np.asarray(img.dataobj, np.float64), src.T, order=order,
                                   mode="constant").reshape(img.shape)
    return nb.Nifti1Image(data.astype(np.float32), img.affine)


def _move(angles_deg, shift_mm) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    out[:3, 3] = shift_mm
    return out


def test_identical_sessions_show_no_change(preprocessed, tmp_path):
    """Same anatomy, two head positions: every volume change is the template's own bias.

    Both sessions are the pre-ECT brain moved by opposite rigid moves (9 deg, 6.5 mm apart)
    and resampled alike (cubic), so neither is the untouched original.  Parcels on the
    template are the true native parcels carried by session 1's transform: the test is
    about session differences, so no MNI registration is needed.
    """
    first = preprocessed["preECT"]
    truth = nb.load(_gt("preECT", "space-T1w_atlas-Seitzman300_desc-planted_dseg.nii.gz"))
    moves = [_move([2, -1.5, 2.5], [1.6, -1.25, 2.05]), _move([-2, 1.5, -2.5], [-1.6, 1.25, -2.05])]
    brains = [_rigid_copy(first["brain"], m, order=3) for m in moves]
    masks = [_rigid_copy(first["mask"], m, order=0) for m in moves]
    result = build_subject_template(brains, masks, settings=SETTINGS, work_dir=tmp_path,
                                    n_threads=THREADS)
    labels = apply_transform(_rigid_copy(truth, moves[0], order=0), result.transforms[0],
                             result.image, interpolation="nearestNeighbor", n_threads=THREADS)
    table = build_default_atlas(2).table
    volumes = [session_jacobian_volumes(labels, tx, table, tmp_path, n_threads=THREADS)
               for tx in result.transforms]
    v0, v1 = (v["volume_mm3"].to_numpy() for v in volumes)
    big = v0 > 500
    parcels = 100 * (v1[big] / v0[big] - 1)
    hipp = 100 * (_hippocampus(volumes[1], table) / _hippocampus(volumes[0], table) - 1)
    print(f"identical sessions: {big.sum()} parcels, change mean {parcels.mean():+.2f} % "
          f"sd {parcels.std():.2f} %, hippocampus {hipp:+.2f} %")
    assert big.sum() > 250
    assert abs(parcels.mean()) < 1.0
    assert abs(np.median(parcels)) < 1.0
    assert abs(hipp) < 1.0
