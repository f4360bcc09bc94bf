"""Structural connectome from end points: hand cases, chunk invariance and MRtrix3 reference."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.streamlines import TckFile, Tractogram

from pipeline import connectome as C


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)


def _random_labels(rng: np.random.Generator, shape=(7, 8, 9), n_labels: int = 4) -> np.ndarray:
    labels = rng.integers(1, n_labels + 1, size=shape).astype(np.int32)
    labels[rng.random(shape) < 0.6] = 0
    return labels


def _oblique_affine() -> np.ndarray:
    # Flipped x, anisotropic voxels, rotated about z, shifted: every convention is exercised.
    th = 0.3
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-2.0, 2.5, 3.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    return affine


def _random_streamlines(rng, shape, affine, n: int) -> list[np.ndarray]:
    lo, hi = -2.0, np.array(shape) + 1.0  # end points also fall outside the image
    out = []
    for _ in range(n):
        a, b = rng.uniform(lo, hi, size=3), rng.uniform(lo, hi, size=3)
        vox = np.linspace(a, b, 5)
        out.append((vox @ affine[:3, :3].T + affine[:3, 3]).astype(np.float32))
    return out


def test_assignment_hand_cases():
    labels = np.zeros((5, 5, 5), dtype=np.int32)
    labels[4, 2, 2] = 1
    labels[0, 2, 2] = 2
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # voxel (4, 2, 2) has its centre at (8, 4, 4) mm
    points = np.array(
        [
            [8.0, 4.0, 4.0],  # in the voxel
            [9.9, 4.0, 4.0],  # 1.9 mm from the centre, outside the image: found by search
            [10.1, 4.0, 4.0],  # 2.1 mm: beyond the 2 mm radius
            [6.0, 4.0, 4.0],  # unlabelled voxel (3, 2, 2), 2.0 mm from label 1: not < 2
            [5.0, 4.0, 4.0],  # 3 mm from label 1, 5 mm from label 2
            [1.0, 4.0, 4.0],  # 1 mm from label 2
        ]
    )
    np.testing.assert_array_equal(
        C.assign_points(points, labels, affine, radius=2.0), [1, 1, 0, 0, 0, 2]
    )
    np.testing.assert_array_equal(
        C.assign_points(points, labels, affine, radius=4.0), [1, 1, 1, 1, 1, 2]
    )
    np.testing.assert_array_equal(
        C.assign_points(points, labels, affine, radius=None), [1, 0, 0, 0, 0, 0]
    )


def test_radial_search_order_matches_mrtrix_rule():
    offsets = C.radial_search_offsets([1.0, 1.0, 1.0], 2.0)
    dist = np.linalg.norm(offsets, axis=1)
    assert np.all(np.diff(dist) >= 0)
    np.testing.assert_array_equal(offsets[0], [0, 0, 0])
    # Equal distances keep z-outer, x-inner order: the first 1-voxel offset is (0, 0, -1).
    np.testing.assert_array_equal(offsets[1], [0, 0, -1])
    assert dist.max() < 2.0 + np.sqrt(3) / 2


def test_measures_by_hand():
    acc = C.ConnectomeAccumulator(np.array([10, 20, 30]), np.array([4.0, 6.0, 10.0]))
    # streamlines: 10-20 (len 10, fa .5), 20-10 (len 20, fa .7), 10-30 (len 5, fa .2),
    # 30-30 (self), one end unassigned, none assigned
    acc.add_assigned(
        acc.node_index([10, 20, 10, 30, 20, 0]),
        acc.node_index([20, 10, 30, 30, 0, 0]),
        lengths=np.array([10.0, 20.0, 5.0, 7.0, 3.0, 1.0]),
        fa=np.array([0.5, 0.7, 0.2, 0.9, 0.1, 0.1]),
    )
    count = acc.matrix("count")
    np.testing.assert_array_equal(count, [[0, 2, 1], [2, 0, 0], [1, 0, 0]])
    np.testing.assert_allclose(
        acc.matrix("count_invnodevol"),
        [[0, 2 * 2 / 10, 1 * 2 / 14], [2 * 2 / 10, 0, 0], [1 * 2 / 14, 0, 0]],
        rtol=1e-15,
    )
    length = acc.matrix("mean_length")
    assert length[0, 1] == length[1, 0] == pytest.approx(15.0, abs=1e-12)
    assert length[0, 2] == pytest.approx(5.0, abs=1e-12)
    assert np.isnan(length[1, 2])
    assert acc.matrix("mean_fa")[0, 1] == pytest.approx(0.6, abs=1e-12)
    assert acc.matrix("count", zero_diagonal=False)[2, 2] == 1
    qc = acc.qc()
    assert qc["n_streamlines"] == 6
    assert qc["n_assigned_two_parcels"] == 4
    assert qc["n_assigned_one_parcel"] == 1
    assert qc["n_self_connections"] == 1
    assert qc["fraction_assigned_two_parcels"] == pytest.approx(4 / 6)


def test_chunked_accumulation_is_exact(rng):
    shape = (7, 8, 9)
    labels = _random_labels(rng, shape)
    affine = _oblique_affine()
    fa = rng.random(shape)
    streamlines = _random_streamlines(rng, shape, affine, 400)
    whole = C.connectome_from_streamlines([streamlines], labels, affine, fa=fa)
    chunks = [streamlines[i : i + 37] for i in range(0, 400, 37)]
    parts = [C.connectome_from_streamlines([c], labels, affine, fa=fa) for c in chunks]
    merged = parts[0]
    for part in reversed(parts[1:]):  # any order
        merged.merge(part)
    for measure in C.MEASURES:
        np.testing.assert_array_equal(merged.matrix(measure), whole.matrix(measure))
    assert merged.qc() == whole.qc()
    assert whole.count.sum() == whole.n_two_parcels > 0


def test_relmat_table_and_sidecar():
    table = C.relmat_table(np.eye(3), ["A", "B", "C"])
    assert list(table.columns) == ["Node", "A", "B", "C"]
    assert table.to_csv(sep="\t", index=False).splitlines()[0] == "Node\tA\tB\tC"
    meta = C.relmat_sidecar(
        "count", algorithm="probabilistic", n_streamlines=1000, seed=3, step_size=1.0
    )
    assert meta["Directed"] is False and meta["ValidDiagonal"] is False
    assert meta["StorageFormat"] == "Full" and meta["StreamlineCount"] == 1000
    with pytest.raises(ValueError, match="does not match"):
        C.relmat_table(np.eye(3), ["A", "B"])


def test_label_image_must_be_3d():
    with pytest.raises(ValueError, match="3-D"):
        C.assign_points(np.zeros((1, 3)), np.zeros((2, 2)), np.eye(4))


@pytest.mark.skipif(shutil.which("tck2connectome") is None, reason="MRtrix3 not installed")
@pytest.mark.parametrize("radius", [2.0, 4.0, None])
def test_matches_mrtrix_tck2connectome(rng, tmp_path: Path, radius):
    shape = (7, 8, 9)
    labels = _random_labels(rng, shape)
    affine = _oblique_affine()
    streamlines = _random_streamlines(rng, shape, affine, 2000)
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "labels.nii.gz")
    TckFile(Tractogram(streamlines, affine_to_rasmm=np.eye(4))).save(tmp_path / "t.tck")
    option = "-assignment_end_voxels" if radius is None else f"-assignment_radial_search {radius}"

    def mrtrix(out: str, *extra: str) -> np.ndarray:
        cmd = ["tck2connectome", "-quiet", "-force", "-symmetric", *option.split(), *extra]
        subprocess.run([*cmd, "t.tck", "labels.nii.gz", out], cwd=tmp_path, check=True)
        return np.loadtxt(tmp_path / out, delimiter=",")

    counts = mrtrix("count.csv", "-out_assignments", "assign.txt")
    reference = np.loadtxt(tmp_path / "assign.txt", dtype=np.int64)
    # Read the points back from the file, exactly what MRtrix saw.
    loaded = [np.asarray(s) for s in nib.streamlines.load(tmp_path / "t.tck").streamlines]
    acc = C.ConnectomeAccumulator.from_label_image(labels, [1, 2, 3, 4])
    assigned = acc.add_streamlines(loaded, labels, affine, radius=radius)
    np.testing.assert_array_equal(assigned, reference)
    # Not vacuous: some streamlines connect two parcels, many ends are unassigned.
    assert (reference > 0).all(axis=1).sum() >= 20
    assert (reference == 0).mean() > 0.1
    np.testing.assert_array_equal(acc.matrix("count", zero_diagonal=False), counts)
    invvol = mrtrix("invvol.csv", "-scale_invnodevol")
    np.testing.assert_allclose(acc.matrix("count_invnodevol", zero_diagonal=False), invvol,
                               rtol=1e-5)
    length = mrtrix("length.csv", "-scale_length", "-stat_edge", "mean")
    ours = np.nan_to_num(acc.matrix("mean_length", zero_diagonal=False))
    np.testing.assert_allclose(ours, length, rtol=1e-5, atol=1e-4)


def test_bad_labels_and_missing_fa_are_reported(rng):
    with pytest.raises(ValueError, match="non-integer"):
        C.ConnectomeAccumulator.from_label_image(np.full((2, 2, 2), 1.5))
    labels = _random_labels(rng)
    acc = C.ConnectomeAccumulator.from_label_image(labels)
    acc.add_streamlines(_random_streamlines(rng, labels.shape, np.eye(4), 20), labels, np.eye(4))
    with pytest.raises(ValueError, match="FA map"):
        acc.matrix("mean_fa")


@pytest.mark.skipif(shutil.which("tck2connectome") is None, reason="MRtrix3 not installed")
def test_chunked_tck_writer_is_read_by_mrtrix(rng, tmp_path: Path):
    from pipeline.tractography import TckWriter

    shape = (7, 8, 9)
    labels = _random_labels(rng, shape)
    affine = _oblique_affine()
    streamlines = _random_streamlines(rng, shape, affine, 500)
    writer = TckWriter(tmp_path / "w.tck", {"seed": 3})
    for start in range(0, 500, 120):
        writer.append(streamlines[start : start + 120])
    writer.close()
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "labels.nii.gz")
    subprocess.run(
        ["tck2connectome", "-quiet", "-symmetric", "-out_assignments", "a.txt",
         "w.tck", "labels.nii.gz", "m.csv"], cwd=tmp_path, check=True,
    )
    reference = np.loadtxt(tmp_path / "a.txt", dtype=np.int64)
    assert len(reference) == 500
    acc = C.ConnectomeAccumulator.from_label_image(labels, [1, 2, 3, 4])
    np.testing.assert_array_equal(
        acc.add_streamlines(streamlines, labels, affine, radius=4.0), reference
    )
