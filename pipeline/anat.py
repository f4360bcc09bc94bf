"""Per-session anatomical maths: bias correction, brain extraction, tissues, volumes.

No Nipype here.  Registration primitives live in :mod:`pipeline.registration`;
the bundled MNI template (:mod:`pipeline.templates`) is the only prior used, so
everything runs offline.

Volumes
-------
Two estimates of a parcel's native-space volume are provided:

* **label counts** (:func:`label_volumes`): the atlas is brought to the native
  T1w with nearest-neighbour interpolation and voxels are counted;
* **Jacobian integration** (:func:`jacobian_volumes`): the parcel is defined
  once on the subject template and the Jacobian determinant of each session's
  template -> native map is summed over it.  Every session shares the same
  parcel, so no voxel-boundary quantisation enters the session differences.

The tests plant a +5 % hippocampal expansion on a 3 mm grid and measure both;
Jacobian integration is the recommended estimate for longitudinal change (see
``tests/test_anat.py``; ``tests/test_anat_groundtruth.py`` and ``bench/bench_anat.py``
score it against the simulator's planted volumes on 2 mm data).  Total
intracranial volume (TICV) is the brain-mask volume (GM + WM + CSF inside the
mask, which is the same thing as the mask holds every tissue).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
from scipy import ndimage

from pipeline.registration import (
    DEFAULT_SEED,
    Transform,
    _as_image,
    ants_threads,
    apply_transform,
    from_ants,
    get_settings,
    jacobian_determinant,
    register,
    to_ants,
)
from pipeline.templates import load_template

#: Tissue classes in BIDS ``dseg`` order (label = position + 1).
TISSUES = ("GM", "WM", "CSF")

#: Structures reported explicitly: (output column, atlas ``anatomy`` value, hemisphere).
STRUCTURES = (
    ("hippocampus_L", "hippocampus", "L"),
    ("hippocampus_R", "hippocampus", "R"),
    ("amygdala_L", "amygdala", "L"),
    ("amygdala_R", "amygdala", "R"),
)


def _voxel_volume(img: nb.Nifti1Image) -> float:
    return float(abs(np.linalg.det(img.affine[:3, :3])))


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (maximises the between-class variance)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between))])


def head_mask(t1w: nb.Nifti1Image) -> nb.Nifti1Image:
    """Foreground (head) mask: Otsu threshold, largest component, holes filled."""
    data = np.asarray(t1w.dataobj, dtype=np.float32)
    positive = data[data > 0]
    if positive.size == 0:
        raise ValueError(f"{t1w.get_filename() or 'T1w'}: image is empty (no positive voxel).")
    mask = data > otsu_threshold(positive)
    mask = _largest_component(ndimage.binary_closing(mask, iterations=2))
    mask = ndimage.binary_fill_holes(mask)
    return nb.Nifti1Image(mask.astype(np.uint8), t1w.affine)


def coarse_copy(img: nb.Nifti1Image, resolution: float) -> nb.Nifti1Image:
    """``img`` on a grid of ``resolution`` mm voxels over the same field of view.

    Returned unchanged when no axis is finer than ``resolution``.  Otherwise Gaussian
    pre-smoothing (FWHM^2 = target^2 - source^2 per axis, against aliasing) and linear
    interpolation; the grid keeps the image's orientation.
    """
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if np.all(zooms >= resolution - 1e-3):
        return img
    target = np.maximum(zooms, resolution)
    sigma_vox = np.sqrt(np.maximum(target**2 - zooms**2, 0.0)) / 2.3548 / zooms
    data = ndimage.gaussian_filter(np.asarray(img.dataobj, dtype=np.float32), sigma_vox)
    scale = target / zooms
    shape = np.ceil(np.asarray(img.shape[:3]) / scale).astype(int)
    affine = img.affine.copy()
    affine[:3, :3] = img.affine[:3, :3] * scale
    # voxel centres of the coarse grid sit at the centre of each block of fine voxels
    affine[:3, 3] = img.affine[:3, :3] @ ((scale - 1) / 2) + img.affine[:3, 3]
    coords = (np.indices(shape, dtype=np.float32).reshape(3, -1).T * scale
              + (scale - 1) / 2).T
    out = ndimage.map_coordinates(data, coords, order=1, mode="nearest")
    coarse = nb.Nifti1Image(out.reshape(shape).astype(np.float32), affine)
    coarse.header.set_xyzt_units("mm")
    return coarse


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)


# --------------------------------------------------------------------------- N4


def n4_bias_correction(
    t1w: nb.Nifti1Image | str | os.PathLike,
    mask: nb.Nifti1Image | None = None,
    *,
    settings: str | dict = "default",
    n_threads: int | None = 1,
) -> tuple[nb.Nifti1Image, nb.Nifti1Image]:
    """N4 bias-field correction.

    Parameters
    ----------
    t1w : nibabel image or path
        Raw T1w (any positive scale).
    mask : nibabel image, optional
        Where to fit the field; the Otsu head mask when omitted (fitting on the
        background would model noise).
    settings : str or dict
        :data:`pipeline.registration.REGISTRATION_SETTINGS` key; uses its ``"n4"`` entry.
    n_threads : int, optional

    Returns
    -------
    corrected, bias_field : nibabel.Nifti1Image
        ``corrected = t1w / bias_field`` (float32); the field is multiplicative.
    """
    import ants

    img = _as_image(t1w)
    conf = get_settings(settings)["n4"]
    data = np.asarray(img.dataobj, dtype=np.float32)
    if not np.isfinite(data).all():
        raise ValueError(f"{img.get_filename() or 'T1w'}: image holds NaN/inf; fix the input.")
    # N4 works in log space, so intensities must be strictly positive
    floor = max(float(np.percentile(data[data > 0], 1)) * 1e-3, 1e-3) if (data > 0).any() else 1
    clean = nb.Nifti1Image(np.maximum(data, floor), img.affine)
    fit_mask = mask if mask is not None else head_mask(clean)
    with ants_threads(n_threads):
        field = ants.n4_bias_field_correction(
            to_ants(clean),
            mask=to_ants(fit_mask),
            shrink_factor=int(conf["shrink"]),
            convergence={"iters": list(conf["iterations"]), "tol": 1e-7},
            spline_param=int(conf["spline_mm"]),
            return_bias_field=True,
        )
    bias = from_ants(field, dtype=np.float32)
    bias_data = np.asarray(bias.dataobj)
    corrected = np.where(data > 0, data / np.maximum(bias_data, 1e-6), 0).astype(np.float32)
    return nb.Nifti1Image(corrected, img.affine), nb.Nifti1Image(bias_data, img.affine)


# --------------------------------------------------------------------------- brain extraction


@dataclass(frozen=True)
class BrainExtraction:
    """Result of :func:`brain_extraction`.

    Attributes
    ----------
    mask : nibabel.Nifti1Image
        Binary brain mask on the T1w grid (uint8).
    brain : nibabel.Nifti1Image
        T1w times the mask.
    template_to_native : Transform
        MNI template space -> native T1w (resamples template images onto the T1w).
    """

    mask: nb.Nifti1Image
    brain: nb.Nifti1Image
    template_to_native: Transform


def brain_extraction(
    t1w: nb.Nifti1Image | str | os.PathLike,
    *,
    resolution: int = 2,
    settings: str | dict = "default",
    work_dir: str | os.PathLike | None = None,
    seed: int = DEFAULT_SEED,
    n_threads: int | None = 1,
) -> BrainExtraction:
    """Template-based brain extraction without downloaded templates.

    Registrations run on a copy of the T1w at the template's resolution
    (:func:`coarse_copy`); only the final mask is resampled onto the native grid.

    1. Rigid + affine registration of the bundled skull-stripped MNI T1w to the
       (bias-corrected) head, restricted to the Otsu head mask.
    2. SyN (the preset's ``syn_brain`` stage when it has one), with the metric restricted
       to the affinely-mapped brain mask dilated by ~1 cm, so the skull and scalp do not
       pull the brain outline.
    3. The warped template brain mask (linear interpolation, > 0.5), holes filled,
       largest component kept.

    Parameters
    ----------
    t1w : nibabel image or path
        Bias-corrected T1w with skull.
    resolution : int
        Resolution (mm) of the bundled template used as prior.
    settings : str or dict
        Registration preset (``"default"`` / ``"sloppy"``).
    work_dir : path, optional
        Where transforms are written.
    seed, n_threads : int
        Determinism controls.

    Returns
    -------
    BrainExtraction
    """
    img = _as_image(t1w)
    template = load_template(resolution)
    work = Path(work_dir) if work_dir is not None else None
    conf = dict(get_settings(settings))
    conf["syn"] = conf.get("syn_brain", conf["syn"])
    # the prior is a `resolution` mm mask, so registering on a finer grid buys no accuracy:
    # at 1 mm, SyN on the native grid cost ~40 CPU-minutes per session, on a 2 mm copy ~2
    coarse = coarse_copy(img, resolution)
    head = head_mask(coarse)
    common = dict(settings=conf, work_dir=work, seed=seed, n_threads=n_threads,
                  source=template.name, target="T1w")
    linear, _ = register(coarse, template.t1w, stages=("rigid", "affine"), fixed_mask=head,
                         prefix="bet_affine_", **common)
    prior = np.asarray(apply_transform(template.brain_mask, linear, coarse,
                                       n_threads=n_threads).dataobj) > 0.5
    zoom = min(coarse.header.get_zooms()[:3])
    metric_mask = ndimage.binary_dilation(prior, iterations=max(1, round(10 / zoom)))
    warp, _ = register(coarse, template.t1w, stages=("syn",), initial=linear,
                       fixed_mask=nb.Nifti1Image(metric_mask.astype(np.uint8), coarse.affine),
                       prefix="bet_syn_", **common)
    warped = np.asarray(apply_transform(template.brain_mask, warp, img,
                                        n_threads=n_threads).dataobj)
    mask = ndimage.binary_fill_holes(_largest_component(warped > 0.5))
    data = np.asarray(img.dataobj, dtype=np.float32)
    mask_img = nb.Nifti1Image(mask.astype(np.uint8), img.affine)
    brain = nb.Nifti1Image(np.where(mask, data, 0).astype(np.float32), img.affine)
    return BrainExtraction(mask_img, brain, warp)


# --------------------------------------------------------------------------- segmentation


def warp_tissue_priors(
    template_to_native: Transform,
    reference: nb.Nifti1Image,
    *,
    resolution: int = 2,
    n_threads: int | None = 1,
) -> dict[str, nb.Nifti1Image]:
    """GM/WM/CSF probabilities of the bundled template resampled onto the native grid."""
    template = load_template(resolution)
    maps = {"GM": template.gm, "WM": template.wm, "CSF": template.csf}
    return {
        name: apply_transform(img, template_to_native, reference, n_threads=n_threads)
        for name, img in maps.items()
    }


def segment_tissues(
    t1w: nb.Nifti1Image | str | os.PathLike,
    mask: nb.Nifti1Image | str | os.PathLike,
    priors: dict[str, nb.Nifti1Image],
    *,
    prior_weight: float = 0.5,
    n_iter: int = 30,
    tol: float = 1e-5,
) -> dict[str, nb.Nifti1Image]:
    """Gaussian-mixture tissue segmentation with spatial priors (deterministic EM).

    Within the brain mask, each tissue ``k`` has a Gaussian intensity model and the
    posterior is ``p_k(x) ∝ ((1 - w) / K + w * prior_k(x)) * N(I(x); mu_k, sigma_k)``
    with ``w = prior_weight``.  Initialised from the prior-weighted moments, so the
    result depends on nothing random.

    Parameters
    ----------
    t1w : nibabel image or path
        Bias-corrected T1w.
    mask : nibabel image or path
        Brain mask.
    priors : dict
        ``{"GM": img, "WM": img, "CSF": img}`` probabilities on the T1w grid
        (see :func:`warp_tissue_priors`).
    prior_weight : float
        Trust in the priors, 0 (intensity only) to 1.
    n_iter : int
        Maximum EM iterations.
    tol : float
        Stop when the mean absolute posterior change falls below this.

    Returns
    -------
    dict
        ``"GM"``, ``"WM"``, ``"CSF"`` probability maps (float32, 0 outside the mask)
        and ``"dseg"`` (uint8: 1 GM, 2 WM, 3 CSF, 0 background).
    """
    img = _as_image(t1w)
    inside = np.asarray(_as_image(mask).dataobj) > 0
    if not inside.any():
        raise ValueError("segment_tissues: the brain mask is empty.")
    missing = [t for t in TISSUES if t not in priors]
    if missing:
        raise ValueError(f"segment_tissues: priors lack {missing}; give GM, WM and CSF maps.")
    values = np.asarray(img.dataobj, dtype=np.float64)[inside]
    prior = np.stack([np.clip(np.asarray(priors[t].dataobj, float)[inside], 0, 1)
                      for t in TISSUES], 1)
    prior = prior + 1e-6
    prior /= prior.sum(1, keepdims=True)
    spatial = (1 - prior_weight) / len(TISSUES) + prior_weight * prior
    post = prior.copy()
    for _ in range(n_iter):
        weight = post.sum(0)
        mu = (post * values[:, None]).sum(0) / weight
        var = (post * (values[:, None] - mu) ** 2).sum(0) / weight
        sd = np.sqrt(np.maximum(var, 1e-6 * values.var() + 1e-12))
        loglik = -0.5 * ((values[:, None] - mu) / sd) ** 2 - np.log(sd)
        logp = np.log(spatial) + loglik
        logp -= logp.max(1, keepdims=True)
        new = np.exp(logp)
        new /= new.sum(1, keepdims=True)
        change = float(np.abs(new - post).mean())
        post = new
        if change < tol:
            break
    out: dict[str, nb.Nifti1Image] = {}
    for k, tissue in enumerate(TISSUES):
        vol = np.zeros(inside.shape, np.float32)
        vol[inside] = post[:, k]
        out[tissue] = nb.Nifti1Image(vol, img.affine)
    dseg = np.zeros(inside.shape, np.uint8)
    dseg[inside] = np.argmax(post, 1) + 1
    out["dseg"] = nb.Nifti1Image(dseg, img.affine)
    return out


# --------------------------------------------------------------------------- volumes


def label_volumes(labels: nb.Nifti1Image, table: pd.DataFrame) -> pd.DataFrame:
    """Volume (mm3) of every parcel of ``table`` in a label image (voxel counts).

    Returns a frame with ``index, name, volume_mm3`` in table order (0 for absent labels).
    """
    data = np.asarray(labels.dataobj).astype(np.int64).ravel()
    counts = np.bincount(data[data > 0], minlength=int(table["index"].max()) + 1)
    idx = table["index"].to_numpy(int)
    return pd.DataFrame({
        "index": idx,
        "name": table["name"].to_numpy(),
        "volume_mm3": counts[idx] * _voxel_volume(labels),
    })


def jacobian_volumes(
    labels: nb.Nifti1Image, jacobian: nb.Nifti1Image, table: pd.DataFrame
) -> pd.DataFrame:
    """Native volume (mm3) of parcels defined on a reference grid, by Jacobian integration.

    ``labels`` and ``jacobian`` share the reference (template) grid; ``jacobian`` is
    the determinant of the reference -> native point map
    (:func:`pipeline.registration.jacobian_determinant`).
    """
    if labels.shape[:3] != jacobian.shape[:3] or not np.allclose(labels.affine, jacobian.affine,
                                                                 atol=1e-4):
        raise ValueError("jacobian_volumes: labels and Jacobian must share one grid.")
    data = np.asarray(labels.dataobj).astype(np.int64).ravel()
    det = np.asarray(jacobian.dataobj, dtype=np.float64).ravel()
    inside = data > 0
    n = int(table["index"].max()) + 1
    sums = np.bincount(data[inside], weights=det[inside], minlength=n)
    idx = table["index"].to_numpy(int)
    return pd.DataFrame({
        "index": idx,
        "name": table["name"].to_numpy(),
        "volume_mm3": sums[idx] * _voxel_volume(labels),
    })


def session_jacobian_volumes(
    labels_in_template: nb.Nifti1Image,
    session_to_template: Transform,
    table: pd.DataFrame,
    work_dir: str | os.PathLike,
    *,
    n_threads: int | None = 1,
) -> pd.DataFrame:
    """Parcel volumes in one session's native space from its transform to the template."""
    jac = jacobian_determinant(session_to_template, labels_in_template, work_dir,
                               n_threads=n_threads)
    return jacobian_volumes(labels_in_template, jac, table)


#: Fewest parcels for a noise-floor estimate (:func:`jacobian_volume_se`).
MIN_PARCELS_FOR_SE = 20


def jacobian_volume_se(
    volumes: pd.DataFrame, reference: pd.DataFrame, table: pd.DataFrame
) -> dict[str, float]:
    """Measurement error (mm3) of one session's Jacobian volumes, from its registration.

    The parcels are defined on the subject template, so ``reference`` (their template
    volumes) is what each session's warp rescales.  Across parcels, the log ratio
    ``e_p = log(V_p / T_p)`` of a session is mostly registration noise, whose relative
    size falls as ``1 / sqrt(T_p)`` (more voxels average it out).  The noise floor
    ``k`` is the robust spread (1.4826 x median absolute deviation) of
    ``(e_p - median(e)) * sqrt(T_p)``, so a few truly changing parcels (a hippocampus
    after ECT) barely move it, nor does a global rescaling.  Then
    ``se_p = V_p * k / sqrt(T_p)``; hippocampus and amygdala (sums of parcels) add their
    parcels' errors in quadrature, i.e. parcel errors are taken as independent.

    Parameters
    ----------
    volumes : pandas.DataFrame
        ``index, volume_mm3`` of the session (:func:`jacobian_volumes`).
    reference : pandas.DataFrame
        ``index, volume_mm3`` of the same parcels on the template (:func:`label_volumes`).
    table : pandas.DataFrame
        Atlas table; ``anatomy`` and ``hemisphere`` give the structure errors.

    Returns
    -------
    dict
        Parcel name -> se (mm3), and the :data:`STRUCTURES` columns when the table has
        ``anatomy`` and ``hemisphere``.  Empty when fewer than
        :data:`MIN_PARCELS_FOR_SE` parcels have a volume on both sides.
    """
    merged = volumes[["index", "volume_mm3"]].merge(
        reference[["index", "volume_mm3"]], on="index", suffixes=("", "_reference"))
    merged = merged.merge(table[["index", "name"]], on="index")
    used = merged[(merged["volume_mm3"] > 0) & (merged["volume_mm3_reference"] > 0)]
    if len(used) < MIN_PARCELS_FOR_SE:
        return {}
    v = used["volume_mm3"].to_numpy(float)
    t = used["volume_mm3_reference"].to_numpy(float)
    e = np.log(v / t)
    k = 1.4826 * float(np.median(np.abs(e - np.median(e)) * np.sqrt(t)))
    se = v * k / np.sqrt(t)
    out = dict(zip(used["name"], se, strict=True))
    if {"anatomy", "hemisphere"} <= set(table.columns):
        by_index = dict(zip(used["index"], se, strict=True))
        for column, parts in _structure_parcels(table).items():
            if len(parts) and all(i in by_index for i in parts):
                out[column] = float(np.sqrt(sum(by_index[i] ** 2 for i in parts)))
    return out


def _structure_parcels(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """Atlas indices making up each of :data:`STRUCTURES` (by ``anatomy`` and ``hemisphere``)."""
    return {column: table.loc[(table["anatomy"] == anatomy) & (table["hemisphere"] == hemi),
                              "index"].to_numpy()
            for column, anatomy, hemi in STRUCTURES}


def structure_volumes(volumes: pd.DataFrame, table: pd.DataFrame) -> dict[str, float]:
    """Sum parcel volumes into left/right hippocampus and amygdala.

    ``table`` needs ``anatomy`` and ``hemisphere`` columns (the default atlas has
    them; several Seitzman ROIs make up each hippocampus, hence the sum).
    """
    missing = [c for c in ("anatomy", "hemisphere") if c not in table.columns]
    if missing:
        raise ValueError(
            f"atlas table lacks {missing}; hippocampus/amygdala volumes need the "
            "'anatomy' and 'hemisphere' columns (as in the default Seitzman300 atlas)."
        )
    return {column: float(volumes.loc[volumes["index"].isin(parts), "volume_mm3"].sum())
            for column, parts in _structure_parcels(table).items()}


def tissue_volumes(
    mask: nb.Nifti1Image, tissues: dict[str, nb.Nifti1Image] | None = None
) -> dict[str, float]:
    """TICV (brain-mask volume, mm3) and, given probabilities, GM/WM/CSF volumes."""
    vox = _voxel_volume(mask)
    inside = np.asarray(mask.dataobj) > 0
    out = {"TICV": float(inside.sum() * vox)}
    for tissue in TISSUES if tissues is not None else ():
        out[tissue] = float(np.asarray(tissues[tissue].dataobj, float)[inside].sum() * vox)
    return out


def regional_volumes(
    volumes: pd.DataFrame, table: pd.DataFrame, mask: nb.Nifti1Image,
    tissues: dict[str, nb.Nifti1Image] | None = None,
) -> pd.DataFrame:
    """One session's volume table: every parcel, then hippocampus/amygdala L/R, TICV, tissues.

    Returns a long frame ``region, volume_mm3`` (parcel rows use the atlas names).
    """
    rows = list(zip(volumes["name"], volumes["volume_mm3"], strict=True))
    rows += list(structure_volumes(volumes, table).items())
    rows += list(tissue_volumes(mask, tissues).items())
    return pd.DataFrame(rows, columns=["region", "volume_mm3"])
