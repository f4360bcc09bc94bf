"""Interfaces of the anatomical workflow; each calls pipeline.anat or pipeline.registration."""

from __future__ import annotations

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

from pipeline import anat, registration
from pipeline.derivatives import write_tsv


def _save(img: nb.Nifti1Image, cwd: str, name: str) -> str:
    path = str(Path(cwd) / name)
    nb.save(img, path)
    return path


class _CommonInputSpec(BaseInterfaceInputSpec):
    settings = traits.Enum("default", "sloppy", usedefault=True)
    seed = traits.Int(registration.DEFAULT_SEED, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)
    template_resolution = traits.Int(2, usedefault=True)


class _PreprocessT1wInputSpec(_CommonInputSpec):
    in_file = File(exists=True, mandatory=True, desc="raw T1w")


class _PreprocessT1wOutputSpec(TraitedSpec):
    t1w_preproc = File(exists=True, desc="bias-corrected T1w")
    brain = File(exists=True)
    brain_mask = File(exists=True)
    gm = File(exists=True)
    wm = File(exists=True)
    csf = File(exists=True)
    dseg = File(exists=True, desc="tissue labels 1 GM, 2 WM, 3 CSF")


class PreprocessT1w(SimpleInterface):
    """N4, template-based brain extraction and tissue segmentation of one T1w."""

    input_spec = _PreprocessT1wInputSpec
    output_spec = _PreprocessT1wOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        threads = {"n_threads": spec.num_threads}
        corrected, _ = anat.n4_bias_correction(spec.in_file, settings=spec.settings, **threads)
        extracted = anat.brain_extraction(
            corrected,
            resolution=spec.template_resolution,
            settings=spec.settings,
            work_dir=runtime.cwd,
            seed=spec.seed,
            **threads,
        )
        priors = anat.warp_tissue_priors(
            extracted.template_to_native, corrected, resolution=spec.template_resolution, **threads
        )
        tissues = anat.segment_tissues(corrected, extracted.mask, priors)
        out = self._results
        out["t1w_preproc"] = _save(corrected, runtime.cwd, "t1w_preproc.nii.gz")
        out["brain"] = _save(extracted.brain, runtime.cwd, "brain.nii.gz")
        out["brain_mask"] = _save(extracted.mask, runtime.cwd, "brain_mask.nii.gz")
        for key in ("GM", "WM", "CSF"):
            out[key.lower()] = _save(tissues[key], runtime.cwd, f"{key}_probseg.nii.gz")
        out["dseg"] = _save(tissues["dseg"], runtime.cwd, "tissue_dseg.nii.gz")
        return runtime


class _SubjectTemplateInputSpec(_CommonInputSpec):
    brains = InputMultiObject(File(exists=True), mandatory=True, desc="one brain per session")
    masks = InputMultiObject(File(exists=True), mandatory=True)
    names = traits.List(traits.Str, mandatory=True, desc="session labels, same order")
    mode = traits.Enum(*registration.ANAT_REFERENCE_MODES, usedefault=True)
    nonlinear = traits.Bool(
        True, usedefault=True,
        desc="add the per-session SyN here (False: rigid only; see LongitudinalWarp)",
    )


class _SubjectTemplateOutputSpec(TraitedSpec):
    template = File(desc="within-subject template (absent in sessionwise mode)")
    template_mask = File()
    # a List, not OutputMultiObject: Nipype unwraps a one-element OutputMultiObject to a
    # string, which broke the per-session Split for one-session subjects
    transforms = traits.List(File(exists=True), desc="session -> template, JSON")


class SubjectTemplate(SimpleInterface):
    """Within-subject template from every session (see :func:`build_subject_template`)."""

    input_spec = _SubjectTemplateInputSpec
    output_spec = _SubjectTemplateOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        result = registration.build_subject_template(
            list(spec.brains),
            list(spec.masks),
            mode=spec.mode,
            nonlinear=spec.nonlinear,
            settings=spec.settings,
            work_dir=runtime.cwd,
            seed=spec.seed,
            n_threads=spec.num_threads,
            names=list(spec.names),
        )
        if result.image is not None:
            self._results["template"] = _save(result.image, runtime.cwd, "template.nii.gz")
        if result.mask is not None:
            self._results["template_mask"] = _save(result.mask, runtime.cwd, "template_mask.nii.gz")
        self._results["transforms"] = [
            str(registration.save_transform(tx, Path(runtime.cwd) / f"to_template_{name}.json"))
            for tx, name in zip(result.transforms, spec.names, strict=True)
        ]
        return runtime


class _RegisterToMNIInputSpec(_CommonInputSpec):
    in_file = File(exists=True, mandatory=True, desc="skull-stripped T1w or subject template")
    mask = File(exists=True)
    source = traits.Str("template", usedefault=True)


class _TransformOutputSpec(TraitedSpec):
    transform = File(exists=True, desc="Transform JSON")


class RegisterToMNI(SimpleInterface):
    """Non-linear registration to the bundled MNI template."""

    input_spec = _RegisterToMNIInputSpec
    output_spec = _TransformOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        transform = registration.register_to_mni(
            spec.in_file,
            nb.load(spec.mask) if isdefined(spec.mask) else None,
            resolution=spec.template_resolution,
            settings=spec.settings,
            work_dir=runtime.cwd,
            seed=spec.seed,
            n_threads=spec.num_threads,
            source=spec.source,
        )
        path = Path(runtime.cwd) / "to_mni.json"
        self._results["transform"] = str(registration.save_transform(transform, path))
        return runtime


class _LongitudinalWarpInputSpec(_CommonInputSpec):
    brain = File(exists=True, mandatory=True, desc="the session's skull-stripped T1w")
    mask = File(exists=True, mandatory=True, desc="the session's brain mask")
    rigid = File(exists=True, mandatory=True, desc="session -> template rigid transform JSON")
    template = File(exists=True, mandatory=True)
    template_mask = File(exists=True, mandatory=True)
    name = traits.Str(mandatory=True, desc="session label")


class LongitudinalWarp(SimpleInterface):
    """One session's SyN onto the subject template (see :func:`longitudinal_warp`)."""

    input_spec = _LongitudinalWarpInputSpec
    output_spec = _TransformOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        transform = registration.longitudinal_warp(
            spec.brain,
            registration.load_transform(spec.rigid),
            spec.template,
            spec.template_mask,
            mask=spec.mask,
            settings=spec.settings,
            work_dir=runtime.cwd,
            seed=spec.seed,
            n_threads=spec.num_threads,
            name=spec.name,
        )
        path = Path(runtime.cwd) / f"to_template_{spec.name}.json"
        self._results["transform"] = str(registration.save_transform(transform, path))
        return runtime


class _ComposeInputSpec(BaseInterfaceInputSpec):
    first = File(exists=True, mandatory=True, desc="A -> B transform JSON")
    second = File(exists=True, mandatory=True, desc="B -> C transform JSON")


class ComposeTransforms(SimpleInterface):
    """Chain two transforms (A -> B, B -> C) into A -> C."""

    input_spec = _ComposeInputSpec
    output_spec = _TransformOutputSpec

    def _run_interface(self, runtime):
        chained = registration.load_transform(self.inputs.first).then(
            registration.load_transform(self.inputs.second)
        )
        path = Path(runtime.cwd) / "composed.json"
        self._results["transform"] = str(registration.save_transform(chained, path))
        return runtime


class _WarpAtlasInputSpec(BaseInterfaceInputSpec):
    atlas = File(exists=True, mandatory=True, desc="MNI-space label image")
    to_mni = File(exists=True, mandatory=True, desc="reference -> MNI transform JSON")
    reference = File(exists=True, mandatory=True, desc="grid of the output")
    num_threads = traits.Int(1, usedefault=True)


class _WarpAtlasOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class WarpAtlas(SimpleInterface):
    """Bring MNI-space labels onto a native or template grid (nearest neighbour)."""

    input_spec = _WarpAtlasInputSpec
    output_spec = _WarpAtlasOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        labels = registration.atlas_to_native(
            spec.atlas,
            registration.load_transform(spec.to_mni),
            spec.reference,
            n_threads=spec.num_threads,
        )
        self._results["out_file"] = _save(labels, runtime.cwd, "atlas_dseg.nii.gz")
        return runtime


class _VolumesInputSpec(BaseInterfaceInputSpec):
    atlas_table = File(exists=True, mandatory=True, desc="atlas TSV (index, name, network, ...)")
    native_labels = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    tissues = InputMultiObject(File(exists=True), desc="GM, WM, CSF probabilities")
    template_labels = File(exists=True, desc="atlas on the subject template grid")
    to_template = File(exists=True, desc="session -> template transform JSON")
    num_threads = traits.Int(1, usedefault=True)


class _VolumesOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class RegionalVolumes(SimpleInterface):
    """Parcel, hippocampus/amygdala, tissue and intracranial volumes of one session (mm3).

    ``volume_mm3`` integrates the Jacobian of the session -> template map over
    parcels defined once on the template (when a template exists), so every session
    is measured on the same parcels; ``volume_labelcount_mm3`` counts native labels.
    """

    input_spec = _VolumesInputSpec
    output_spec = _VolumesOutputSpec

    def _run_interface(self, runtime):
        spec = self.inputs
        table = pd.read_csv(spec.atlas_table, sep="\t")
        mask = nb.load(spec.brain_mask)
        tissues = (
            dict(zip(("GM", "WM", "CSF"), map(nb.load, spec.tissues), strict=True))
            if isdefined(spec.tissues) and spec.tissues
            else None
        )
        counts = anat.label_volumes(nb.load(spec.native_labels), table)
        by_count = anat.regional_volumes(counts, table, mask, tissues)
        if isdefined(spec.template_labels) and isdefined(spec.to_template):
            template_labels = nb.load(spec.template_labels)
            jacobian = anat.session_jacobian_volumes(
                template_labels,
                registration.load_transform(spec.to_template),
                table,
                runtime.cwd,
                n_threads=spec.num_threads,
            )
            main = anat.regional_volumes(jacobian, table, mask, tissues)
            reference = anat.label_volumes(template_labels, table)
            se = anat.jacobian_volume_se(jacobian, reference, table)
            main["volume_se_mm3"] = main["region"].map(se).astype(float)
            method = "jacobian"
        else:
            main, method = by_count.assign(volume_se_mm3=np.nan), "labelcount"
        volumes = main.assign(
            volume_labelcount_mm3=by_count["volume_mm3"].to_numpy(), method=method
        )
        out = Path(runtime.cwd) / "volumes.tsv"
        write_tsv(out, volumes)
        self._results["out_file"] = str(out)
        return runtime
