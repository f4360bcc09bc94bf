"""Input checks: each bad file gets an error naming it and the fix."""

import gzip

import nibabel as nb
import numpy as np
import pytest

from pipeline import inputs


def _save(path, data, zooms=(2.0, 2.0, 2.0), tr=None):
    img = nb.Nifti1Image(np.asarray(data, dtype=np.float32), np.diag([*zooms, 1.0]))
    if tr is not None:
        img.header.set_zooms((*zooms, tr))
        img.header.set_xyzt_units("mm", "sec")
    nb.save(img, path)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_t1w_ok_and_nan_warning(tmp_path, rng):
    data = rng.random((7, 8, 9))
    data[0, 0, 0] = np.nan
    summary = inputs.check_t1w(_save(tmp_path / "t1.nii.gz", data))
    assert summary.shape == (7, 8, 9)
    assert summary.warnings and "1 NaN/Inf" in summary.warnings[0]


def test_empty_and_truncated_files_name_the_file(tmp_path, rng):
    empty = tmp_path / "empty_T1w.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(inputs.InputFileError, match=r"empty_T1w.nii.gz: the file is empty"):
        inputs.check_t1w(empty)
    good = _save(tmp_path / "good.nii.gz", rng.random((7, 8, 9, 30)), tr=2.0)
    truncated = tmp_path / "trunc_bold.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(
        inputs.InputFileError, match=r"trunc_bold.nii.gz: cannot be read .*corrupt or truncated"
    ):
        inputs.check_bold(truncated, {"RepetitionTime": 2.0})


def test_all_nan_is_an_error(tmp_path):
    path = _save(tmp_path / "nan.nii.gz", np.full((7, 8, 9), np.nan))
    with pytest.raises(inputs.InputFileError, match="every voxel is NaN"):
        inputs.check_t1w(path)


def test_bold_checks(tmp_path, rng):
    bold = _save(tmp_path / "bold.nii.gz", rng.random((7, 8, 9, 30)), tr=2.5)
    summary = inputs.check_bold(bold, {"RepetitionTime": 2.0})
    assert summary.n_volumes == 30 and summary.repetition_time == 2.0
    assert any("differs from sidecar RepetitionTime" in w for w in summary.warnings)
    with pytest.raises(inputs.InputFileError, match="RepetitionTime is missing"):
        inputs.check_bold(bold, {})
    short = _save(tmp_path / "short.nii.gz", rng.random((7, 8, 9, 5)), tr=2.0)
    with pytest.raises(inputs.InputFileError, match="only 5 volumes"):
        inputs.check_bold(short, {"RepetitionTime": 2.0})
    flat = _save(tmp_path / "flat.nii.gz", rng.random((7, 8, 9)))
    with pytest.raises(inputs.InputFileError, match="must be 4-D"):
        inputs.check_bold(flat, {"RepetitionTime": 2.0})


def _gradients(tmp_path, bvals, bvecs):
    np.savetxt(tmp_path / "dwi.bval", np.atleast_2d(bvals), fmt="%g")
    np.savetxt(tmp_path / "dwi.bvec", np.asarray(bvecs).T, fmt="%.6f")
    return tmp_path / "dwi.bval", tmp_path / "dwi.bvec"


def test_dwi_checks(tmp_path, rng):
    dwi = _save(tmp_path / "dwi.nii.gz", rng.random((7, 8, 9, 4)))
    dirs = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    bval, bvec = _gradients(tmp_path, [0, 1000, 1000, 2000], dirs)
    summary = inputs.check_dwi(dwi, bval, bvec)
    assert summary.n_b0 == 1 and summary.shells == (1000.0, 2000.0)

    bval, bvec = _gradients(tmp_path, [0, 1000, 1000], dirs[:3])
    with pytest.raises(inputs.InputFileError, match="4 volumes but 3 b-values"):
        inputs.check_dwi(dwi, bval, bvec)
    bval, bvec = _gradients(tmp_path, [1000] * 4, np.vstack([[1, 0, 0], dirs[1:]]))
    with pytest.raises(inputs.InputFileError, match="no b=0 volume"):
        inputs.check_dwi(dwi, bval, bvec)
    bval, bvec = _gradients(tmp_path, [0, 1000, 1000, 1000], dirs * [1, 1, 0])
    with pytest.raises(inputs.InputFileError, match="all-zero b-vector"):
        inputs.check_dwi(dwi, bval, bvec)
    bval, bvec = _gradients(tmp_path, [0, 1000, 1000, 1000], dirs * 2)
    assert any("not unit norm" in w for w in inputs.check_dwi(dwi, bval, bvec).warnings)


def test_gzip_garbage_is_reported(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(b"not a nifti header" * 10)
    with pytest.raises(inputs.InputFileError, match=r"garbage\.nii\.gz: cannot be read"):
        inputs.check_t1w(path)


def test_float32_gb_reads_the_header_only(tmp_path):
    path = tmp_path / "bold.nii.gz"
    nb.save(nb.Nifti1Image(np.zeros((10, 20, 5, 4), np.int16), np.eye(4)), path)
    assert inputs.float32_gb(path) == pytest.approx(10 * 20 * 5 * 4 * 4 / 1e9)
    # a truncated file still has its header: the estimate needs nothing more
    data = gzip.decompress(path.read_bytes())
    cut = tmp_path / "cut.nii"
    cut.write_bytes(data[:400])
    assert inputs.float32_gb(cut) == pytest.approx(10 * 20 * 5 * 4 * 4 / 1e9)
