"""Tests of the ground-truth simulator (``pipeline.simulate``) on the ``tiny`` preset."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from pipeline.atlas import build_default_atlas
from pipeline.simulate import get_config, main, simulate_dataset
from pipeline.simulate.effects import DMN, VIS
from pipeline.simulate.oracle import fa_contrast, labels_on_grid, oracle_fc

SEED = 7
SESSIONS = ("preECT", "postECT", "maintenance")
GT = Path("derivatives") / "groundtruth"
ATLAS = "Seitzman300"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sim") / "ds"
    return simulate_dataset(root, n_patients=1, n_controls=1, seed=SEED, preset="tiny")


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _relmat(root: Path, sub: str, ses: str, desc: str) -> pd.DataFrame:
    name = (
        f"sub-{sub}_ses-{ses}_task-rest_atlas-{ATLAS}_desc-{desc}"
        "_stat-pearsoncorrelation_relmat.tsv"
    )
    return pd.read_csv(
        root / GT / f"sub-{sub}" / f"ses-{ses}" / "func" / name, sep="\t", index_col=0
    )


def _effects(root: Path, sub: str) -> pd.DataFrame:
    path = root / GT / f"sub-{sub}" / f"sub-{sub}_desc-planted_effects.tsv"
    return pd.read_csv(path, sep="\t").set_index("effect")


def _validator() -> str | None:
    local = Path(sys.executable).with_name("bids-validator-deno")
    return str(local) if local.exists() else shutil.which("bids-validator-deno")


def test_layout_and_tables(dataset: Path) -> None:
    parts = pd.read_csv(dataset / "participants.tsv", sep="\t")
    assert parts["participant_id"].tolist() == ["sub-pat01", "sub-ctl01"]
    assert parts["group"].tolist() == ["patient", "control"]
    sessions = pd.read_csv(dataset / "sub-pat01" / "sub-pat01_sessions.tsv", sep="\t")
    assert sessions.columns.tolist() == ["session_id", "acq_time"]
    times = pd.to_datetime(sessions["acq_time"])
    gaps = (times - times.iloc[0]).dt.days.tolist()
    assert gaps[0] == 0 and 24 <= gaps[1] <= 32 and 170 <= gaps[2] <= 190
    cfg = get_config("tiny")
    bold = nb.load(
        dataset / "sub-pat01/ses-postECT/func/sub-pat01_ses-postECT_task-rest_bold.nii.gz"
    )
    assert bold.shape[3] == cfg.volumes
    assert bold.header.get_zooms()[3] == pytest.approx(cfg.tr)
    bvals = np.loadtxt(dataset / "sub-ctl01/ses-preECT/dwi/sub-ctl01_ses-preECT_dwi.bval")
    bvecs = np.loadtxt(dataset / "sub-ctl01/ses-preECT/dwi/sub-ctl01_ses-preECT_dwi.bvec")
    assert (bvals == 0).sum() == cfg.n_b0 and (bvals == cfg.bval).sum() == cfg.directions
    norms = np.linalg.norm(bvecs[:, bvals > 0], axis=0)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_bids_validator_zero_errors(dataset: Path) -> None:
    exe = _validator()
    if exe is None:
        pytest.skip("bids-validator-deno not installed")
    proc = subprocess.run(
        [exe, "--json", str(dataset)], capture_output=True, text=True, timeout=300
    )
    import json

    report = json.loads(proc.stdout)
    errors = [i for i in report["issues"]["issues"] if i.get("severity") == "error"]
    assert errors == []


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    kwargs = {"n_patients": 1, "n_controls": 0, "sessions": ("postECT",), "preset": "tiny"}
    a = _hashes(simulate_dataset(tmp_path / "a", seed=3, **kwargs))
    b = _hashes(simulate_dataset(tmp_path / "b", seed=3, **kwargs))
    assert a == b
    c = _hashes(simulate_dataset(tmp_path / "c", seed=4, **kwargs))
    assert a.keys() == c.keys()
    bold = "sub-pat01/ses-postECT/func/sub-pat01_ses-postECT_task-rest_bold.nii.gz"
    assert a[bold] != c[bold]


def test_adding_a_subject_keeps_the_others(tmp_path: Path, dataset: Path) -> None:
    # a cohort with 2 patients must reproduce sub-pat01 of the fixture byte for byte
    root = simulate_dataset(
        tmp_path / "d", n_patients=2, n_controls=0, seed=SEED, sessions=("preECT",), preset="tiny"
    )
    rel = Path("sub-pat01/ses-preECT/anat/sub-pat01_ses-preECT_T1w.nii.gz")
    assert (root / rel).read_bytes() == (dataset / rel).read_bytes()


def test_relmats_symmetric_unit_diagonal_atlas_names(dataset: Path) -> None:
    names = build_default_atlas(2).table["name"].tolist()
    for desc in ("planted", "population"):
        mat = _relmat(dataset, "pat01", "preECT", desc)
        assert mat.columns.tolist() == names and mat.index.tolist() == names
        values = mat.to_numpy()
        np.testing.assert_allclose(values, values.T, atol=1e-12)
        np.testing.assert_allclose(np.diag(values), 1.0)
        assert np.abs(values).max() <= 1.0
    sc_path = (
        dataset
        / GT
        / "sub-pat01/ses-preECT/dwi"
        / f"sub-pat01_ses-preECT_atlas-{ATLAS}_desc-planted_stat-bundlecount_relmat.tsv"
    )
    sc = pd.read_csv(sc_path, sep="\t", index_col=0).to_numpy()
    bundles = pd.read_csv(str(sc_path).replace("stat-bundlecount_relmat", "bundles"), sep="\t")
    assert (sc > 0).sum() == 2 * len(bundles) == 2 * get_config("tiny").n_bundles
    np.testing.assert_array_equal(sc, sc.T)
    assert (bundles["network_a"].eq(DMN) & bundles["network_b"].eq(DMN)).sum() >= 3
    assert (bundles["network_a"] != bundles["network_b"]).any()
    # structure is stable: the same SC at every session
    sc_post = pd.read_csv(
        str(sc_path).replace("preECT", "postECT"), sep="\t", index_col=0
    ).to_numpy()
    np.testing.assert_array_equal(sc, sc_post)


def test_planted_fc_is_correlation_of_latent_series(dataset: Path) -> None:
    stem = "sub-ctl01_ses-maintenance"
    func = dataset / GT / "sub-ctl01/ses-maintenance/func"
    ts = pd.read_csv(
        func / f"{stem}_task-rest_atlas-{ATLAS}_desc-planted_timeseries.tsv.gz", sep="\t"
    ).to_numpy()
    conf = pd.read_csv(func / f"{stem}_task-rest_desc-planted_outliers.tsv", sep="\t")
    keep = conf["non_steady_state"].to_numpy() == 0
    planted = _relmat(dataset, "ctl01", "maintenance", "planted").to_numpy()
    # 4-decimal series and 3-decimal matrix: agreement to rounding
    np.testing.assert_allclose(np.corrcoef(ts[keep].T), planted, atol=2e-3)
    # latent series are band-limited to 0.01-0.08 Hz
    tr = get_config("tiny").tr
    spec = np.abs(np.fft.rfft(ts[keep] - ts[keep].mean(0), axis=0)) ** 2
    freqs = np.fft.rfftfreq(keep.sum(), tr)
    in_band = (freqs >= 0.0095) & (freqs <= 0.0805)
    assert spec[in_band].sum() / spec.sum() > 0.95


def test_planted_effects_signs(dataset: Path) -> None:
    pat, ctl = _effects(dataset, "pat01"), _effects(dataset, "ctl01")
    assert pat.loc["dmn_within_fc", "post"] < pat.loc["dmn_within_fc", "pre"] - 0.08
    # the tiny run (62 volumes) has too few degrees of freedom for the smaller effects to
    # show in the realised FC every time: check them on the population matrices
    nets = build_default_atlas(2).table["network"].to_numpy()
    pop = {ses: _relmat(dataset, "pat01", ses, "population").to_numpy() for ses in SESSIONS}
    sal, fpn = nets == "Salience", nets == "FrontoParietal"
    between = {ses: m[np.ix_(sal, fpn)].mean() for ses, m in pop.items()}
    assert between["postECT"] > between["preECT"] + 0.08
    dmn = nets == DMN
    within = {
        ses: m[np.ix_(dmn, dmn)][np.triu_indices(dmn.sum(), 1)].mean() for ses, m in pop.items()
    }
    assert within["postECT"] < within["preECT"] - 0.1
    hipp = pat.loc["hippocampal_volume"]
    assert 1.02 < hipp["post"] / hipp["pre"] < 1.07
    assert pat.loc["hippocampal_volume", "maintenance_class"] in (
        "regression",
        "stabilisation",
        "continued_remodelling",
    )
    assert (
        ctl.loc["hippocampal_volume", "pre"]
        == ctl.loc["hippocampal_volume", "post"]
        == ctl.loc["hippocampal_volume", "maintenance"]
    )
    assert abs(ctl.loc["dmn_within_fc", "post"] - ctl.loc["dmn_within_fc", "pre"]) < 0.08
    # population FC of a control is the same at every session
    pre = _relmat(dataset, "ctl01", "preECT", "population").to_numpy()
    post = _relmat(dataset, "ctl01", "postECT", "population").to_numpy()
    np.testing.assert_array_equal(pre, post)
    # non-planted networks do not change in the patient's population FC
    nets = build_default_atlas(2).table["network"].to_numpy()
    vis = nets == VIS
    p_pre = _relmat(dataset, "pat01", "preECT", "population").to_numpy()[np.ix_(vis, vis)]
    p_post = _relmat(dataset, "pat01", "postECT", "population").to_numpy()[np.ix_(vis, vis)]
    np.testing.assert_allclose(p_pre, p_post, atol=0.011)


def test_maintenance_follows_class(dataset: Path) -> None:
    row = _effects(dataset, "pat01").loc["hippocampal_volume"]
    acute = row["post"] - row["pre"]
    expected = {"regression": 0.3, "stabilisation": 1.0, "continued_remodelling": 1.5}
    frac = (row["maintenance"] - row["pre"]) / acute
    assert frac == pytest.approx(expected[row["maintenance_class"]], abs=0.05)


def test_native_dseg_reproduces_planted_volumes(dataset: Path) -> None:
    anat = dataset / GT / "sub-pat01/ses-postECT/anat"
    dseg = nb.load(anat / f"sub-pat01_ses-postECT_space-T1w_atlas-{ATLAS}_desc-planted_dseg.nii.gz")
    morph = pd.read_csv(
        anat / f"sub-pat01_ses-postECT_atlas-{ATLAS}_desc-planted_stat-volume_morph.tsv", sep="\t"
    )
    parcels = morph[morph["index"].notna()].astype({"index": int})
    vox = abs(np.linalg.det(dseg.affine[:3, :3]))
    counts = np.bincount(np.asarray(dseg.dataobj).ravel(), minlength=301)[parcels["index"]] * vox
    planted = parcels["volume_mm3"].to_numpy()
    # at the tiny preset's 4 mm voxels parcels > 1500 mm3 (~24 voxels) agree to a median 5 %
    # (max 29 % measured), and the total within 0.1 %
    large = planted > 1500
    assert large.sum() > 100
    assert np.median(np.abs(counts[large] / planted[large] - 1)) < 0.1
    assert np.abs(counts[large] / planted[large] - 1).max() < 0.4
    assert counts.sum() / planted.sum() == pytest.approx(1.0, abs=0.02)
    totals = morph[morph["index"].isna()].set_index("name")["volume_mm3"]
    assert set(totals.index) == {
        "left_hippocampus",
        "right_hippocampus",
        "left_amygdala",
        "right_amygdala",
        "total_intracranial",
    }
    assert 1.0e6 < totals["total_intracranial"] < 2.2e6


def test_true_transform_maps_native_to_mni(dataset: Path) -> None:
    # resampling the atlas through the stored coordinate map reproduces the native dseg
    anat = dataset / GT / "sub-ctl01/ses-preECT/anat"
    stem = "sub-ctl01_ses-preECT"
    xfm = nb.load(anat / f"{stem}_from-MNI152NLin2009aSym_to-T1w_mode-image_xfm.nii.gz")
    dseg = nb.load(anat / f"{stem}_space-T1w_atlas-{ATLAS}_desc-planted_dseg.nii.gz")
    coords = np.asarray(xfm.dataobj, dtype=np.float64)
    from scipy import ndimage

    ijk = np.indices(dseg.shape).reshape(3, -1).T
    world = ijk @ dseg.affine[:3, :3].T + dseg.affine[:3, 3]
    inv = np.linalg.inv(xfm.affine)
    grid_ijk = world @ inv[:3, :3].T + inv[:3, 3]
    mni = np.stack(
        [
            ndimage.map_coordinates(coords[..., c], grid_ijk.T, order=1, mode="nearest")
            for c in range(3)
        ],
        axis=1,
    )
    atlas = build_default_atlas(2).image
    a_inv = np.linalg.inv(atlas.affine)
    a_ijk = np.rint(mni @ a_inv[:3, :3].T + a_inv[:3, 3]).astype(int)
    lab = np.asarray(atlas.dataobj)
    ok = np.all((a_ijk >= 0) & (a_ijk < lab.shape), axis=1)
    got = np.zeros(len(ijk), lab.dtype)
    got[ok] = lab[tuple(a_ijk[ok].T)]
    truth = np.asarray(dseg.dataobj).ravel()
    inside = truth > 0
    assert (got[inside] == truth[inside]).mean() > 0.9


def test_oracle_fc_recovers_planted(dataset: Path) -> None:
    # measured 0.74-0.80 at the tiny preset (6 mm, 64 volumes); 0.90 at the example preset
    r, _, _ = oracle_fc(dataset, "pat01", "preECT")
    assert r > 0.65


def test_dwi_fa_higher_in_bundles_than_grey_matter(dataset: Path) -> None:
    fa_bundle, fa_gm = fa_contrast(dataset, "ctl01", "postECT")
    assert fa_bundle > 0.35 and fa_gm < 0.2


def test_outliers_fd_matches_motion(dataset: Path) -> None:
    conf = pd.read_csv(
        dataset / GT / "sub-pat01/ses-preECT/func/"
        "sub-pat01_ses-preECT_task-rest_desc-planted_outliers.tsv",
        sep="\t",
    )
    motion = conf[["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]].to_numpy()
    diff = np.abs(np.diff(motion, axis=0))
    fd = diff[:, :3].sum(1) + 50 * diff[:, 3:].sum(1)
    np.testing.assert_allclose(conf["framewise_displacement"].to_numpy()[1:], fd, atol=1e-5)
    spikes = conf["spike"].to_numpy() == 1
    assert spikes.sum() >= 1 and conf["framewise_displacement"][spikes].min() > 1.0
    assert conf["non_steady_state"].sum() == get_config("tiny").dummies
    # non-steady-state volumes are bright
    bold = nb.load(dataset / "sub-pat01/ses-preECT/func/sub-pat01_ses-preECT_task-rest_bold.nii.gz")
    means = np.asarray(bold.dataobj, dtype=np.float32).mean(axis=(0, 1, 2))
    assert means[0] > 1.2 * np.median(means)


def test_cli_rejects_bad_sessions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--sessions", "baseline"])
    assert main([str(tmp_path / "y"), "--subjects", "0", "--controls", "0", "-q"]) == 2
    assert "at least one subject" in capsys.readouterr().err


def test_labels_on_grid_identity() -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 5, (7, 8, 9)).astype(np.int16)
    img = nb.Nifti1Image(data, np.diag([-2.0, 2.0, 2.0, 1.0]))
    np.testing.assert_array_equal(labels_on_grid(img, img), data)


def test_coupling_follows_the_class_on_the_metric_scale() -> None:
    # the population DMN SC-FC coupling (the planted metric) moves by the class's fraction
    # of its acute change, although the metric is concave in the factor loading behind it
    from dataclasses import replace

    from pipeline.simulate import bundles as bundles_mod
    from pipeline.simulate import effects
    from pipeline.simulate.mni import load_mni_model

    model = load_mni_model(2)
    rng = np.random.default_rng(3)
    design = effects.draw_group_design(rng, model.table)
    bundles = bundles_mod.select_bundles(rng, model, 40)
    seen = set()
    for index in range(3):
        subject = effects.draw_subject_effects(rng, "patient", index, design, len(model.table),
                                               bundles["strength"].to_numpy())
        sc = bundles_mod.sc_matrix(bundles, subject.bundle_counts, model.table)
        calibrated = effects.calibrate_coupling(model.table, design, subject, bundles, sc)
        c = {role: effects.population_coupling(model.table, design, calibrated,
                                               calibrated.params(role), bundles, sc)
             for role in ("pre", "post", "maintenance")}
        assert c["post"] - c["pre"] == pytest.approx(subject.delta["kappa"], abs=1e-8)
        factor = effects.MAINTENANCE_FACTORS[subject.maintenance_class]
        assert c["maintenance"] - c["post"] == pytest.approx(factor * subject.delta["kappa"],
                                                             abs=1e-8)
        assert calibrated.params("pre") == subject.params("pre")
        seen.add(subject.maintenance_class)
    assert seen == set(effects.CLASSES)
    # a change beyond the model's reach shrinks to what it can reach, for every role alike
    greedy = replace(subject, delta={**subject.delta, "kappa": 0.9})
    capped = effects.calibrate_coupling(model.table, design, greedy, bundles, sc)
    assert 0 < capped.delta["kappa"] < 0.9
    c = {role: effects.population_coupling(model.table, design, capped, capped.params(role),
                                           bundles, sc)
         for role in ("pre", "post", "maintenance")}
    assert c["post"] - c["pre"] == pytest.approx(capped.delta["kappa"], abs=1e-8)
    assert c["maintenance"] - c["post"] == pytest.approx(factor * capped.delta["kappa"],
                                                         abs=1e-8)
    control = effects.draw_subject_effects(rng, "control", 0, design, len(model.table),
                                           bundles["strength"].to_numpy())
    assert effects.calibrate_coupling(model.table, design, control, bundles, sc) is control
