"""Offline access to the MNI152 templates that nilearn ships in its wheel.

nilearn bundles the ICBM 2009a *symmetric* non-linear template (T1, grey- and
white-matter probability maps).  Everything here works without a network, so
the default path of the app never needs TemplateFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import nibabel as nb
import numpy as np

#: TemplateFlow identifier of the template nilearn ships.
DEFAULT_TEMPLATE = "MNI152NLin2009aSym"


@dataclass(frozen=True)
class TemplateImages:
    """The bundled template at one resolution.

    Attributes
    ----------
    name : str
        TemplateFlow identifier.
    resolution : int
        Isotropic voxel size in mm.
    t1w, gm, wm, csf, brain_mask : nibabel.Nifti1Image
        Skull-stripped T1w intensity, tissue probabilities (0-1) and the brain mask.
    """

    name: str
    resolution: int
    t1w: nb.Nifti1Image
    gm: nb.Nifti1Image
    wm: nb.Nifti1Image
    csf: nb.Nifti1Image
    brain_mask: nb.Nifti1Image


@lru_cache(maxsize=4)
def load_template(resolution: int = 2) -> TemplateImages:
    """Load nilearn's MNI152 2009 template at ``resolution`` mm (1 or 2 are native grids).

    CSF is not shipped; it is taken as what the brain mask holds beyond GM and WM,
    which puts the ventricles and sulcal CSF where they belong.
    """
    from nilearn import datasets

    t1w = datasets.load_mni152_template(resolution=resolution)
    gm = datasets.load_mni152_gm_template(resolution=resolution)
    wm = datasets.load_mni152_wm_template(resolution=resolution)
    mask = datasets.load_mni152_brain_mask(resolution=resolution)
    gm_data = np.clip(np.asarray(gm.dataobj, dtype=np.float32), 0, 1)
    wm_data = np.clip(np.asarray(wm.dataobj, dtype=np.float32), 0, 1)
    mask_data = np.asarray(mask.dataobj) > 0
    csf_data = np.where(mask_data, np.clip(1.0 - gm_data - wm_data, 0, 1), 0).astype(np.float32)

    def _img(data: np.ndarray) -> nb.Nifti1Image:
        img = nb.Nifti1Image(data, t1w.affine)
        img.header.set_xyzt_units("mm")
        return img

    return TemplateImages(
        name=DEFAULT_TEMPLATE,
        resolution=resolution,
        t1w=_img(np.asarray(t1w.dataobj, dtype=np.float32)),
        gm=_img(gm_data),
        wm=_img(wm_data),
        csf=_img(csf_data),
        brain_mask=_img(mask_data.astype(np.uint8)),
    )
