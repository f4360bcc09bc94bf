"""Oracle checks of faithfulness: what a pipeline that knows the truth recovers.

Used by the tests and to measure the simulator's quality; never by the workflows.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

ATLAS = "Seitzman300"


def labels_on_grid(dseg: nb.Nifti1Image, target: nb.Nifti1Image) -> np.ndarray:
    """Nearest-neighbour resampling of ``dseg`` onto ``target``'s grid (same world space)."""
    shape = target.shape[:3]
    ijk = np.indices(shape).reshape(3, -1).T
    world = ijk @ target.affine[:3, :3].T + target.affine[:3, 3]
    inv = np.linalg.inv(dseg.affine)
    src = np.rint(world @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    data = np.asarray(dseg.dataobj)
    ok = np.all((src >= 0) & (src < np.array(data.shape)), axis=1)
    out = np.zeros(len(src), data.dtype)
    out[ok] = data[tuple(src[ok].T)]
    return out.reshape(shape)


def oracle_fc(root: Path, sub: str, ses: str) -> tuple[float, np.ndarray, np.ndarray]:
    """FC from the BOLD averaged in the true parcels, nuisance regressed with the true signals.

    Drops non-steady-state and spike volumes and regresses the planted WM/CSF signals,
    motion parameters and a quadratic drift. Returns ``(r, oracle_fc, planted_fc)`` with
    ``r`` the correlation of their upper triangles over parcels seen in the BOLD grid.
    """
    stem = f"sub-{sub}_ses-{ses}"
    gt = root / "derivatives" / "groundtruth" / f"sub-{sub}" / f"ses-{ses}"
    bold = nb.load(root / f"sub-{sub}" / f"ses-{ses}" / "func" / f"{stem}_task-rest_bold.nii.gz")
    dseg = nb.load(gt / "anat" / f"{stem}_space-T1w_atlas-{ATLAS}_desc-planted_dseg.nii.gz")
    planted = pd.read_csv(gt / "func" / f"{stem}_task-rest_atlas-{ATLAS}_desc-planted_stat-"
                          "pearsoncorrelation_relmat.tsv", sep="\t", index_col=0).to_numpy()
    conf = pd.read_csv(gt / "func" / f"{stem}_task-rest_desc-planted_outliers.tsv", sep="\t")
    labels = labels_on_grid(dseg, bold).ravel()
    data = np.asarray(bold.dataobj, dtype=np.float32).reshape(-1, bold.shape[3])
    keep = (conf["spike"] == 0) & (conf["non_steady_state"] == 0)
    n_p = planted.shape[0]
    counts = np.bincount(labels, minlength=n_p + 1)[1:]
    sums = np.zeros((n_p + 1, data.shape[1]))
    np.add.at(sums, labels, data)
    present = counts > 0
    ts = (sums[1:][present] / counts[present, None]).T[keep.to_numpy()]
    t = np.linspace(-1, 1, len(ts))
    nuis = np.column_stack([np.ones(len(ts)), t, t**2,
                            conf.loc[keep, ["physio_wm", "physio_csf", "trans_x", "trans_y",
                                            "trans_z", "rot_x", "rot_y", "rot_z"]].to_numpy()])
    resid = ts - nuis @ np.linalg.lstsq(nuis, ts, rcond=None)[0]
    fc = np.corrcoef(resid.T)
    sub_planted = planted[np.ix_(present, present)]
    iu = np.triu_indices(present.sum(), 1)
    return float(np.corrcoef(fc[iu], sub_planted[iu])[0, 1]), fc, sub_planted


def fa_contrast(root: Path, sub: str, ses: str) -> tuple[float, float]:
    """Median DTI FA in planted bundle voxels and in grey matter outside bundles."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    stem = f"sub-{sub}_ses-{ses}"
    d = root / f"sub-{sub}" / f"ses-{ses}" / "dwi"
    gt = root / "derivatives" / "groundtruth" / f"sub-{sub}" / f"ses-{ses}"
    img = nb.load(d / f"{stem}_dwi.nii.gz")
    bvals = np.loadtxt(d / f"{stem}_dwi.bval")
    bvecs = np.loadtxt(d / f"{stem}_dwi.bvec")
    mask = np.asarray(nb.load(gt / "dwi" / f"{stem}_space-dwi_desc-bundles_mask.nii.gz")
                      .dataobj) > 0
    dseg = nb.load(gt / "anat" / f"{stem}_space-T1w_atlas-{ATLAS}_desc-planted_dseg.nii.gz")
    gm = (labels_on_grid(dseg, img) > 0) & ~mask
    data = np.asarray(img.dataobj, dtype=np.float32)
    fit = TensorModel(gradient_table(bvals, bvecs=bvecs.T)).fit(data[mask | gm])
    fa = np.zeros(mask.shape)
    fa[mask | gm] = np.nan_to_num(fit.fa)
    return float(np.median(fa[mask])), float(np.median(fa[gm]))
