"""Preprocessed inputs made from the simulator's ground truth, for the diffusion workflow.

:func:`qsiprep_layout` puts a simulated session's DWI where QSIPrep writes its
preprocessed series, to exercise the workflow's ``--qsiprep-dir`` path.

:func:`groundtruth_anatomy` writes what the anatomical workflow hands the diffusion
workflow for one session (T1w, brain mask, GM/WM/CSF probabilities, native atlas), built
from the planted truth instead of estimated: the template tissue maps pulled into the
native T1w grid through the true MNI -> T1w coordinate map, the true native parcels and
the true brain mask.  Tests and benchmarks of the diffusion maths then do not depend on
(nor pay for) the anatomical registrations.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage

from pipeline.templates import load_template


@dataclass(frozen=True)
class AnatomyFiles:
    """Native-T1w inputs of the diffusion workflow for one session."""

    t1w_preproc: Path
    brain_mask: Path
    gm: Path
    wm: Path
    csf: Path
    atlas_native: Path


def _sample(volume: np.ndarray, affine: np.ndarray, points: np.ndarray, order: int) -> np.ndarray:
    """Values of ``volume`` at world ``points`` (N, 3), 0 outside."""
    inv = np.linalg.inv(affine)
    ijk = points @ inv[:3, :3].T + inv[:3, 3]
    return ndimage.map_coordinates(volume, ijk.T, order=order, mode="constant", cval=0.0)


def mni_coordinates(coordinate_map: nb.Nifti1Image, reference: nb.Nifti1Image) -> np.ndarray:
    """MNI coordinates (mm) of every voxel of ``reference``, shape ``(*shape, 3)``.

    ``coordinate_map`` is the simulator's ``from-MNI..._to-T1w_mode-image_xfm`` (a coarse
    grid in T1w space holding MNI mm), interpolated linearly as its sidecar says.
    """
    cmap = np.asarray(coordinate_map.get_fdata(), dtype=np.float64)
    shape = reference.shape[:3]
    ijk = np.indices(shape).reshape(3, -1).T
    world = ijk @ reference.affine[:3, :3].T + reference.affine[:3, 3]
    inv = np.linalg.inv(coordinate_map.affine)
    grid = world @ inv[:3, :3].T + inv[:3, 3]
    # mode="nearest" extends the map past its last grid points (it covers the head only)
    out = np.stack(
        [ndimage.map_coordinates(cmap[..., c], grid.T, order=1, mode="nearest")
         for c in range(3)], axis=-1,
    )
    return out.reshape(*shape, 3)


def groundtruth_anatomy(
    dataset: str | Path, subject: str, session: str, out_dir: str | Path,
    *, atlas: str = "Seitzman300",
) -> AnatomyFiles:
    """Write the true native-T1w anatomy of one simulated session into ``out_dir``.

    Parameters
    ----------
    dataset : path
        Root of a dataset written by ``trajectome-simulate``.
    subject, session : str
        Labels without ``sub-``/``ses-``.
    out_dir : path
        Where the NIfTI files go.
    atlas : str
        Atlas name in the ground-truth file names.
    """
    dataset, out = Path(dataset), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{subject}_ses-{session}"
    gt = dataset / "derivatives" / "groundtruth" / f"sub-{subject}" / f"ses-{session}" / "anat"
    t1w = dataset / f"sub-{subject}" / f"ses-{session}" / "anat" / f"{stem}_T1w.nii.gz"
    needed = {
        "T1w": t1w,
        "mask": gt / f"{stem}_space-T1w_desc-brain_mask.nii.gz",
        "dseg": gt / f"{stem}_space-T1w_atlas-{atlas}_desc-planted_dseg.nii.gz",
        "xfm": gt / f"{stem}_from-MNI152NLin2009aSym_to-T1w_mode-image_xfm.nii.gz",
    }
    missing = [str(p) for p in needed.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"ground truth missing: {missing}; is {dataset} a trajectome-simulate dataset?"
        )
    reference = nb.load(t1w)
    mask = np.asarray(nb.load(needed["mask"]).dataobj) > 0
    coords = mni_coordinates(nb.load(needed["xfm"]), reference).reshape(-1, 3)
    template = load_template(2)
    tissues = {}
    for name in ("gm", "wm", "csf"):
        img = getattr(template, name)
        values = _sample(np.asarray(img.dataobj, np.float64), img.affine, coords, 1)
        tissues[name] = np.where(mask, values.reshape(mask.shape), 0.0).astype(np.float32)
    paths = {
        "t1w_preproc": out / f"{stem}_desc-preproc_T1w.nii.gz",
        "brain_mask": out / f"{stem}_desc-brain_mask.nii.gz",
        "gm": out / f"{stem}_label-GM_probseg.nii.gz",
        "wm": out / f"{stem}_label-WM_probseg.nii.gz",
        "csf": out / f"{stem}_label-CSF_probseg.nii.gz",
        "atlas_native": out / f"{stem}_space-T1w_atlas-{atlas}_dseg.nii.gz",
    }
    nb.save(nb.Nifti1Image(reference.get_fdata().astype(np.float32), reference.affine),
            paths["t1w_preproc"])
    nb.save(nb.Nifti1Image(mask.astype(np.uint8), reference.affine), paths["brain_mask"])
    for name, data in tissues.items():
        nb.save(nb.Nifti1Image(data, reference.affine), paths[name])
    dseg = nb.load(needed["dseg"])
    nb.save(nb.Nifti1Image(np.asarray(dseg.dataobj).astype(np.int16), dseg.affine),
            paths["atlas_native"])
    return AnatomyFiles(**paths)


def qsiprep_layout(dataset: str | Path, subject: str, session: str,
                   out_dir: str | Path) -> Path:
    """Copy a session's raw DWI into QSIPrep's output layout and return the image path.

    Written as ``sub-X/ses-Y/dwi/sub-X_ses-Y_space-T1w_desc-preproc_dwi.nii.gz`` with its
    ``.bval``/``.bvec``.  The series is *not* preprocessed (the simulated motion stays and
    there is no mask or confounds file): this only tests that QSIPrep outputs are found and
    taken as they are.
    """
    stem = f"sub-{subject}_ses-{session}"
    src = Path(dataset) / f"sub-{subject}" / f"ses-{session}" / "dwi" / f"{stem}_dwi"
    dst = Path(out_dir) / f"sub-{subject}" / f"ses-{session}" / "dwi"
    dst.mkdir(parents=True, exist_ok=True)
    target = dst / f"{stem}_space-T1w_desc-preproc_dwi"
    for ext in (".nii.gz", ".bval", ".bvec"):
        if not Path(f"{src}{ext}").exists():
            raise FileNotFoundError(f"{src}{ext} missing; is {dataset} a simulated dataset?")
        shutil.copyfile(f"{src}{ext}", f"{target}{ext}")
    return Path(f"{target}.nii.gz")
