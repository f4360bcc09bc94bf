"""Longitudinal anatomical workflow: per-session T1w processing, an unbiased subject template,
MNI normalisation, atlases in native space and regional volumes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from pipeline import derivatives
from pipeline.bids import Session
from pipeline.inputs import float32_gb
from pipeline.templates import DEFAULT_TEMPLATE
from workflows.engine import Workflow
from workflows.interfaces import DerivativesSink
from workflows.interfaces.anat import (
    ComposeTransforms,
    LongitudinalWarp,
    PreprocessT1w,
    RegionalVolumes,
    RegisterToMNI,
    SubjectTemplate,
    WarpAtlas,
)

#: Fields every session's ``outputnode_<label>`` offers to the functional and diffusion workflows.
SESSION_OUTPUTS = (
    "t1w_preproc", "brain_mask", "gm", "wm", "csf", "to_mni", "atlas_native", "volumes",
)

VOLUME_COLUMNS = {
    "region": "Atlas parcel name, or hippocampus/amygdala per hemisphere, TICV, GM, WM, CSF.",
    "volume_mm3": "Volume in native space (mm3); see 'method'.",
    "volume_se_mm3": "Measurement error of volume_mm3 (mm3): this session's registration noise "
    "floor, the robust spread of its parcels' log volume ratios to the template scaled by "
    "parcel size, summed in quadrature for hippocampus/amygdala (parcel errors taken as "
    "independent); n/a for label counts, TICV and tissues.",
    "volume_labelcount_mm3": "Volume from counting atlas labels in native space (mm3).",
    "method": "jacobian: Jacobian of the session-to-template warp integrated over parcels "
    "defined on the subject template; labelcount: native label counts.",
}


@dataclass(frozen=True)
class AtlasFiles:
    """An atlas as the workflows use it: its name, MNI-space image and table."""

    name: str
    image: Path
    table: Path


def _session_key(session: Session) -> str:
    # "ses_<label>" in node names lets progress lines and failures name the session
    return f"ses_{session.label}" if session.label else "single"


def init_anat_wf(
    *,
    subject: str,
    sessions: list[Session],
    atlases: list[AtlasFiles],
    output_dir: Path,
    anat_reference: str = "unbiased",
    omp_nthreads: int = 1,
    registration_nthreads: int = 1,
    sloppy: bool = False,
    seed: int = 42,
    template_resolution: int = 2,
) -> Workflow:
    """Build the anatomical workflow of one subject.

    Parameters
    ----------
    subject : str
        Subject label.
    sessions : list of Session
        Sessions with at least one T1w (the first T1w of each is used).
    atlases : list of AtlasFiles
        Atlases in the template space, brought to every session's native space.
    output_dir : Path
        Derivatives root.
    anat_reference : {"unbiased", "first", "sessionwise"}
        Within-subject reference: a template no session is privileged in, the first
        session, or none (each session registered to MNI on its own).
    omp_nthreads : int
        Threads of the resampling and Jacobian nodes.
    registration_nthreads : int
        Threads of preprocessing, template building and MNI registration (ANTs is not
        bit-reproducible with more than one).
    sloppy : bool
        Cheap registration settings (tests only).
    seed : int
        Seed of the registrations' sampling.
    template_resolution : int
        Voxel size (mm) of the bundled MNI template used for normalisation.

    Returns
    -------
    Workflow
        With one ``outputnode_<session>`` per session offering :data:`SESSION_OUTPUTS`
        (``atlas_native`` is a list in the order of ``atlases``).
    """
    workflow = Workflow(name="anat_wf")
    workflow.__desc__ = _methods(anat_reference, len(sessions), template_resolution)
    common = {
        "settings": "sloppy" if sloppy else "default",
        "seed": seed,
        "num_threads": registration_nthreads,
        "template_resolution": template_resolution,
    }
    names = [_session_key(s) for s in sessions]

    t1w_gbs = [float32_gb(session.t1w[0]) for session in sessions]
    preproc = {}
    for session, key, gb in zip(sessions, names, t1w_gbs, strict=True):
        node = pe.Node(PreprocessT1w(in_file=str(session.t1w[0]), **common), name=f"preproc_{key}")
        # measured 0.91-0.93 GB peak for a 1 mm T1w (0.038 GB as float32; bench_subject.py)
        node.n_procs, node._mem_gb = registration_nthreads, 0.5 + 11 * gb
        preproc[key] = node

    merge_brains = pe.Node(niu.Merge(len(names)), name="merge_brains")
    merge_masks = pe.Node(niu.Merge(len(names)), name="merge_masks")
    # rigid template only: the per-session SyN runs in its own node below, side by side with
    # the other sessions and with the template's MNI registration (one serial node was ~30 min
    # of the critical path at 1 mm)
    template = pe.Node(
        SubjectTemplate(names=names, mode=anat_reference, nonlinear=False, **common),
        name="subject_template",
    )
    # measured peaks at 1 mm, 3 sessions (bench_subject.py, sampled from outside: Nipype's
    # monitor misses ANTs calls): template 1.32 GB, session SyN 2.13 GB, to MNI 0.74 GB
    t1w_gb = max(t1w_gbs)
    template.n_procs = registration_nthreads
    template._mem_gb = 0.5 + 8 * len(names) * t1w_gb
    for index, key in enumerate(names, start=1):
        workflow.connect([
            (preproc[key], merge_brains, [("brain", f"in{index}")]),
            (preproc[key], merge_masks, [("brain_mask", f"in{index}")]),
        ])  # fmt: skip
    workflow.connect([
        (merge_brains, template, [("out", "brains")]),
        (merge_masks, template, [("out", "masks")]),
    ])  # fmt: skip

    split_transforms = pe.Node(niu.Split(splits=[1] * len(names), squeeze=True), name="split_xfms")
    workflow.connect(template, "transforms", split_transforms, "inlist")
    # session -> template transform of each session: (node, output field)
    to_template = {key: (split_transforms, f"out{i}") for i, key in enumerate(names, start=1)}
    for index, key in enumerate(names):
        if anat_reference == "sessionwise" or (anat_reference == "first" and index == 0):
            continue
        warp = pe.Node(LongitudinalWarp(name=key, **common), name=f"to_template_{key}")
        warp.n_procs, warp._mem_gb = registration_nthreads, 0.5 + 45 * t1w_gb
        workflow.connect([
            (preproc[key], warp, [("brain", "brain"), ("brain_mask", "mask")]),
            (split_transforms, warp, [(f"out{index + 1}", "rigid")]),
            (template, warp, [("template", "template"), ("template_mask", "template_mask")]),
        ])  # fmt: skip
        to_template[key] = (warp, "transform")

    shared_to_mni = None
    if anat_reference != "sessionwise":
        shared_to_mni = pe.Node(RegisterToMNI(source="template", **common), name="template_to_mni")
        shared_to_mni.n_procs, shared_to_mni._mem_gb = registration_nthreads, 0.5 + 7 * t1w_gb
        workflow.connect([
            (template, shared_to_mni, [("template", "in_file"), ("template_mask", "mask")]),
        ])  # fmt: skip

    sinks = _SinkFactory(workflow, output_dir, subject)
    if shared_to_mni is not None:
        sinks.add(template, "template", {}, "T1w", ".nii.gz", desc="preproc",
                  meta={"SkullStripped": True})
        sinks.add(template, "template_mask", {}, "mask", ".nii.gz", desc="brain")

    for session, key in zip(sessions, names, strict=True):
        ses_entities = {"session": session.label}
        outputnode = pe.Node(
            niu.IdentityInterface(fields=list(SESSION_OUTPUTS)), name=f"outputnode_{key}"
        )
        if shared_to_mni is not None:
            to_mni = pe.Node(ComposeTransforms(), name=f"to_mni_{key}")
            node, field = to_template[key]
            workflow.connect([
                (node, to_mni, [(field, "first")]),
                (shared_to_mni, to_mni, [("transform", "second")]),
            ])  # fmt: skip
            to_mni_node = to_mni
        else:
            register = pe.Node(RegisterToMNI(source="T1w", **common), name=f"to_mni_{key}")
            register.n_procs = registration_nthreads
            workflow.connect([
                (preproc[key], register, [("brain", "in_file"), ("brain_mask", "mask")]),
            ])  # fmt: skip
            to_mni_node = register

        workflow.connect([
            (preproc[key], outputnode, [
                ("t1w_preproc", "t1w_preproc"), ("brain_mask", "brain_mask"),
                ("gm", "gm"), ("wm", "wm"), ("csf", "csf"),
            ]),
            (to_mni_node, outputnode, [("transform", "to_mni")]),
        ])  # fmt: skip
        sinks.add(preproc[key], "t1w_preproc", ses_entities, "T1w", ".nii.gz", desc="preproc",
                  meta={"SkullStripped": False})
        session_t1w = derivatives.build_path(
            {"subject": subject, **ses_entities, "desc": "preproc"}, "T1w", ".nii.gz", "anat")
        sinks.add(preproc[key], "brain_mask", ses_entities, "mask", ".nii.gz", desc="brain")
        sinks.add(preproc[key], "dseg", ses_entities, "dseg", ".nii.gz")
        for tissue in ("gm", "wm", "csf"):
            sinks.add(
                preproc[key], tissue, ses_entities, "probseg", ".nii.gz", label=tissue.upper()
            )

        merge_atlases = pe.Node(niu.Merge(len(atlases)), name=f"atlases_{key}")
        merge_volumes = pe.Node(niu.Merge(len(atlases)), name=f"merge_volumes_{key}")
        merge_tissues = pe.Node(niu.Merge(3), name=f"tissues_{key}")
        workflow.connect([
            (preproc[key], merge_tissues, [("gm", "in1"), ("wm", "in2"), ("csf", "in3")]),
            (merge_atlases, outputnode, [("out", "atlas_native")]),
            (merge_volumes, outputnode, [("out", "volumes")]),
        ])  # fmt: skip
        for a_index, atlas in enumerate(atlases, start=1):
            warp = pe.Node(
                WarpAtlas(atlas=str(atlas.image), num_threads=omp_nthreads),
                name=f"atlas_{atlas.name}_{key}",
            )
            volumes = pe.Node(
                RegionalVolumes(atlas_table=str(atlas.table), num_threads=omp_nthreads),
                name=f"volumes_{atlas.name}_{key}",
            )
            workflow.connect([
                (to_mni_node, warp, [("transform", "to_mni")]),
                (preproc[key], warp, [("t1w_preproc", "reference")]),
                (warp, merge_atlases, [("out_file", f"in{a_index}")]),
                (warp, volumes, [("out_file", "native_labels")]),
                (volumes, merge_volumes, [("out_file", f"in{a_index}")]),
                (preproc[key], volumes, [("brain_mask", "brain_mask")]),
                (merge_tissues, volumes, [("out", "tissues")]),
            ])  # fmt: skip
            if shared_to_mni is not None:
                template_labels = _template_labels(workflow, atlas, template, shared_to_mni)
                node, field = to_template[key]
                workflow.connect([
                    (template_labels, volumes, [("out_file", "template_labels")]),
                    (node, volumes, [(field, "to_template")]),
                ])  # fmt: skip
            atlas_entities = {**ses_entities, "atlas": atlas.name}
            sinks.add(warp, "out_file", {**atlas_entities, "space": "T1w"}, "dseg", ".nii.gz",
                      meta={"SpatialReference": f"bids::{session_t1w.as_posix()}"})
            sinks.add(
                volumes, "out_file", {**atlas_entities, "statistic": "volume"}, "morph", ".tsv",
                meta={column: {"Description": text} for column, text in VOLUME_COLUMNS.items()}
                | {"Units": "mm^3", "Atlas": atlas.name},
            )  # fmt: skip
    return workflow


def _template_labels(workflow, atlas: AtlasFiles, template, template_to_mni):
    """The atlas on the subject template grid (one node per atlas, shared by sessions)."""
    name = f"atlas_{atlas.name}_template"
    existing = workflow.get_node(name)
    if existing is not None:
        return existing
    node = pe.Node(WarpAtlas(atlas=str(atlas.image)), name=name)
    workflow.connect([
        (template_to_mni, node, [("transform", "to_mni")]),
        (template, node, [("template", "reference")]),
    ])  # fmt: skip
    return node


class _SinkFactory:
    """Adds a ``ds_*`` DerivativesSink per output, named from what it writes."""

    def __init__(self, workflow: Workflow, output_dir: Path, subject: str) -> None:
        self.workflow, self.output_dir, self.subject = workflow, str(output_dir), subject

    def add(self, node, field, entities, suffix, extension, meta=None, **more_entities) -> None:
        entities = {"subject": self.subject, **entities, **more_entities}
        parts = [
            f"ses_{v}" if k == "session" else v for k, v in entities.items() if k != "subject" and v
        ]
        name = "ds_" + "_".join([*map(str, parts), suffix]).replace("-", "_")
        sink = pe.Node(
            DerivativesSink(
                base_directory=self.output_dir,
                entities={k: v for k, v in entities.items() if v is not None},
                suffix=suffix,
                extension=extension,
                datatype="anat",
                meta_dict=meta or {},
            ),
            name=name,
            run_without_submitting=True,
        )
        self.workflow.connect(node, field, sink, "in_file")


def _methods(anat_reference: str, n_sessions: int, resolution: int) -> str:
    reference = {
        "unbiased": (
            f"An unbiased within-subject template was built from the {n_sessions} session(s) "
            "by iterative rigid averaging started from the mean of all sessions, so that no "
            "session was privileged [@reuter2012]; each session was then registered "
            "non-linearly to it."
        ),
        "first": "Every session was registered to the first session, which served as reference.",
        "sessionwise": "Each session was normalised to the template on its own.",
    }[anat_reference]
    return (
        "Each T1w image was corrected for intensity non-uniformity with N4 [@n4] (ANTs, "
        "through ANTsPy [@ants]), skull-stripped by registering the MNI152 2009 template "
        "[@mni152nlin2009] to it and warping the template brain mask, and segmented into grey "
        "matter, white matter and CSF with a Gaussian mixture model guided by the template's "
        f"tissue priors. {reference} The subject's reference was registered to the MNI152 2009 "
        f"template ({DEFAULT_TEMPLATE}, {resolution} mm) with rigid, affine and SyN stages "
        "[@syn]. Atlases were brought to each session's native space with nearest-neighbour "
        "interpolation through the composed transforms. Regional volumes were computed by "
        "integrating the Jacobian determinant of each session's warp over parcels defined on "
        "the subject template."
    )
