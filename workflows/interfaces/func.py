"""Interfaces of the functional workflow; each reads files, calls ``pipeline`` and writes files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from pipeline import confounds, connectivity, denoise, motion, parcellate, registration, resample
from pipeline.derivatives import write_tsv
from pipeline.templates import DEFAULT_TEMPLATE, load_template

#: Column descriptions of the QC table (``desc-qc_bold.tsv``).
QC_COLUMNS = {
    "n_runs": "BOLD runs of the session used.",
    "n_volumes": "Volumes after dropping non-steady-state ones (all runs).",
    "n_dummy": "Initial non-steady-state volumes dropped (all runs).",
    "n_censored": "Volumes censored for motion (FD above the threshold, short segments).",
    "percent_censored": "Censored volumes as a percentage of n_volumes.",
    "remaining_minutes": "Uncensored data left (kept volumes x TR), minutes.",
    "mean_fd": "Mean framewise displacement (Power 2012, mm) of the post-dummy volumes.",
    "max_fd": "Largest framewise displacement (mm).",
    "tsnr_median": "Median over brain voxels of the temporal SNR (mean/std), mean over runs.",
    "n_dropped_parcels": "Parcels left NaN for poor coverage (< 50 % of their voxels).",
    "qc_pass": "1 when at least --min-minutes of uncensored data remain, else 0.",
    "qc_reason": "Why the session failed QC (n/a when it passed).",
}

OUTLIER_COLUMNS = {
    "run": "Index of the BOLD run in the session (from 1).",
    "volume": "Volume index within the run (from 0).",
    "framewise_displacement": "Framewise displacement (Power 2012), mm; n/a for the first.",
    "non_steady_state": "1 for initial non-steady-state volumes (dropped).",
    "censored": "1 for volumes censored for motion (dropped from the connectome).",
}


def _cwd_file(runtime, name: str) -> Path:
    return Path(runtime.cwd) / name


def _read_bold(path: str) -> nb.Nifti1Image:
    # One open handle: sliced reads of a .nii.gz then seek forward instead of re-inflating
    # the file from its start for every volume.
    img = nb.load(path, keep_file_open=True)
    if len(img.shape) != 4:
        raise ValueError(f"{path}: a BOLD run must be 4-D, got shape {img.shape}; "
                         "check the input file")
    return img


# --------------------------------------------------------------------------- raw path


class _RealignInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="raw BOLD run")
    slice_timing = traits.List(traits.Float, desc="SliceTiming (s); empty: no correction")
    slice_axis = traits.Int(2, usedefault=True, desc="slice-encoding axis (0, 1, 2)")
    repetition_time = traits.Float(desc="TR in seconds (default: the header)")


class _RealignOutputSpec(TraitedSpec):
    motion_file = File(exists=True, desc="TSV with trans_x .. rot_z (mm, rad)")
    boldref = File(exists=True, desc="mean of the realigned steady-state volumes")
    stc_file = File(desc="slice-timing corrected run (when requested)")
    n_dummy = traits.Int(desc="initial non-steady-state volumes")
    repetition_time = traits.Float()


class RealignBold(SimpleInterface):
    """Non-steady-state detection, optional slice-timing correction, head-motion estimation."""

    input_spec = _RealignInputSpec
    output_spec = _RealignOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        img = _read_bold(spec.in_file)
        data = np.asarray(img.dataobj, dtype=np.float32)
        tr = (spec.repetition_time if isdefined(spec.repetition_time)
              else float(img.header.get_zooms()[3]))
        n_dummy = confounds.non_steady_state_volumes(data)
        if n_dummy >= data.shape[3] - 2:
            raise ValueError(f"{spec.in_file}: {n_dummy} of {data.shape[3]} volumes look "
                             "non-steady-state; is this a BOLD run?")
        if isdefined(spec.slice_timing) and spec.slice_timing:
            data = slice_time_correct(data, np.asarray(spec.slice_timing), tr, spec.slice_axis)
            stc = _cwd_file(runtime, "bold_stc.nii.gz")
            nb.save(nb.Nifti1Image(data, img.affine, img.header), stc)
            self._results["stc_file"] = str(stc)
        result = motion.realign(data, img.affine, reference=n_dummy, resample=False)
        table = pd.DataFrame(result.params, columns=list(motion.MOTION_COLUMNS))
        motion_file = _cwd_file(runtime, "motion.tsv")
        write_tsv(motion_file, table)
        mean = np.zeros(img.shape[:3])
        for t in range(n_dummy, data.shape[3]):
            mean += motion.move_volume(data[..., t], img.affine, result.params[t], order=1,
                                       inverse=True)
        mean /= data.shape[3] - n_dummy
        boldref = _cwd_file(runtime, "boldref.nii.gz")
        nb.save(nb.Nifti1Image(mean.astype(np.float32), img.affine), boldref)
        self._results.update(motion_file=str(motion_file), boldref=str(boldref),
                             n_dummy=int(n_dummy), repetition_time=float(tr))
        return runtime


def slice_time_correct(data: np.ndarray, timing: np.ndarray, tr: float, axis: int = 2,
                       reference: float | None = None) -> np.ndarray:
    """Shift every slice's time series to the reference time (default: mid-TR), cubic spline.

    ``timing[k]`` is the acquisition time (s) of slice ``k`` along ``axis``; the first and
    last volumes keep the nearest value where the spline would extrapolate.
    """
    from scipy.interpolate import CubicSpline

    if timing.size != data.shape[axis]:
        raise ValueError(f"SliceTiming has {timing.size} entries for {data.shape[axis]} slices")
    ref = float(np.mean([timing.min(), timing.max()])) if reference is None else reference
    out = np.array(data, dtype=np.float32)
    n_t = data.shape[3]
    t = np.arange(n_t) * tr
    moved = np.moveaxis(out, axis, 0)
    for k, offset in enumerate(timing):
        # slice k was sampled at t + offset; evaluate at t + ref
        spline = CubicSpline(t + offset, moved[k], axis=-1)
        moved[k] = spline(np.clip(t + ref, t[0] + offset, t[-1] + offset))
    return out


class _CoregisterInputSpec(BaseInterfaceInputSpec):
    boldref = File(exists=True, mandatory=True)
    t1w = File(exists=True, mandatory=True, desc="bias-corrected T1w")
    t1w_mask = File(exists=True, mandatory=True)
    settings = traits.Enum("default", "sloppy", usedefault=True)
    seed = traits.Int(registration.DEFAULT_SEED, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _CoregisterOutputSpec(TraitedSpec):
    transform = File(exists=True, desc="BOLD -> T1w Transform (JSON, work directory only)")
    itk_file = File(exists=True, desc="the same affine as an ITK text transform file")
    t1w_to_bold = File(exists=True, desc="4x4 RAS point map T1w world -> BOLD world (text)")


class CoregisterBold(SimpleInterface):
    """Rigid BOLD reference -> T1w registration (ANTs, mutual information)."""

    input_spec = _CoregisterInputSpec
    output_spec = _CoregisterOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        t1w = nb.load(spec.t1w)
        mask = nb.load(spec.t1w_mask)
        brain = nb.Nifti1Image(
            np.where(np.asarray(mask.dataobj) > 0, np.asarray(t1w.dataobj, np.float32), 0),
            t1w.affine,
        )
        # BOLD and T1w share the scanner frame: start from the headers (identity), not from
        # the centres of mass, which differ between a T2* EPI and a skull-stripped T1w
        transform, _ = registration.register(
            brain, spec.boldref, stages=("rigid",), fixed_mask=mask, initial="identity",
            settings=spec.settings, work_dir=runtime.cwd, prefix="bold2t1w_", seed=spec.seed,
            n_threads=spec.num_threads, source="bold", target="T1w",
        )
        out = registration.save_transform(transform, _cwd_file(runtime, "bold_to_t1w.json"))
        lps = registration.transform_affine(transform)
        text = _cwd_file(runtime, "t1w_to_bold.txt")
        np.savetxt(text, resample.ras_point_map(lps), fmt="%.10f")
        # the derivative is self-contained ITK text (the JSON names work-directory files)
        itk = _cwd_file(runtime, "bold_to_t1w_xfm.txt")
        itk.write_text(registration.itk_affine_text(lps))
        self._results.update(transform=str(out), itk_file=str(itk), t1w_to_bold=str(text))
        return runtime


def load_coordinates(to_mni: str, shape: tuple[int, ...], affine: np.ndarray, work_dir: Path,
                     n_threads: int = 1) -> np.ndarray:
    """T1w coordinates of the template grid from a Transform JSON or a coordinate-map NIfTI."""
    if to_mni.endswith(".json"):
        transform = registration.load_transform(to_mni)
        return resample.coordinates_from_transform(transform, shape, affine, work_dir,
                                                   n_threads=n_threads)
    if to_mni.endswith((".nii", ".nii.gz")):
        return resample.coordinates_from_map(nb.load(to_mni), shape, affine)
    raise ValueError(f"{to_mni}: the T1w -> MNI transform must be a Transform JSON "
                     "(save_transform) or a mode-image coordinate map (.nii.gz)")


class _ResampleInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="raw (or slice-time corrected) BOLD")
    motion_file = File(exists=True, mandatory=True)
    t1w_to_bold = File(exists=True, mandatory=True)
    to_mni = File(exists=True, mandatory=True, desc="T1w -> template: JSON or coordinate map")
    brain_mask = File(exists=True, mandatory=True, desc="T1w brain mask")
    wm = File(exists=True, mandatory=True, desc="T1w WM probability")
    csf = File(exists=True, mandatory=True, desc="T1w CSF probability")
    resolution = traits.Float(0.0, usedefault=True, desc="output voxel size; 0 = automatic")
    order = traits.Int(3, usedefault=True, desc="spline order of the BOLD interpolation")
    num_threads = traits.Int(1, usedefault=True)


class _ResampleOutputSpec(TraitedSpec):
    bold = File(exists=True, desc="BOLD in template space (uncompressed NIfTI)")
    mask = File(exists=True, desc="BOLD brain mask in template space")
    wm = File(exists=True)
    csf = File(exists=True)


class ResampleToTemplate(SimpleInterface):
    """Motion + coregistration + T1w -> template warp in one interpolation per volume."""

    input_spec = _ResampleInputSpec
    output_spec = _ResampleOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        bold = _read_bold(spec.in_file)
        res = spec.resolution or resample.output_resolution(bold.header.get_zooms())
        shape, affine = resample.template_grid(load_template(2).t1w, res)
        coords = load_coordinates(spec.to_mni, shape, affine, Path(runtime.cwd) / "xfm",
                                  spec.num_threads)
        params = pd.read_csv(spec.motion_file, sep="\t")[list(motion.MOTION_COLUMNS)].to_numpy()
        brain = resample.resample_image(nb.load(spec.brain_mask), coords, affine, order=1)
        in_brain = np.asarray(brain.dataobj) > 0.5
        # Every later step reads the BOLD inside the brain mask only: interpolating a
        # margin around it, not the whole template box, is ~4x less work.
        margin = resample.with_margin(in_brain)
        out = resample.resample_bold(
            bold, _cwd_file(runtime, "bold_mni.nii"), coords, affine, motion=params,
            t1w_to_bold=np.loadtxt(spec.t1w_to_bold), order=spec.order, where=margin,
        )
        # in the brain and inside the BOLD field of view at every volume
        data = nb.load(out).dataobj
        covered = np.ones(shape, bool)
        for k in range(shape[2]):
            covered[:, :, k] = np.asarray(data[:, :, k, :]).min(axis=-1) > 0
        mask = in_brain & covered
        if not mask.any():
            raise ValueError(f"{spec.in_file}: the BOLD brain mask in template space is empty; "
                             "check the BOLD -> T1w registration and the T1w brain mask")
        self._results["bold"] = str(out)
        self._results["mask"] = _save(mask.astype(np.uint8), affine, runtime, "mask_mni.nii.gz")
        for key in ("wm", "csf"):
            img = resample.resample_image(nb.load(getattr(spec, key)), coords, affine, order=1)
            self._results[key] = _save(np.asarray(img.dataobj), affine, runtime,
                                       f"{key}_mni.nii.gz")
        return runtime


def _save(data: np.ndarray, affine: np.ndarray, runtime, name: str) -> str:
    path = _cwd_file(runtime, name)
    img = nb.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    nb.save(img, path)
    return str(path)


def _tissue_mask(prob: np.ndarray, brain: np.ndarray, threshold: float = 0.9,
                 min_voxels: int = 20) -> np.ndarray:
    """Thresholded tissue mask, eroded once unless that leaves fewer than ``min_voxels``."""
    m = (prob > threshold) & brain
    eroded = confounds.erode_mask(m, 1)
    return eroded if eroded.sum() >= min_voxels else m


class _ConfoundsInputSpec(BaseInterfaceInputSpec):
    bold = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)
    wm = File(exists=True, mandatory=True)
    csf = File(exists=True, mandatory=True)
    motion_file = File(exists=True, mandatory=True)
    n_dummy = traits.Int(0, usedefault=True)
    repetition_time = traits.Float(mandatory=True)


class _ConfoundsOutputSpec(TraitedSpec):
    confounds_file = File(exists=True)
    confounds_meta = traits.Dict(desc="JSON sidecar: every column described")
    tsnr = traits.Float()


class BoldConfounds(SimpleInterface):
    """fMRIPrep-style confounds table (motion, tissue signals, CompCor, FD, DVARS)."""

    input_spec = _ConfoundsInputSpec
    output_spec = _ConfoundsOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        data = np.asarray(nb.load(spec.bold).dataobj)
        brain = np.asarray(nb.load(spec.mask).dataobj) > 0
        wm = _tissue_mask(np.asarray(nb.load(spec.wm).dataobj), brain)
        csf = _tissue_mask(np.asarray(nb.load(spec.csf).dataobj), brain)
        params = pd.read_csv(spec.motion_file, sep="\t")[list(motion.MOTION_COLUMNS)].to_numpy()
        table = confounds.build_confounds(
            data, params, spec.repetition_time, brain_mask=brain, wm_mask=wm, csf_mask=csf,
            n_dummy=spec.n_dummy, erosion=0,
        )
        out = _cwd_file(runtime, "confounds.tsv")
        write_tsv(out, table)
        self._results["confounds_file"] = str(out)
        self._results["confounds_meta"] = confounds.describe_confounds(list(table.columns))
        self._results["tsnr"] = confounds.tsnr(data[..., spec.n_dummy:], brain)
        return runtime


# --------------------------------------------------------------------------- both paths


class _ParcelInputSpec(BaseInterfaceInputSpec):
    bold = File(exists=True, mandatory=True, desc="BOLD in template space")
    mask = File(exists=True, desc="brain mask on the BOLD grid (default: every voxel)")
    atlas_image = File(exists=True, mandatory=True, desc="atlas dseg in template space")
    atlas_table = File(exists=True, mandatory=True, desc="atlas table with index and name")
    min_coverage = traits.Float(0.5, usedefault=True)


class _ParcelOutputSpec(TraitedSpec):
    timeseries = File(exists=True, desc="parcel means of every volume (TSV, names as header)")
    coverage = File(exists=True, desc="Node and coverage per parcel (TSV)")
    dropped = traits.List(traits.Str, desc="names of parcels under the coverage threshold")


class ParcelSignals(SimpleInterface):
    """Mean BOLD signal per parcel (atlas resampled nearest-neighbour to the BOLD grid)."""

    input_spec = _ParcelInputSpec
    output_spec = _ParcelOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        bold = _read_bold(spec.bold)
        atlas = nb.load(spec.atlas_image)
        table = pd.read_csv(spec.atlas_table, sep="\t")
        for column in ("index", "name"):
            if column not in table:
                raise ValueError(f"{spec.atlas_table}: atlas table needs an '{column}' column")
        if atlas.shape[:3] != bold.shape[:3] or not np.allclose(atlas.affine, bold.affine,
                                                                atol=1e-3):
            atlas = resample.resample_labels(atlas, bold.shape[:3], bold.affine)
        mask = nb.load(spec.mask) if isdefined(spec.mask) else None
        result = parcellate.parcel_timeseries(
            bold, atlas, mask, label_values=table["index"].to_numpy(),
            min_coverage=spec.min_coverage,
        )
        names = table["name"].astype(str).tolist()
        ts = _cwd_file(runtime, "timeseries.tsv")
        write_tsv(ts, connectivity.timeseries_table(result.timeseries, names))
        cov = _cwd_file(runtime, "coverage.tsv")
        write_tsv(cov, parcellate.coverage_table(result, names))
        by_label = dict(zip(table["index"].astype(int), names, strict=True))
        self._results.update(timeseries=str(ts), coverage=str(cov),
                             dropped=[by_label[int(v)] for v in result.dropped])
        return runtime


class _DenoiseInputSpec(BaseInterfaceInputSpec):
    timeseries = InputMultiObject(File(exists=True), mandatory=True, desc="one TSV per run")
    confounds = InputMultiObject(File(exists=True), mandatory=True, desc="one TSV per run")
    repetition_times = traits.List(traits.Float, mandatory=True)
    n_dummy = traits.List(traits.Int, desc="per run; default: the confounds' outlier columns")
    tsnr = traits.List(traits.Float, desc="per run")
    strategy = traits.Str("36P", usedefault=True, desc="built-in name or YAML path")
    fd_threshold = traits.Float(desc="overrides the strategy's censoring threshold (mm)")
    min_minutes = traits.Float(denoise.DEFAULT_MIN_MINUTES, usedefault=True)
    estimators = traits.List(traits.Enum(*connectivity.KINDS), value=["pearson"],
                             usedefault=True)
    atlas = traits.Str(mandatory=True)
    node_files = traits.List(traits.Str)
    dropped = traits.List(traits.Str, desc="parcels dropped for coverage (any run)")
    extra_meta = traits.Dict(desc="added to every relmat sidecar (e.g. the template space)")


class _DenoiseOutputSpec(TraitedSpec):
    timeseries = File(exists=True, desc="denoised, censored, concatenated parcel series")
    timeseries_meta = traits.Dict()
    outliers = File(exists=True, desc="per-volume FD, dummy and censoring flags")
    qc = File(exists=True)
    qc_meta = traits.Dict()
    pearson = File()
    pearson_meta = traits.Dict()
    partial = File()
    partial_meta = traits.Dict()
    ledoit_wolf = File()
    ledoit_wolf_meta = traits.Dict()
    pearson_z = File(desc="Fisher z (arctanh) of pearson")
    pearson_z_meta = traits.Dict()
    partial_z = File()
    partial_z_meta = traits.Dict()
    ledoit_wolf_z = File()
    ledoit_wolf_z_meta = traits.Dict()


class DenoiseConnectivity(SimpleInterface):
    """Denoise every run, concatenate, estimate connectivity and write the QC of a session."""

    input_spec = _DenoiseInputSpec
    output_spec = _DenoiseOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        strategy = denoise.load_strategy(spec.strategy)
        if isdefined(spec.fd_threshold):
            strategy = replace(strategy, fd_threshold=spec.fd_threshold)
        runs, outliers, names = [], [], None
        n_dummy = list(spec.n_dummy) if isdefined(spec.n_dummy) and spec.n_dummy else None
        for i, (ts_file, conf_file, tr) in enumerate(
            zip(spec.timeseries, spec.confounds, spec.repetition_times, strict=True)
        ):
            ts = pd.read_csv(ts_file, sep="\t")
            if names is None:
                names = list(ts.columns)
            elif list(ts.columns) != names:
                raise ValueError(f"{ts_file}: parcels differ from the first run's")
            table = pd.read_csv(conf_file, sep="\t", na_values="n/a")
            run = denoise.denoise_run(ts.to_numpy(float), table, tr, strategy,
                                      n_dummy=None if n_dummy is None else n_dummy[i])
            runs.append(run)
            fd_all = (table["framewise_displacement"].to_numpy(float)
                      if "framewise_displacement" in table else np.full(len(table), np.nan))
            censored = np.zeros(len(table), int)
            censored[run.n_dummy:] = ~run.keep
            outliers.append(pd.DataFrame({
                "run": i + 1, "volume": np.arange(len(table)), "framewise_displacement": fd_all,
                "non_steady_state": (np.arange(len(table)) < run.n_dummy).astype(int),
                "censored": censored,
            }))
        # a parcel dropped in any run is dropped in the session (NaN columns must agree)
        joined = [r.data for r in runs]
        bad = np.any([np.isnan(d).all(axis=0) for d in joined], axis=0)
        for r in runs:
            r.data[:, bad] = np.nan
        session = denoise.concatenate_runs(runs)
        tsnr = float(np.mean(spec.tsnr)) if isdefined(spec.tsnr) and spec.tsnr else None
        qc = denoise.qc_summary(session, tsnr)
        ok, reason = denoise.check_min_minutes(qc["remaining_minutes"], spec.min_minutes)
        dropped = sorted(set(spec.dropped if isdefined(spec.dropped) else [])
                         | {n for n, b in zip(names, bad, strict=True) if b})
        # the atlas is the file's atlas- entity: a column of that name would clash with it
        qc_row = {"n_runs": len(runs), **qc,
                  "n_dropped_parcels": len(dropped), "qc_pass": int(ok), "qc_reason": reason}
        qc_file = _cwd_file(runtime, "qc.tsv")
        write_tsv(qc_file, pd.DataFrame([qc_row], columns=list(QC_COLUMNS)))
        self._results["qc"] = str(qc_file)
        self._results["qc_meta"] = {k: {"Description": v} for k, v in QC_COLUMNS.items()} | {
            "DenoisingStrategy": strategy.name, "FDThreshold": strategy.fd_threshold,
            "MinimumMinutes": spec.min_minutes,
        }
        out = _cwd_file(runtime, "outliers.tsv")
        write_tsv(out, pd.concat(outliers, ignore_index=True))
        self._results["outliers"] = str(out)

        ts_file = _cwd_file(runtime, "timeseries_denoised.tsv")
        write_tsv(ts_file, connectivity.timeseries_table(session.data, names))
        self._results["timeseries"] = str(ts_file)
        common = {
            "DenoisingStrategy": strategy.name,
            "DenoisingMethods": strategy.methods_text(),
            "ConfoundsUsed": session.confounds_used,
            "FDThreshold": strategy.fd_threshold,
            "BandpassFilter": [strategy.low_hz, strategy.high_hz],
            "QCPass": ok,
            "QCReason": reason,
            "RemainingMinutes": qc["remaining_minutes"],
        } | (dict(spec.extra_meta) if isdefined(spec.extra_meta) else {})
        self._results["timeseries_meta"] = {
            "Description": "Denoised parcel mean time series; censored and non-steady-state "
            "volumes removed, runs concatenated in order (rows are not evenly spaced in time).",
            "RepetitionTime": session.tr, "NumberOfVolumesUsed": int(session.keep.sum()),
            "DroppedParcels": dropped,
        } | common
        node_files = list(spec.node_files) if isdefined(spec.node_files) else []
        for kind in spec.estimators:
            matrix = connectivity.connectivity(session.data, kind)
            for key, values, z in ((kind, matrix, False),
                                   (f"{kind}_z", connectivity.fisher_z(matrix), True)):
                path = _cwd_file(runtime, f"{key}_relmat.tsv")
                write_tsv(path, connectivity.relmat_table(values, names))
                self._results[key] = str(path)
                self._results[f"{key}_meta"] = connectivity.relmat_sidecar(
                    kind, z=z, node_files=node_files, strategy=strategy.name,
                    n_volumes=int(session.keep.sum()), n_censored=session.n_censored,
                    dropped_parcels=dropped, extra=common,
                )
        return runtime


# --------------------------------------------------------------------------- fMRIPrep path


#: Template spaces accepted from fMRIPrep, in order of preference.
FMRIPREP_SPACES = (DEFAULT_TEMPLATE, "MNI152NLin2009cAsym")


def find_fmriprep_run(fmriprep_dir: str | Path, bold_file: str | Path) -> dict[str, str]:
    """The fMRIPrep outputs of one raw BOLD run: preprocessed MNI BOLD, mask, confounds.

    Returns a dict with ``bold``, ``mask`` (may be absent), ``confounds`` and ``space``.

    Raises
    ------
    FileNotFoundError
        Naming the files looked for and what to do.
    """
    raw = Path(bold_file)
    stem = raw.name.split(".nii")[0].removesuffix("_bold")
    parts = stem.split("_")
    folder = Path(fmriprep_dir) / parts[0]
    if len(parts) > 1 and parts[1].startswith("ses-"):
        folder /= parts[1]
    folder /= "func"
    tried = []
    for space in FMRIPREP_SPACES:
        candidates = sorted(folder.glob(f"{stem}_space-{space}*_desc-preproc_bold.nii*"))
        tried.append(str(folder / f"{stem}_space-{space}[_res-*]_desc-preproc_bold.nii.gz"))
        if candidates:
            bold = candidates[0]
            mask = Path(str(bold).replace("desc-preproc_bold", "desc-brain_mask"))
            conf = folder / f"{stem}_desc-confounds_timeseries.tsv"
            if not conf.exists():
                raise FileNotFoundError(f"{conf}: fMRIPrep confounds missing for {raw.name}; "
                                        "re-run fMRIPrep or drop --fmriprep-dir")
            found = {"bold": str(bold), "confounds": str(conf), "space": space}
            if mask.exists():
                found["mask"] = str(mask)
            return found
    raise FileNotFoundError(
        f"no fMRIPrep output for {raw.name} in {folder}; looked for {tried}. Run fMRIPrep with "
        f"--output-spaces {DEFAULT_TEMPLATE} (or MNI152NLin2009cAsym), or drop --fmriprep-dir"
    )


class _FMRIPrepInputSpec(BaseInterfaceInputSpec):
    bold = File(exists=True, mandatory=True)
    mask = File(exists=True)
    confounds = File(exists=True, mandatory=True)


class _FMRIPrepOutputSpec(TraitedSpec):
    bold = File(exists=True)
    mask = File(exists=True)
    confounds = File(exists=True)
    repetition_time = traits.Float()
    tsnr = traits.Float()


class FMRIPrepInputs(SimpleInterface):
    """Check fMRIPrep outputs, make a mask when absent, read TR and tSNR."""

    input_spec = _FMRIPrepInputSpec
    output_spec = _FMRIPrepOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        img = _read_bold(spec.bold)
        table = pd.read_csv(spec.confounds, sep="\t", na_values="n/a")
        if len(table) != img.shape[3]:
            raise ValueError(f"{spec.confounds}: {len(table)} rows but {spec.bold} has "
                             f"{img.shape[3]} volumes; are they from the same run?")
        sidecar = Path(spec.bold.split(".nii")[0] + ".json")
        tr = float(img.header.get_zooms()[3])
        if sidecar.exists():
            tr = float(json.loads(sidecar.read_text()).get("RepetitionTime", tr))
        data = np.asarray(img.dataobj)
        if isdefined(spec.mask):
            mask_path = spec.mask
            mask = np.asarray(nb.load(mask_path).dataobj) > 0
        else:
            mask = data.min(axis=-1) > 0.1 * np.percentile(data.mean(axis=-1), 98)
            mask_path = _save(mask.astype(np.uint8), img.affine, runtime, "mask.nii.gz")
        dummies = [c for c in table.columns if c.startswith("non_steady_state_outlier")]
        n_dummy = int(table[dummies].fillna(0).to_numpy().any(axis=1).sum()) if dummies else 0
        self._results.update(bold=spec.bold, mask=mask_path, confounds=spec.confounds,
                             repetition_time=tr,
                             tsnr=confounds.tsnr(data[..., n_dummy:], mask))
        return runtime
