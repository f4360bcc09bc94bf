"""A simulated fMRIPrep derivatives folder, made from a simulated raw dataset and its truth.

For every BOLD run, :func:`write_fmriprep_run` writes what fMRIPrep would, with the planted
truth in place of estimates:

* ``space-<template>_desc-preproc_bold.nii.gz``: the raw run resampled into the template
  grid (the BOLD voxel size, 2 mm at the finest) in one cubic interpolation per volume,
  composing the *planted* head motion and the *true* T1w -> MNI map (the simulator's
  ``from-T1w_to-MNI152NLin2009aSym_mode-image_xfm`` coordinate map).  BOLD and T1w of a
  simulated session share the scanner frame, so the BOLD -> T1w step is the identity.
* ``space-<template>_desc-brain_mask.nii.gz``: the template brain mask on that grid,
  restricted to voxels the BOLD field of view covers at every volume.
* ``desc-confounds_timeseries.tsv`` (+ JSON): :func:`pipeline.confounds.build_confounds` on
  the resampled run with the planted motion parameters (so FD is the planted FD), tissue
  masks from the template WM/CSF probabilities (> 0.9) and the planted number of
  non-steady-state volumes, in fMRIPrep's column names.

The motion parameters follow :mod:`pipeline.motion` (rotations about the world origin),
not fMRIPrep's (about the volume centre): rotations and FD agree, translations differ by
``(I - R) c``.  It feeds the ``--fmriprep-dir`` path of the functional workflow in tests
and benchmarks; it never runs in the app.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

from pipeline import confounds, resample
from pipeline.derivatives import write_json, write_tsv
from pipeline.simulate.writer import write_nifti
from pipeline.templates import DEFAULT_TEMPLATE, load_template

#: Template spaces the workflow accepts from fMRIPrep.
SPACES = (DEFAULT_TEMPLATE, "MNI152NLin2009cAsym")
MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


def _tissue(prob: np.ndarray, brain: np.ndarray, threshold: float = 0.9) -> np.ndarray:
    # no erosion on coarse grids when it would empty the mask
    mask = (prob > threshold) & brain
    eroded = confounds.erode_mask(mask, 1)
    return eroded if eroded.sum() >= 20 else mask


def write_fmriprep_run(
    dataset: str | Path,
    subject: str,
    session: str,
    out_dir: str | Path,
    *,
    space: str = DEFAULT_TEMPLATE,
    task: str = "rest",
) -> dict[str, Path]:
    """Write the simulated fMRIPrep outputs of one session's BOLD run.

    Parameters
    ----------
    dataset : path
        Root of a dataset written by ``trajectome-simulate``.
    subject, session : str
        Labels without ``sub-``/``ses-``.
    out_dir : path
        The fMRIPrep derivatives root (``sub-X/ses-Y/func`` is created inside).
    space : str
        Space label of the file names (the grid is always the bundled
        MNI152NLin2009aSym; ``MNI152NLin2009cAsym`` only exercises the name handling).
    task : str

    Returns
    -------
    dict
        ``bold``, ``mask``, ``confounds`` paths.
    """
    if space not in SPACES:
        raise ValueError(f"space {space!r}: choose from {SPACES}")
    root, out = Path(dataset), Path(out_dir)
    stem = f"sub-{subject}_ses-{session}"
    raw = root / f"sub-{subject}" / f"ses-{session}" / "func" / f"{stem}_task-{task}_bold.nii.gz"
    gt = root / "derivatives" / "groundtruth" / f"sub-{subject}" / f"ses-{session}"
    truth_file = gt / "func" / f"{stem}_task-{task}_desc-planted_outliers.tsv"
    xfm = gt / "anat" / f"{stem}_from-T1w_to-{DEFAULT_TEMPLATE}_mode-image_xfm.nii.gz"
    missing = [str(p) for p in (raw, truth_file, xfm) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"missing {missing}; is {root} a trajectome-simulate dataset?")
    bold = nb.load(raw)
    meta = json.loads(raw.with_name(raw.name.replace(".nii.gz", ".json")).read_text())
    tr = float(meta["RepetitionTime"])
    truth = pd.read_csv(truth_file, sep="\t")
    params = truth[MOTION].to_numpy(float)
    n_dummy = int(truth["non_steady_state"].sum())

    template = load_template(2)
    res = resample.output_resolution(bold.header.get_zooms())
    shape, affine = resample.template_grid(template.t1w, res)
    coords = resample.coordinates_from_map(nb.load(xfm), shape, affine)
    points = resample.grid_points(shape, affine)
    folder = out / f"sub-{subject}" / f"ses-{session}" / "func"
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / f"{stem}_task-{task}_space-{space}"
    with tempfile.TemporaryDirectory() as tmp:
        moved = resample.resample_bold(bold, Path(tmp) / "bold.nii", coords, affine,
                                       motion=params, order=3)
        data = np.asarray(nb.load(moved).dataobj)
        n_t = data.shape[3]
        write_nifti(Path(f"{prefix}_desc-preproc_bold.nii.gz"),
                    (data[..., t] for t in range(n_t)), affine, (*shape, n_t), "float32", tr=tr)
        brain = resample.sample_at(np.asarray(template.brain_mask.dataobj, float),
                                   template.brain_mask.affine, points, order=1) > 0.5
        brain &= data.min(axis=-1) > 0
        wm, csf = (
            _tissue(resample.sample_at(np.asarray(getattr(template, k).dataobj, float),
                                       template.t1w.affine, points, order=1), brain)
            for k in ("wm", "csf")
        )
        table = confounds.build_confounds(data, params, tr, brain_mask=brain, wm_mask=wm,
                                          csf_mask=csf, n_dummy=n_dummy, erosion=0)
    write_nifti(Path(f"{prefix}_desc-brain_mask.nii.gz"), [brain.astype(np.uint8)], affine,
                shape, "uint8")
    write_json(Path(f"{prefix}_desc-preproc_bold.json"), {
        "RepetitionTime": tr, "TaskName": meta.get("TaskName", task), "SkullStripped": False,
        "Sources": [f"bids:raw:{raw.relative_to(root).as_posix()}"],
        "Description": "Simulated fMRIPrep output: planted motion and true T1w->MNI map.",
    })
    conf = folder / f"{stem}_task-{task}_desc-confounds_timeseries.tsv"
    write_tsv(conf, table)
    write_json(conf.with_suffix(".json"), confounds.describe_confounds(list(table.columns)))
    return {"bold": Path(f"{prefix}_desc-preproc_bold.nii.gz"),
            "mask": Path(f"{prefix}_desc-brain_mask.nii.gz"), "confounds": conf}


def write_fmriprep(
    dataset: str | Path,
    out_dir: str | Path | None = None,
    *,
    subjects: Sequence[str] | None = None,
    sessions: Sequence[str] | None = None,
    space: str = DEFAULT_TEMPLATE,
) -> Path:
    """Write a simulated fMRIPrep folder for every (selected) BOLD run of a simulated dataset.

    ``out_dir`` defaults to ``<dataset>/derivatives/fmriprep``.  Returns the folder.
    """
    root = Path(dataset)
    out = Path(out_dir) if out_dir is not None else root / "derivatives" / "fmriprep"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "dataset_description.json", {
        "Name": "fMRIPrep outputs simulated from the planted truth (trajectome-simulate)",
        "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "trajectome-simulate",
                         "Description": "pipeline.simulate.fmriprep (not fMRIPrep)"}],
    })
    for bold in sorted(root.glob("sub-*/ses-*/func/sub-*_ses-*_task-*_bold.nii.gz")):
        sub = bold.parts[-4].removeprefix("sub-")
        ses = bold.parts[-3].removeprefix("ses-")
        if (subjects and sub not in subjects) or (sessions and ses not in sessions):
            continue
        task = bold.name.split("_task-")[1].split("_")[0]
        write_fmriprep_run(root, sub, ses, out, space=space, task=task)
    return out
