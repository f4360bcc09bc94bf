"""Write a whole simulated BIDS dataset with its planted ground truth."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.simulate import anat, dwi, effects, func
from pipeline.simulate import bundles as bundles_mod
from pipeline.simulate.config import SESSION_DAYS, SESSION_ROLES, SimConfig, get_config
from pipeline.simulate.mni import MniModel, load_mni_model
from pipeline.simulate.space import (
    Grid,
    SessionSpace,
    random_rigid,
    random_subject_warp,
    rigid_matrix,
    scanner_grid,
)
from pipeline.simulate.writer import write_json, write_matrix, write_nifti, write_tsv

TEMPLATE = "MNI152NLin2009aSym"
ATLAS = "Seitzman300"
XFM_SPACING = 8.0
GT = Path("derivatives") / "groundtruth"


def _rng(seed: int, *key: int) -> np.random.Generator:
    """Independent stream per ``key``: adding subjects or sessions leaves the others as they are."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def simulate_dataset(
    out: str | Path,
    n_patients: int = 2,
    n_controls: int = 1,
    seed: int = 0,
    sessions: Sequence[str] = tuple(SESSION_ROLES),
    preset: str = "example",
    config: SimConfig | None = None,
    verbose: bool = False,
    **overrides: float | int | None,
) -> Path:
    """Simulate a longitudinal ECT BIDS dataset with planted ground truth.

    Parameters
    ----------
    out : str or Path
        Output dataset root (created; existing files are overwritten).
    n_patients, n_controls : int
        Cohort size; labels ``sub-pat01..`` and ``sub-ctl01..``.
    seed : int
        Master seed; same seed and arguments give byte-identical files.
    sessions : sequence of str
        Subset of ``preECT``, ``postECT``, ``maintenance``.
    preset : {'tiny', 'example', 'realistic'}
        Grid sizes and run lengths (see :mod:`pipeline.simulate.config`).
    config : SimConfig, optional
        Full configuration (overrides ``preset``).
    **overrides
        ``anat_res, func_res, dwi_res, volumes, tr, directions, bval, ...`` (``None`` = preset).

    Returns
    -------
    Path
        The dataset root.
    """
    cfg = config or get_config(preset, **overrides)
    unknown = [s for s in sessions if s not in SESSION_ROLES]
    if unknown or not sessions:
        raise ValueError(f"sessions {list(sessions)}: use labels among {list(SESSION_ROLES)}")
    if n_patients < 0 or n_controls < 0 or n_patients + n_controls == 0:
        raise ValueError("need at least one subject (--subjects/--controls)")
    sessions = [s for s in SESSION_ROLES if s in sessions]  # chronological order
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    model = load_mni_model(1 if cfg.anat_res < 1.5 else 2)
    design_rng = _rng(seed, 0)
    design = effects.draw_group_design(design_rng, model.table)
    bundles = bundles_mod.select_bundles(design_rng, model, cfg.n_bundles)
    bvals, bvecs = dwi.gradient_scheme(design_rng, cfg.directions, cfg.n_b0, cfg.bval)

    subjects = [(f"pat{i + 1:02d}", "patient", 1, i) for i in range(n_patients)]
    subjects += [(f"ctl{i + 1:02d}", "control", 2, i) for i in range(n_controls)]
    _write_top_level(root, cfg, seed, preset)
    participants = []
    for label, group, key, index in subjects:
        start = time.perf_counter()
        info = _simulate_subject(root, model, cfg, design, bundles, bvals, bvecs, label, group,
                                 index, (seed, key, index), sessions)
        participants.append(info)
        if verbose:
            print(f"sub-{label}: {time.perf_counter() - start:.1f} s", flush=True)
    write_tsv(root / "participants.tsv", ["participant_id", "group", "age", "sex"],
              [[f"sub-{p['label']}", p["group"], p["age"], p["sex"]] for p in participants])
    return root


def _write_top_level(root: Path, cfg: SimConfig, seed: int, preset: str) -> None:
    write_json(root / "dataset_description.json", {
        "Name": "Trajectome simulated ECT dataset",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["Trajectome simulator"],
        "GeneratedBy": [{"Name": "trajectome-simulate",
                         "Description": f"preset={preset} seed={seed}"}],
    })
    (root / "README").write_text(
        "Simulated longitudinal ECT dataset written by trajectome-simulate.\n\n"
        "Patients (sub-patXX) are scanned before ECT (ses-preECT), after the acute course\n"
        "(ses-postECT, ~4 weeks later) and at maintenance (ses-maintenance, ~6 months);\n"
        "controls (sub-ctlXX) at the same time points. Planted ground truth (connectomes,\n"
        "volumes, motion, transforms, effects) is in derivatives/groundtruth.\n\n"
        f"Configuration: {asdict(cfg)}\n"
    )
    write_json(root / "participants.json", {
        "participant_id": {"Description": "Participant identifier"},
        "group": {"Description": "Study group",
                  "Levels": {"patient": "Treatment-resistant depression, treated with ECT",
                             "control": "Healthy control"}},
        "age": {"Description": "Age at the first session", "Units": "year"},
        "sex": {"Description": "Sex", "Levels": {"M": "male", "F": "female"}},
    })
    write_json(root / "sessions.json", {
        "acq_time": {"Description": "Acquisition date and time of the session's first scan"},
    })
    gt = root / GT
    write_json(gt / "dataset_description.json", {
        "Name": "Trajectome simulated ECT dataset: planted ground truth",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "trajectome-simulate",
                         "Description": "Ground truth planted by the simulator"}],
        "SourceDatasets": [{"URL": "../../"}],
    })
    (gt / "README").write_text(_GT_README)


def _simulate_subject(
    root: Path, model: MniModel, cfg: SimConfig, design: effects.GroupDesign,
    bundles: pd.DataFrame, bvals: np.ndarray, bvecs: np.ndarray, label: str, group: str,
    index: int, key: tuple[int, int, int], sessions: Sequence[str],
) -> dict:
    seed, gkey, idx = key
    rng = _rng(seed, gkey, idx, 0)
    age = int(np.clip(np.round(rng.normal(52 if group == "patient" else 50, 12)), 20, 80))
    sex = "F" if rng.random() < 0.6 else "M"
    first = dt.datetime(2021, 1, 4, 8) + dt.timedelta(days=int(rng.integers(0, 700)),
                                                      minutes=30 * int(rng.integers(0, 16)))
    table = model.table
    subj = effects.draw_subject_effects(rng, group, index, design, len(table),
                                        bundles["strength"].to_numpy())
    hipp = table.loc[table["anatomy"] == "hippocampus", ["x", "y", "z"]].to_numpy()
    warp = random_subject_warp(_rng(seed, gkey, idx, 1), hipp)
    sc = bundles_mod.sc_matrix(bundles, subj.bundle_counts, table)
    subj = effects.calibrate_coupling(table, design, subj, bundles, sc,
                                      tuple(SESSION_ROLES[s] for s in sessions))
    networks = table["network"].to_numpy()
    sub = f"sub-{label}"
    summary: dict[str, dict[str, float]] = {}
    acq = []
    for ses in sessions:
        role = SESSION_ROLES[ses]
        s_idx = list(SESSION_ROLES).index(ses)
        ses_rng = [_rng(seed, gkey, idx, 2 + s_idx, k) for k in range(4)]
        jitter = dt.timedelta(days=int(ses_rng[0].integers(-3, 4)) if role != "pre" else 0,
                              minutes=30 * int(ses_rng[0].integers(-2, 3)))
        acq.append([f"ses-{ses}", (first + dt.timedelta(days=SESSION_DAYS[ses]) + jitter)
                    .strftime("%Y-%m-%dT%H:%M:%S")])
        params = subj.params(role)
        head = rigid_matrix(random_rigid(ses_rng[0], 5.0, 8.0))
        space = SessionSpace(warp, head, params["hipp"])
        stem = f"{sub}_ses-{ses}"
        raw = root / sub / f"ses-{ses}"
        gt = root / GT / sub / f"ses-{ses}"
        totals = _write_anat(raw, gt, stem, model, cfg, space, ses_rng[1])
        fc = _write_func(raw, gt, stem, model, cfg, design, subj, params, bundles, space,
                         ses_rng[2])
        _write_dwi(raw, gt, stem, model, cfg, bundles, subj, sc, space, bvals, bvecs, ses_rng[3])
        summary[role] = {
            "dmn": effects.mean_block(fc, networks, effects.DMN, effects.DMN),
            "se": effects.mean_block(fc, networks, effects.SAL, effects.FPN),
            "vis": effects.mean_block(fc, networks, effects.VIS, effects.VIS),
            "coupling": effects.sc_fc_coupling(fc, sc, networks, effects.DMN),
            "hipp": totals["left_hippocampus"] + totals["right_hippocampus"],
        }
    write_tsv(root / sub / f"{sub}_sessions.tsv", ["session_id", "acq_time"], acq)
    _write_effects(root / GT / sub, sub, subj, summary)
    return {"label": label, "group": group, "age": age, "sex": sex}


def _write_anat(raw: Path, gt: Path, stem: str, model: MniModel, cfg: SimConfig,
                space: SessionSpace, rng: np.random.Generator) -> dict[str, float]:
    grid = anat.t1w_grid(cfg.anat_res)
    t1, labels, brain = anat.simulate_t1w(rng, model, space, grid)
    write_nifti(raw / "anat" / f"{stem}_T1w.nii.gz", _f(t1, grid), grid.affine, grid.shape,
                dtype="uint8", slope=anat.T1_NOISE)
    write_json(raw / "anat" / f"{stem}_T1w.json", {
        "Manufacturer": "Trajectome", "ManufacturersModelName": "simulator",
        "MagneticFieldStrength": 3, "MRAcquisitionType": "3D", "PulseSequenceType": "MPRAGE",
        "EchoTime": 0.00298, "InversionTime": 0.9, "FlipAngle": 9, "SkullStripped": False,
    })
    g = gt / "anat"
    write_nifti(g / f"{stem}_space-T1w_atlas-{ATLAS}_desc-planted_dseg.nii.gz",
                _f(labels, grid), grid.affine, grid.shape)
    write_nifti(g / f"{stem}_space-T1w_desc-brain_mask.nii.gz", _f(brain, grid), grid.affine,
                grid.shape, dtype="uint8")
    volumes, totals = anat.planted_volumes(model, space.warp, space.hipp_scale)
    rows = [[int(i), n, float(v)] for i, n, v in volumes.itertuples(index=False)]
    rows += [["n/a", name, value] for name, value in totals.items()]
    write_tsv(g / f"{stem}_atlas-{ATLAS}_desc-planted_stat-volume_morph.tsv",
              ["index", "name", "volume_mm3"], rows, digits=3)
    write_json(g / f"{stem}_atlas-{ATLAS}_desc-planted_stat-volume_morph.json", {
        "Description": "Planted regional volumes in this session's native space, integrating "
                       "the Jacobian determinant of the MNI->native warp over each 2 mm atlas "
                       "voxel (not counting dseg voxels). Rows with index n/a are totals: left/"
                       "right hippocampus and amygdala (sum of their parcels) and "
                       "total_intracranial (template brain mask).",
        "index": {"Description": "Atlas label (n/a for totals)"},
        "name": {"Description": "Parcel or total name"},
        "volume_mm3": {"Description": "Volume", "Units": "mm^3"},
    })
    _write_xfms(g, stem, space, grid)
    return totals


def _f(data: np.ndarray, grid: Grid) -> np.ndarray:
    """C-ordered flat/3D data -> 3D array in grid shape."""
    return np.asarray(data).reshape(grid.shape)


def _write_xfms(g: Path, stem: str, space: SessionSpace, t1_grid: Grid) -> None:
    """Coordinate maps (int16, 0.01 mm) of the true native <-> MNI transforms."""
    native = scanner_grid(XFM_SPACING, tuple(np.array(t1_grid.shape) *
                                             np.abs(np.diag(t1_grid.affine)[:3])))
    lo, hi = np.array([-98.0, -134.0, -72.0]), np.array([98.0, 98.0, 116.0])
    shape = tuple(int(n) for n in np.ceil((hi - lo) / XFM_SPACING) + 1)
    mni_aff = np.diag([XFM_SPACING] * 3 + [1.0])
    mni_aff[:3, 3] = lo
    mni = Grid(shape, mni_aff)
    for grid, fn, name, desc in (
        (native, space.scanner_to_mni, f"from-{TEMPLATE}_to-T1w",
         "Grid in native T1w (scanner) space; each voxel holds the MNI coordinate (mm) it maps "
         "to, so it resamples MNI images (e.g. the atlas) into T1w."),
        (mni, space.mni_to_scanner, f"from-T1w_to-{TEMPLATE}",
         "Grid in MNI space; each voxel holds the native T1w (scanner) coordinate (mm) it "
         "maps to, so it resamples T1w images into MNI."),
    ):
        coords = fn(grid.all_points()).reshape(*grid.shape, 3)
        path = g / f"{stem}_{name}_mode-image_xfm.nii.gz"
        write_nifti(path, [coords[..., c] for c in range(3)], grid.affine, (*grid.shape, 3),
                    slope=0.02, intent="vector")
        write_json(path.with_name(path.name.replace(".nii.gz", ".json")), {
            "Description": desc + " Values are world coordinates (RAS mm) stored as int16 "
                                  "with scl_slope 0.02; interpolate linearly between grid points.",
            "FromSpace": "T1w" if "from-T1w" in name else TEMPLATE,
            "ToSpace": TEMPLATE if "from-T1w" in name else "T1w",
        })


def _write_func(raw: Path, gt: Path, stem: str, model: MniModel, cfg: SimConfig,
                design: effects.GroupDesign, subj: effects.SubjectEffects, params: dict,
                bundles: pd.DataFrame, space: SessionSpace, rng: np.random.Generator) -> np.ndarray:
    table = model.table
    fmodel = effects.factor_model(table, design, subj, params, bundles)
    latents = effects.draw_latents(rng, fmodel, cfg.volumes, cfg.tr, cfg.dummies)
    grid = func.bold_grid(cfg.func_res)
    vols, outliers, _ = func.simulate_bold(rng, model, space, grid, latents, table, cfg.dummies)
    name = f"{stem}_task-rest_bold"
    # quantisation step = noise std: dithered by the noise, and it keeps the files small
    write_nifti(raw / "func" / f"{name}.nii.gz", vols, grid.affine, (*grid.shape, cfg.volumes),
                tr=cfg.tr, dtype="uint8", slope=func.QUANTUM)
    nz = grid.shape[2]
    order = list(range(0, nz, 2)) + list(range(1, nz, 2))
    timing = np.empty(nz)
    timing[order] = np.arange(nz) * cfg.tr / nz
    write_json(raw / "func" / f"{name}.json", {
        "TaskName": "rest", "RepetitionTime": cfg.tr, "EchoTime": 0.03, "FlipAngle": 75,
        "SliceTiming": [round(float(t), 4) for t in timing], "SliceEncodingDirection": "k",
        "PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05,
        "Manufacturer": "Trajectome", "ManufacturersModelName": "simulator",
        "MagneticFieldStrength": 3, "SkullStripped": False,
    })
    fc = effects.realised_fc(latents, cfg.dummies)
    g = gt / "func"
    names = table["name"].tolist()
    for desc, mat, digits, what in (("planted", fc, 3, "Realised Pearson correlation of the "
                                     "latent parcel series used in the BOLD (non-dummy volumes)."),
                            ("population", fmodel.population, 2, "Population correlation matrix "
                             "the latent series were drawn from.")):
        path = g / f"{stem}_task-rest_atlas-{ATLAS}_desc-{desc}_stat-pearsoncorrelation_relmat.tsv"
        write_matrix(path, names, mat, digits=digits, index_label="Node")
        write_json(path.with_suffix(".json"), _relmat_meta(what, "Pearson correlation", False))
    ts = g / f"{stem}_task-rest_atlas-{ATLAS}_desc-planted_timeseries.tsv.gz"
    write_matrix(ts, names, latents.T, digits=4)
    write_json(g / ts.name.replace(".tsv.gz", ".json"), {
        "Description": "Latent parcel series (unit variance over non-dummy volumes, "
                       "band-limited to 0.01-0.08 Hz), one column per parcel, one row per volume.",
        "SamplingFrequency": 1.0 / cfg.tr, "StartTime": 0.0, "Columns": names,
    })
    out = g / f"{stem}_task-rest_desc-planted_outliers.tsv"
    write_tsv(out, list(outliers.columns), outliers.itertuples(index=False), digits=8)
    write_json(out.with_suffix(".json"), _OUTLIERS_META)
    return fc


def _relmat_meta(description: str, measure: str, weighted_sc: bool) -> dict:
    return {
        "Description": description,
        "RelationshipMeasure": measure,
        "Weighted": True,
        "Directed": False,
        "ValidDiagonal": not weighted_sc,
        "StorageFormat": "Full",
        "NodeFiles": [f"atlas-{ATLAS}_dseg.tsv"],
    }


def _write_dwi(raw: Path, gt: Path, stem: str, model: MniModel, cfg: SimConfig,
               bundles: pd.DataFrame, subj: effects.SubjectEffects, sc: np.ndarray,
               space: SessionSpace, bvals: np.ndarray, bvecs: np.ndarray,
               rng: np.random.Generator) -> None:
    grid = dwi.dwi_grid(cfg.dwi_res)
    vols, fibres = dwi.simulate_dwi(rng, model, space, grid, bundles, subj.bundle_counts, bvals,
                                    bvecs)
    d = raw / "dwi"
    write_nifti(d / f"{stem}_dwi.nii.gz", vols, grid.affine, (*grid.shape, len(bvals)),
                dtype="uint8", slope=dwi.QUANTUM)
    (d / f"{stem}_dwi.bval").write_text(" ".join(str(int(b)) for b in bvals) + "\n")
    (d / f"{stem}_dwi.bvec").write_text(
        "\n".join(" ".join(f"{v:.6f}" for v in row) for row in dwi.fsl_bvecs(bvecs)) + "\n")
    write_json(d / f"{stem}_dwi.json", {
        "EchoTime": 0.08, "RepetitionTime": 8.0, "PhaseEncodingDirection": "j-",
        "TotalReadoutTime": 0.05, "Manufacturer": "Trajectome",
        "ManufacturersModelName": "simulator", "MagneticFieldStrength": 3,
    })
    g = gt / "dwi"
    write_nifti(g / f"{stem}_space-dwi_desc-bundles_mask.nii.gz", fibres >= 0.5, grid.affine,
                grid.shape, dtype="uint8")
    path = g / f"{stem}_atlas-{ATLAS}_desc-planted_stat-bundlecount_relmat.tsv"
    write_matrix(path, model.table["name"].tolist(), sc, digits=0, index_label="Node")
    write_json(path.with_suffix(".json"), _relmat_meta(
        "Planted structural connectivity: fibre count of the bundle joining two parcels "
        "(0 = no bundle). Identical at every session of a subject.", "fibre count", True))
    b = bundles.copy()
    b["strength"] = subj.bundle_counts
    path = g / f"{stem}_atlas-{ATLAS}_desc-planted_bundles.tsv"
    write_tsv(path, list(b.columns), b.itertuples(index=False), digits=3)
    write_json(path.with_suffix(".json"), _BUNDLES_META)


def _write_effects(g: Path, sub: str, subj: effects.SubjectEffects,
                   summary: dict[str, dict[str, float]]) -> None:
    klass = subj.maintenance_class or "none"
    specs = [
        ("dmn_within_fc", "mean_fc", effects.DMN, effects.DMN, "func", "dmn", True),
        ("salience_executive_fc", "mean_fc", effects.SAL, effects.FPN, "func", "se", True),
        ("hippocampal_volume", "volume_mm3", "hippocampus", "hippocampus", "anat", "hipp", True),
        ("dmn_sc_fc_coupling", "pearson_r", effects.DMN, effects.DMN, "func+dwi", "coupling",
         True),
        ("visual_within_fc", "mean_fc", effects.VIS, effects.VIS, "func", "vis", False),
    ]
    rows = []
    for name, metric, a, b, modality, k, planted in specs:
        values = [summary.get(r, {}).get(k) for r in ("pre", "post", "maintenance")]
        is_planted = "yes" if planted and subj.group == "patient" else "no"
        rows.append([name, metric, a, b, modality, *values, klass, is_planted])
    header = ["effect", "metric", "network_a", "network_b", "modality", "pre", "post",
              "maintenance", "maintenance_class", "planted"]
    write_tsv(g / f"{sub}_desc-planted_effects.tsv", header, rows, digits=4)
    write_json(g / f"{sub}_desc-planted_effects.json", _EFFECTS_META)


_EFFECTS_META = {
    "Description": "Planted effects, one row per effect. Values are measured on the planted "
                   "ground truth of each session (realised latent FC, bundle SC, Jacobian "
                   "volumes): what a perfect pipeline recovers. n/a = session not simulated.",
    "effect": {"Description": "Effect name", "Levels": {
        "dmn_within_fc": "Mean FC within the default-mode network (high pre-ECT, reduced post)",
        "salience_executive_fc": "Mean FC between Salience and FrontoParietal (increases post)",
        "hippocampal_volume": "Left + right hippocampal volume (about +4 % post)",
        "dmn_sc_fc_coupling": "Pearson r between FC and SC over DMN edges (increases post)",
        "visual_within_fc": "Mean FC within Visual: negative control, nothing planted"}},
    "metric": {"Description": "What pre/post/maintenance measure"},
    "network_a": {"Description": "First network (or structure)"},
    "network_b": {"Description": "Second network (or structure)"},
    "modality": {"Description": "Data the effect is measured on"},
    "pre": {"Description": "Value at ses-preECT"},
    "post": {"Description": "Value at ses-postECT"},
    "maintenance": {"Description": "Value at ses-maintenance"},
    "maintenance_class": {"Description": "Planted trajectory from post to maintenance",
                          "Levels": {
                              "regression": "70 % of the acute change undone",
                              "stabilisation": "stays at the post-ECT value",
                              "continued_remodelling": "moves 50 % further in the acute direction",
                              "none": "control: nothing planted"}},
    "planted": {"Description": "yes if a change was planted for this subject",
                "Levels": {"yes": "planted", "no": "no change planted"}},
}

_OUTLIERS_META = {
    "Description": "Planted per-volume motion and artefacts of the BOLD run.",
    "framewise_displacement": {"Description": "Power FD from the planted parameters "
                               "(rotations as arc on a 50 mm sphere)", "Units": "mm"},
    "spike": {"Description": "1 if a motion spike with an intensity artefact was planted"},
    "non_steady_state": {"Description": "1 for the bright non-steady-state volumes at the start"},
    "trans_x": {"Description": "Planted translation; the volume shows the reference head at "
                               "R(rot) x + trans (R = Rz Ry Rx)", "Units": "mm"},
    "trans_y": {"Units": "mm"}, "trans_z": {"Units": "mm"},
    "rot_x": {"Units": "rad"}, "rot_y": {"Units": "rad"}, "rot_z": {"Units": "rad"},
    "physio_wm": {"Description": "Planted white-matter physiological signal (unit std)"},
    "physio_csf": {"Description": "Planted CSF physiological signal (unit std)"},
}

_BUNDLES_META = {
    "Description": "Planted fibre bundles: quadratic Bezier curves p0 -> p2 (control point p1, "
                   "MNI mm) with a tube radius ~3.5 mm * sqrt(strength / median).",
    "parcel_a": {"Description": "Atlas index of one end"},
    "parcel_b": {"Description": "Atlas index of the other end"},
    "strength": {"Description": "Fibre count (the planted SC weight)"},
    "length_mm": {"Description": "Curve length in MNI space", "Units": "mm"},
}

_GT_README = """Planted ground truth of the simulated dataset (trajectome-simulate).

Per session (sub-X/ses-Y):
  anat/ *_space-T1w_atlas-Seitzman300_desc-planted_dseg.nii.gz  true parcels, native T1w grid
        *_space-T1w_desc-brain_mask.nii.gz                       true brain mask
        *_atlas-Seitzman300_desc-planted_stat-volume_morph.tsv   Jacobian volumes + totals
        *_from-MNI152NLin2009aSym_to-T1w_mode-image_xfm.nii.gz   coordinate maps of the true
        *_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.nii.gz   transforms (see their JSON)
  func/ *_desc-planted_stat-pearsoncorrelation_relmat.tsv        realised latent FC
        *_desc-population_stat-pearsoncorrelation_relmat.tsv     population FC drawn from
        *_desc-planted_timeseries.tsv                            latent parcel series
        *_desc-planted_outliers.tsv                              motion, FD, spikes, physio
  dwi/  *_desc-planted_stat-bundlecount_relmat.tsv               planted SC (same each session)
        *_desc-planted_bundles.tsv                               bundle list
Per subject: sub-X_desc-planted_effects.tsv (planted effects and maintenance class).
BOLD, DWI and T1w of one session share the scanner (world) space: the true parcels of the
BOLD/DWI grids are the dseg resampled by nearest neighbour with the identity transform.
"""
