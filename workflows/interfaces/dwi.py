"""Interfaces of the diffusion workflow; each reads files, calls ``pipeline`` and writes files.

Spaces: the DWI stays on its acquired grid (``space-dwi``: preprocessed series, DTI maps,
FODs, tissue maps resampled onto it).  Streamlines are tracked there and then mapped
with the rigid DWI -> T1w transform into native T1w world coordinates, where their end
points are assigned to the native atlas at its full resolution (``space-T1w`` connectomes
and tractogram).  The rigid map leaves lengths unchanged and FA is sampled on the DWI grid
before mapping.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import nibabel as nb
import numpy as np
import pandas as pd
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from pipeline import connectome, dwi, models, registration, tractography
from pipeline.derivatives import write_tsv

LOGGER = logging.getLogger("nipype.interface")

#: Output measures: BIDS ``stat`` label -> :data:`pipeline.connectome.MEASURES` key.
STATISTICS = {
    "streamlinecount": "count",
    "volumenormalizedcount": "count_invnodevol",
    "meanlength": "mean_length",
    "meanfa": "mean_fa",
}

#: Rigid per-volume motion correction settings (DIPY affine_registration levels).
MOTION_SETTINGS = {
    "default": {"level_iters": (200, 100, 50), "sigmas": (2.0, 1.0, 0.0), "factors": (4, 2, 1)},
    "sloppy": {"level_iters": (50, 25), "sigmas": (1.0, 0.0), "factors": (2, 1)},
}

#: ITK's LPS world <-> nibabel's RAS world (its own inverse).
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --------------------------------------------------------------------------- file helpers


def _save(data: np.ndarray, affine: np.ndarray, cwd: str, name: str) -> str:
    path = str(Path(cwd) / name)
    img = nb.Nifti1Image(np.asarray(data), affine)
    img.header.set_xyzt_units("mm")
    nb.save(img, path)
    return path


def read_gradients(bval: str, bvec: str) -> tuple[np.ndarray, np.ndarray]:
    """b-values ``(N,)`` and b-vectors ``(N, 3)`` from FSL text files."""
    from pipeline.inputs import read_gradients as _read

    return _read(bval, bvec)


def write_gradients(bvals: np.ndarray, bvecs: np.ndarray, cwd: str, stem: str) -> tuple[str, str]:
    """Write FSL ``.bval``/``.bvec`` (3 rows) files; returns their paths."""
    bval_path, bvec_path = Path(cwd) / f"{stem}.bval", Path(cwd) / f"{stem}.bvec"
    bval_path.write_text(" ".join(f"{b:g}" for b in np.asarray(bvals, float)) + "\n")
    bvec_path.write_text(
        "\n".join(" ".join(f"{v:.8f}" for v in row) for row in np.asarray(bvecs, float).T)
        + "\n"
    )
    return str(bval_path), str(bvec_path)


def dwi_to_t1w_matrix(transform: registration.Transform) -> np.ndarray:
    """4x4 RAS point map DWI world -> T1w world of a rigid DWI -> T1w :class:`Transform`.

    ANTs stores the T1w -> DWI point map in LPS (what :func:`transform_affine` returns);
    conjugating by the LPS flip gives it in RAS, and its inverse maps DWI points to T1w.
    """
    t1w_to_dwi_lps = registration.transform_affine(transform)
    return np.linalg.inv(_LPS @ t1w_to_dwi_lps @ _LPS)


def map_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 4x4 point map to ``(n, 3)`` points."""
    return (np.asarray(points, np.float64) @ matrix[:3, :3].T + matrix[:3, 3]).astype(np.float32)


# --------------------------------------------------------------------------- preprocessing


class _PreprocessInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="raw DWI run")
    bval = File(exists=True, mandatory=True)
    bvec = File(exists=True, mandatory=True)
    denoise_method = traits.Enum(*dwi.DENOISE_METHODS, usedefault=True)
    unring = traits.Bool(True, usedefault=True)
    settings = traits.Enum("default", "sloppy", usedefault=True)


class _PreprocessOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="denoised, unringed, motion-corrected DWI (float32)")
    bval = File(exists=True)
    bvec = File(exists=True, desc="b-vectors rotated with the motion")
    mask = File(exists=True, desc="brain mask of the corrected run")
    motion = File(exists=True, desc="per-volume rigid parameters and FD (TSV)")
    info = traits.Dict(desc="denoising details")


class PreprocessDwiRun(SimpleInterface):
    """MP-PCA denoising, Gibbs unringing and motion correction (b-vectors rotated) of a run."""

    input_spec = _PreprocessInputSpec
    output_spec = _PreprocessOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        img = nb.load(spec.in_file)
        data = np.asarray(img.get_fdata(dtype=np.float32))
        bvals, bvecs = read_gradients(spec.bval, spec.bvec)
        if data.ndim != 4 or data.shape[3] != len(bvals):
            raise ValueError(
                f"{spec.in_file}: shape {data.shape} does not match the {len(bvals)} b-values of "
                f"{spec.bval}; the gradient files must belong to this run"
            )
        mask = dwi.brain_mask(data, bvals)
        # Denoising first: MP-PCA assumes the raw noise distribution, before any resampling.
        data, info = dwi.denoise(data, bvals, method=spec.denoise_method, mask=mask)
        if spec.unring:
            data = dwi.unring(data)
        motion = dwi.motion_correct(
            # DIPY's registration rejects boolean masks (no fused signature): pass integers
            data, img.affine, bvals, bvecs, mask=mask.astype(np.int32),
            **MOTION_SETTINGS[spec.settings],
        )
        out = self._results
        out["out_file"] = _save(motion.data, img.affine, runtime.cwd, "dwi_preproc.nii.gz")
        out["bval"], out["bvec"] = write_gradients(bvals, motion.bvecs, runtime.cwd, "dwi_preproc")
        mask = dwi.brain_mask(motion.data, bvals)
        out["mask"] = _save(mask.astype(np.uint8), img.affine, runtime.cwd, "dwi_mask.nii.gz")
        motion_tsv = Path(runtime.cwd) / "motion.tsv"
        write_tsv(motion_tsv, motion.parameters)
        out["motion"] = str(motion_tsv)
        out["info"] = {**info, "unring": bool(spec.unring)}
        return runtime


class _ConcatInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True)
    bvals = InputMultiObject(File(exists=True), mandatory=True)
    bvecs = InputMultiObject(File(exists=True), mandatory=True)
    motion = InputMultiObject(File(exists=True), desc="per-run motion tables")


class _ConcatOutputSpec(TraitedSpec):
    out_file = File(exists=True)
    bval = File(exists=True)
    bvec = File(exists=True)
    mask = File(exists=True)
    b0 = File(exists=True, desc="mean b=0 image (registration reference)")
    motion = File(exists=True, desc="motion tables stacked, with a 'run' column")


class ConcatenateDwi(SimpleInterface):
    """Concatenate corrected runs (b=0 intensities matched), brain mask and mean b=0."""

    input_spec = _ConcatInputSpec
    output_spec = _ConcatOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        runs, affine = [], None
        for path, bval, bvec in zip(spec.in_files, spec.bvals, spec.bvecs, strict=True):
            img = nb.load(path)
            affine = img.affine
            runs.append((np.asarray(img.dataobj, np.float32), img.affine,
                         *read_gradients(bval, bvec)))
        joined = dwi.concatenate_runs(runs, names=list(spec.in_files))
        out = self._results
        out["out_file"] = _save(joined.data, affine, runtime.cwd, "dwi_concat.nii.gz")
        out["bval"], out["bvec"] = write_gradients(
            joined.bvals, joined.bvecs, runtime.cwd, "dwi_concat"
        )
        mask = dwi.brain_mask(joined.data, joined.bvals)
        out["mask"] = _save(mask.astype(np.uint8), affine, runtime.cwd, "dwi_mask.nii.gz")
        b0 = joined.data[..., dwi.b0_mask(joined.bvals)].mean(axis=3)
        out["b0"] = _save(b0.astype(np.float32), affine, runtime.cwd, "dwi_b0.nii.gz")
        if isdefined(spec.motion) and spec.motion:
            tables = [
                pd.read_csv(p, sep="\t").assign(run=i + 1) for i, p in enumerate(spec.motion)
            ]
            motion_tsv = Path(runtime.cwd) / "motion.tsv"
            write_tsv(motion_tsv, pd.concat(tables, ignore_index=True))
            out["motion"] = str(motion_tsv)
        return runtime


class _QsiprepInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="QSIPrep preprocessed DWI")
    bval = File(exists=True, mandatory=True)
    bvec = File(exists=True, mandatory=True)
    mask = File(exists=True, desc="QSIPrep brain mask; computed from the b=0s when absent")
    confounds = File(exists=True, desc="QSIPrep confounds TSV (framewise_displacement)")


class LoadQsiprep(SimpleInterface):
    """Take QSIPrep's preprocessed DWI as it is; derive only the mean b=0 (and a mask)."""

    input_spec = _QsiprepInputSpec
    output_spec = _ConcatOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        img = nb.load(spec.in_file)
        data = np.asarray(img.dataobj, np.float32)
        bvals, _ = read_gradients(spec.bval, spec.bvec)
        if data.ndim != 4 or data.shape[3] != len(bvals):
            raise ValueError(
                f"{spec.in_file}: shape {data.shape} does not match the {len(bvals)} b-values of "
                f"{spec.bval}; the QSIPrep outputs do not belong together"
            )
        out = self._results
        out["out_file"], out["bval"], out["bvec"] = spec.in_file, spec.bval, spec.bvec
        if isdefined(spec.mask):
            out["mask"] = spec.mask
        else:
            mask = dwi.brain_mask(data, bvals)
            out["mask"] = _save(mask.astype(np.uint8), img.affine, runtime.cwd, "dwi_mask.nii.gz")
        b0 = data[..., dwi.b0_mask(bvals)].mean(axis=3)
        out["b0"] = _save(b0.astype(np.float32), img.affine, runtime.cwd, "dwi_b0.nii.gz")
        table = pd.DataFrame({"framewise_displacement": np.zeros(len(bvals))})
        if isdefined(spec.confounds):
            conf = pd.read_csv(spec.confounds, sep="\t")
            if "framewise_displacement" in conf:
                table = conf[["framewise_displacement"]].fillna(0.0)
        motion_tsv = Path(runtime.cwd) / "motion.tsv"
        write_tsv(motion_tsv, table.assign(run=1))
        out["motion"] = str(motion_tsv)
        return runtime


# --------------------------------------------------------------------------- registration


class _RegisterInputSpec(BaseInterfaceInputSpec):
    b0 = File(exists=True, mandatory=True, desc="mean b=0 (moving)")
    dwi_mask = File(exists=True, mandatory=True)
    t1w = File(exists=True, mandatory=True, desc="preprocessed T1w (fixed)")
    t1w_mask = File(exists=True, mandatory=True)
    gm = File(exists=True, mandatory=True)
    wm = File(exists=True, mandatory=True)
    csf = File(exists=True, mandatory=True)
    settings = traits.Enum("default", "sloppy", usedefault=True)
    seed = traits.Int(registration.DEFAULT_SEED, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _RegisterOutputSpec(TraitedSpec):
    transform = File(exists=True, desc="DWI -> T1w Transform JSON (names work-dir files)")
    itk_file = File(exists=True, desc="the same rigid transform as self-contained ITK text")
    dwi_to_t1w = File(exists=True, desc="4x4 RAS point map DWI world -> T1w world (text)")
    gm = File(exists=True, desc="GM probability on the DWI grid")
    wm = File(exists=True)
    csf = File(exists=True)
    b0_t1w = File(exists=True, desc="mean b=0 on the T1w grid (QC)")
    summary = traits.Dict(desc="rigid parameters")


class RegisterDwiToT1w(SimpleInterface):
    """Rigid b=0 -> T1w registration (ANTs, mutual information); tissues onto the DWI grid.

    DWI and T1w of a session share the scanner space, so the registration starts from the
    identity (the headers) rather than from the centres of mass of different fields of view.
    """

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        transform, warped = registration.register(
            spec.t1w, spec.b0, stages=("rigid",),
            fixed_mask=nb.load(spec.t1w_mask), moving_mask=nb.load(spec.dwi_mask),
            initial="identity", settings=spec.settings, work_dir=runtime.cwd,
            prefix="dwi_to_t1w_", seed=spec.seed, n_threads=spec.num_threads,
            source="dwi", target="T1w",
        )
        out = self._results
        out["transform"] = str(
            registration.save_transform(transform, Path(runtime.cwd) / "dwi_to_t1w.json")
        )
        itk = Path(runtime.cwd) / "dwi_to_t1w_xfm.txt"
        itk.write_text(registration.itk_affine_text(registration.transform_affine(transform)))
        out["itk_file"] = str(itk)
        matrix = dwi_to_t1w_matrix(transform)
        np.savetxt(Path(runtime.cwd) / "dwi_to_t1w.txt", matrix)
        out["dwi_to_t1w"] = str(Path(runtime.cwd) / "dwi_to_t1w.txt")
        out["b0_t1w"] = str(Path(runtime.cwd) / "b0_t1w.nii.gz")
        nb.save(warped, out["b0_t1w"])
        to_dwi = transform.inverted()
        for tissue in ("gm", "wm", "csf"):
            img = registration.apply_transform(
                getattr(spec, tissue), to_dwi, spec.b0, n_threads=spec.num_threads
            )
            data = np.clip(np.asarray(img.dataobj, np.float32), 0, 1)
            out[tissue] = _save(data, nb.load(spec.b0).affine, runtime.cwd, f"{tissue}_dwi.nii.gz")
        params = dwi._rigid_parameters(matrix)
        out["summary"] = dict(zip(
            ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"), params, strict=True
        ))
        return runtime


# --------------------------------------------------------------------------- models


class _ModelInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    bval = File(exists=True, mandatory=True)
    bvec = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)
    gm = File(exists=True, mandatory=True, desc="tissue maps on the DWI grid")
    wm = File(exists=True, mandatory=True)
    csf = File(exists=True, mandatory=True)
    fod_model = traits.Either(None, traits.Enum(*models.FOD_MODELS), usedefault=True,
                              desc="override of the automatic model choice")


class _ModelOutputSpec(TraitedSpec):
    fa = File(exists=True)
    md = File(exists=True)
    fod = File(exists=True, desc="FOD SH coefficients (DIPY descoteaux07)")
    model = traits.Dict(desc="model choice, reason and response")


class FitDiffusionModels(SimpleInterface):
    """DTI maps (FA, MD) and the fibre-orientation model picked by ``choose_model``."""

    input_spec = _ModelInputSpec
    output_spec = _ModelOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        img = nb.load(spec.in_file)
        data = np.asarray(img.dataobj, np.float32)
        bvals, bvecs = read_gradients(spec.bval, spec.bvec)
        gtab = models.make_gtab(bvals, bvecs)
        mask = np.asarray(nb.load(spec.mask).dataobj) > 0
        tissues = {t: np.asarray(nb.load(getattr(spec, t)).dataobj, np.float32)
                   for t in ("gm", "wm", "csf")}
        dti = models.fit_dti(data, gtab, mask)
        acquisition = models.summarize_acquisition(bvals, bvecs)
        choice = models.choose_model(acquisition, tissue_maps=True, override=spec.fod_model)
        LOGGER.info("fibre model %s (SH order %d): %s", choice.model, choice.sh_order,
                    choice.reason)
        fod = models.fit_fod(data, gtab, mask, choice, fa=dti.fa, **tissues)
        out = self._results
        out["fa"] = _save(dti.fa.astype(np.float32), img.affine, runtime.cwd, "fa.nii.gz")
        out["md"] = _save(dti.md.astype(np.float32), img.affine, runtime.cwd, "md.nii.gz")
        out["fod"] = _save(fod.sh.astype(np.float32), img.affine, runtime.cwd, "fod.nii.gz")
        out["model"] = {**choice.as_dict(), "response": fod.response}
        return runtime


class _OutlierInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    bval = File(exists=True, mandatory=True)
    bvec = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)


class _OutlierOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="per volume/slice residuals (TSV)")
    summary = traits.Dict()


class DetectOutliers(SimpleInterface):
    """Signal-dropout slices and volumes against a robust tensor prediction (QC only)."""

    input_spec = _OutlierInputSpec
    output_spec = _OutlierOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        data = np.asarray(nb.load(spec.in_file).dataobj, np.float32)
        mask = np.asarray(nb.load(spec.mask).dataobj) > 0
        table, summary = dwi.detect_outliers(data, read_gradients(spec.bval, spec.bvec), mask)
        out_file = Path(runtime.cwd) / "outliers.tsv"
        write_tsv(out_file, table)
        self._results["out_file"] = str(out_file)
        self._results["summary"] = summary
        return runtime


# --------------------------------------------------------------------------- tracking


def track_session(
    *,
    fod: nb.Nifti1Image,
    fa: nb.Nifti1Image,
    tissues: dict[str, nb.Nifti1Image],
    atlases: list[tuple[str, nb.Nifti1Image, pd.DataFrame]],
    dwi_to_t1w: np.ndarray,
    options: tractography.TrackingOptions,
    tck_path: str | Path | None = None,
    radius: float | None = connectome.DEFAULT_RADIUS,
) -> tuple[dict[str, connectome.ConnectomeAccumulator], tractography.TrackingReport]:
    """Track on the DWI grid and accumulate one connectome per atlas, chunk by chunk.

    Parameters
    ----------
    fod, fa : images on the DWI grid
    tissues : {"gm", "wm", "csf"} -> image on the DWI grid
    atlases : list of (name, native-T1w label image, atlas table with ``index``)
    dwi_to_t1w : (4, 4) RAS point map
    options : TrackingOptions
        ``threshold=None`` is resolved from the FA of grey matter; the report holds the
        value used.
    tck_path : path, optional
        Tractogram in T1w world coordinates.
    radius : float or None
        End-point assignment radius (mm, :func:`pipeline.connectome.assign_points`).

    Returns
    -------
    accumulators : atlas name -> ConnectomeAccumulator
    report : TrackingReport
    """
    affine = fod.affine
    maps = {k: np.asarray(v.dataobj, np.float64) for k, v in tissues.items()}
    fa_data = np.asarray(fa.dataobj, np.float64)
    options, criterion, seeds = tractography.prepare_tracking(options, affine, fa=fa_data,
                                                              **maps)
    labelled = []
    for name, image, table in atlases:
        labels = np.asarray(image.dataobj)
        if labels.dtype.kind == "f":
            labels = np.rint(labels).astype(np.int64)
        acc = connectome.ConnectomeAccumulator.from_label_image(
            labels, table["index"].to_numpy(dtype=np.int64)
        )
        labelled.append((name, labels, image.affine, acc))
    writer = None
    if tck_path is not None:
        writer = tractography.TckWriter(
            tck_path, {"algorithm": options.algorithm, "seed": options.seed, "space": "T1w"}
        )

    def consume(chunk: list[np.ndarray]) -> None:
        if not chunk:
            return
        # FA and lengths on the DWI grid (a rigid map keeps lengths), ends in T1w space
        mean_fa = connectome.sample_along(chunk, fa_data, affine)
        lengths = connectome.streamline_lengths(chunk)
        first, last = connectome.endpoints(chunk)
        ends = map_points(np.vstack([first, last]), dwi_to_t1w)
        n = len(chunk)
        for _, labels, label_affine, acc in labelled:
            assigned = connectome.assign_points(ends, labels, label_affine, radius)
            acc.add_assigned(acc.node_index(assigned[:n]), acc.node_index(assigned[n:]),
                             lengths, mean_fa)
        if writer is not None:
            writer.append([map_points(s, dwi_to_t1w) for s in chunk])

    try:
        report = tractography.run_tracking(
            np.asarray(fod.dataobj, np.float64), affine, seeds, criterion, options, consume
        )
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    return {name: acc for name, _, _, acc in labelled}, report


class _TrackInputSpec(BaseInterfaceInputSpec):
    fod = File(exists=True, mandatory=True)
    fa = File(exists=True, mandatory=True)
    gm = File(exists=True, mandatory=True)
    wm = File(exists=True, mandatory=True)
    csf = File(exists=True, mandatory=True)
    atlas_native = InputMultiObject(File(exists=True), mandatory=True,
                                    desc="native-T1w label images, in atlas order")
    atlas_names = traits.List(traits.Str, mandatory=True)
    atlas_tables = traits.List(File(exists=True), mandatory=True)
    dwi_to_t1w = File(exists=True, mandatory=True)
    model = traits.Dict(desc="model choice, for the sidecars")
    n_streamlines = traits.Int(1_000_000, usedefault=True)
    algorithm = traits.Enum(*tractography.ALGORITHMS, usedefault=True)
    seeding = traits.Enum("wm", "gmwmi", usedefault=True)
    stopping = traits.Enum(*tractography.STOPPING, usedefault=True,
                           desc="an FA threshold (default) or tissue-based (CMC, ACT)")
    fa_threshold = traits.Either(None, traits.Float, usedefault=True,
                                 desc="for stopping='threshold'; None: from the FA of GM")
    assignment_radius = traits.Float(connectome.DEFAULT_RADIUS, usedefault=True,
                                     desc="end-point radial search (mm)")
    seed = traits.Int(42, usedefault=True)
    chunk_size = traits.Int(20_000, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)
    save_tractogram = traits.Bool(False, usedefault=True)


class _TrackOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(File(exists=True),
                                  desc="relmat TSVs, atlas-major, in STATISTICS order")
    sidecars = traits.List(traits.Dict, desc="one per out_files entry")
    tractogram = File(desc="TCK in T1w space (only with save_tractogram)")
    qc = traits.List(traits.Dict, desc="streamline bookkeeping per atlas")
    report = traits.Dict()


class TrackConnectomes(SimpleInterface):
    """Chunked tractography and per-atlas connectomes (count, normalised, length, FA)."""

    input_spec = _TrackInputSpec
    output_spec = _TrackOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        options = tractography.TrackingOptions(
            algorithm=spec.algorithm, n_streamlines=spec.n_streamlines, seed=spec.seed,
            chunk_size=spec.chunk_size, n_threads=spec.num_threads, stopping=spec.stopping,
            threshold=spec.fa_threshold, seeding=spec.seeding,
        )
        atlases = [
            (name, nb.load(image), pd.read_csv(table, sep="\t"))
            for name, image, table in zip(spec.atlas_names, spec.atlas_native, spec.atlas_tables,
                                          strict=True)
        ]
        tck = Path(runtime.cwd) / "tracks.tck" if spec.save_tractogram else None
        accs, report = track_session(
            fod=nb.load(spec.fod), fa=nb.load(spec.fa),
            tissues={t: nb.load(getattr(spec, t)) for t in ("gm", "wm", "csf")},
            atlases=atlases, dwi_to_t1w=np.loadtxt(spec.dwi_to_t1w), options=options,
            tck_path=tck, radius=spec.assignment_radius,
        )
        model = spec.model if isdefined(spec.model) else {}
        files, sidecars, qc = [], [], []
        for name, _, table in atlases:
            acc = accs[name]
            names = table["name"].astype(str).tolist()
            for stat, measure in STATISTICS.items():
                path = Path(runtime.cwd) / f"atlas-{name}_stat-{stat}_relmat.tsv"
                write_tsv(path, connectome.relmat_table(acc.matrix(measure), names))
                files.append(str(path))
                sidecars.append(connectome.relmat_sidecar(
                    measure, algorithm=spec.algorithm, n_streamlines=report.n_streamlines,
                    seed=spec.seed, step_size=report.step_size, radius=spec.assignment_radius,
                    extra={
                        "Atlas": name,
                        "Seeding": spec.seeding,
                        "StoppingCriterion": spec.stopping,
                        **({"FAThreshold": report.options["threshold"]}
                           if spec.stopping == "threshold" else {}),
                        "SeedsUsed": report.n_seeds,
                        "FibreModel": model.get("model"),
                        "FibreModelReason": model.get("reason"),
                        "SphericalHarmonicOrder": model.get("sh_order"),
                        "TrackingOptions": report.options,
                        **acc.qc(),
                    },
                ))
            qc.append({"atlas": name, **acc.qc()})
        out = self._results
        out["out_files"], out["sidecars"], out["qc"] = files, sidecars, qc
        out["report"] = {
            "n_streamlines": report.n_streamlines, "n_seeds": report.n_seeds,
            "seconds": report.seconds, "streamlines_per_second": report.streamlines_per_second,
            "step_size": report.step_size, "fa_threshold": report.options["threshold"],
        }
        if tck is not None:
            out["tractogram"] = str(tck)
        return runtime


# --------------------------------------------------------------------------- QC


QC_COLUMNS = {
    "atlas": "Atlas of the connectome this row's streamline fractions refer to.",
    "n_runs": "DWI runs concatenated.",
    "n_volumes": "DWI volumes after concatenation.",
    "mean_fd": "Mean framewise displacement of the DWI volumes (mm).",
    "max_fd": "Maximum framewise displacement of the DWI volumes (mm).",
    "n_outlier_slices": "Slices with signal dropout against the tensor prediction.",
    "fraction_outlier_slices": "Fraction of diffusion-weighted slices flagged as dropout.",
    "n_outlier_volumes": "Volumes with more than 10 % of their slices flagged.",
    "registration_translation_mm": "Norm of the translation of the b=0 -> T1w rigid map.",
    "fibre_model": "Fibre-orientation model fitted.",
    "n_streamlines": "Streamlines kept.",
    "n_seeds": "Seeds tried.",
    "fraction_assigned_two_parcels": "Fraction of streamlines with both ends in a parcel.",
}


class _QCInputSpec(BaseInterfaceInputSpec):
    motion = File(exists=True, mandatory=True)
    outliers = traits.Dict(mandatory=True)
    registration = traits.Dict(mandatory=True)
    model = traits.Dict(mandatory=True)
    tracking = traits.Dict(mandatory=True)
    connectome_qc = traits.List(traits.Dict, mandatory=True)


class _QCOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class DwiQC(SimpleInterface):
    """One QC row per atlas: motion, outliers, registration, streamline bookkeeping."""

    input_spec = _QCInputSpec
    output_spec = _QCOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        motion = pd.read_csv(spec.motion, sep="\t")
        fd = motion["framewise_displacement"].astype(float)
        reg = spec.registration
        shift = float(np.sqrt(sum(reg.get(k, 0.0) ** 2 for k in ("trans_x", "trans_y",
                                                                   "trans_z"))))
        common: dict[str, Any] = {
            "n_runs": int(motion["run"].nunique()) if "run" in motion else 1,
            "n_volumes": len(motion),
            "mean_fd": float(fd.mean()),
            "max_fd": float(fd.max()),
            "n_outlier_slices": int(spec.outliers["n_outlier_slices"]),
            "fraction_outlier_slices": float(spec.outliers["fraction_outlier_slices"]),
            "n_outlier_volumes": len(spec.outliers["outlier_volumes"]),
            "registration_translation_mm": shift,
            "fibre_model": spec.model.get("model"),
            "n_streamlines": int(spec.tracking["n_streamlines"]),
            "n_seeds": int(spec.tracking["n_seeds"]),
        }
        rows = [
            {"atlas": q["atlas"], **common,
             "fraction_assigned_two_parcels": q["fraction_assigned_two_parcels"]}
            for q in spec.connectome_qc
        ]
        out_file = Path(runtime.cwd) / "dwi_qc.tsv"
        write_tsv(out_file, pd.DataFrame(rows, columns=list(QC_COLUMNS)))
        self._results["out_file"] = str(out_file)
        return runtime


def model_sidecar(model: dict[str, Any], what: str) -> dict[str, Any]:
    """Sidecar of a DWI-grid map: what it is and the model choice with its reason."""
    return {"Description": what, "FibreModel": model.get("model"),
            "FibreModelReason": model.get("reason"), "ModelChoice": json.loads(
                json.dumps(model, default=str))}
