"""Workflow graphs build for many option combinations without running (cheap wiring checks)."""

import pytest
from bids_builder import SessionSpec, build_bids

from pipeline.bids import collect_subjects
from workflows.anat import AtlasFiles
from workflows.base import FuncOptions, Options, init_trajectome_wf
from workflows.engine import collect_methods


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    root = build_bids(
        tmp_path_factory.mktemp("wf") / "ds",
        {
            "01": {"pre": SessionSpec(bold=2), "post": SessionSpec(dwi=0)},
            "02": {None: SessionSpec(t1w=0)},
        },
    )
    return collect_subjects(root)


@pytest.mark.parametrize("sloppy", [False, True])
@pytest.mark.parametrize("anat_reference", ["unbiased", "first", "sessionwise"])
def test_graph_builds_for_every_anat_reference(subjects, tmp_path, sloppy, anat_reference):
    atlas = AtlasFiles("Test", tmp_path / "atlas.nii.gz", tmp_path / "atlas.tsv")
    atlas.image.touch()
    atlas.table.touch()
    wf = init_trajectome_wf(
        subjects=subjects,
        output_dir=tmp_path,
        version="1.2.3",
        atlases=[atlas],
        options=Options(modalities=("anat",), anat_reference=anat_reference,
                        registration_nthreads=2),
        omp_nthreads=2,
        sloppy=sloppy,
    )
    assert wf.name == "trajectome_1_2_wf"
    names = set(wf.list_node_names())
    assert {
        "sub_01_wf.ds_sessions",
        "sub_01_wf.anat_wf.preproc_ses_pre",
        "sub_01_wf.anat_wf.preproc_ses_post",
        "sub_01_wf.anat_wf.subject_template",
        "sub_01_wf.anat_wf.volumes_Test_ses_pre",
        "sub_01_wf.anat_wf.ds_ses_post_Test_T1w_dseg",
        "sub_01_wf.metrics_Test_ses_pre",
        "sub_01_wf.ds_metrics_Test_ses_post",
    } <= names
    assert not any("func_" in n or "dwi_" in n for n in names)
    shared = "sub_01_wf.anat_wf.template_to_mni" in names
    assert shared == (anat_reference != "sessionwise")
    warps = {n for n in names if ".anat_wf.to_template_" in n}
    warped = {"unbiased": {"pre", "post"}, "first": {"post"}, "sessionwise": set()}
    assert warps == {f"sub_01_wf.anat_wf.to_template_ses_{s}" for s in warped[anat_reference]}
    if warps:
        # the per-session warps wait for the rigid template only: they run side by side
        # with each other and with the template's MNI registration
        import networkx as nx

        flat = wf._create_flat_graph()
        by_name = {n.fullname.split(".", 1)[1]: n for n in flat.nodes}
        for warp in warps:
            upstream = {n.fullname.split(".", 1)[1] for n in nx.ancestors(flat, by_name[warp])}
            assert "sub_01_wf.anat_wf.subject_template" in upstream
            assert not (warps | {"sub_01_wf.anat_wf.template_to_mni"}) & upstream
    # sub-02 has no T1w: no anatomy, but its sessions table is still written
    assert "sub_02_wf.ds_sessions" in names
    assert not any(n.startswith("sub_02_wf.anat_wf") for n in names)
    preproc = wf.get_node("sub_01_wf.anat_wf.preproc_ses_pre")
    assert preproc.inputs.settings == ("sloppy" if sloppy else "default")
    assert preproc.n_procs == preproc.inputs.num_threads == 2
    methods = collect_methods(wf)
    assert "*Trajectome* 1.2.3" in methods[0]
    assert any("N4" in text for text in methods)


def test_full_graph_feeds_every_connectome_into_the_metrics(subjects, tmp_path):
    from pipeline.citations import select_bibtex

    atlas = AtlasFiles("Test", tmp_path / "atlas.nii.gz", tmp_path / "atlas.tsv")
    atlas.image.touch()
    atlas.table.write_text("index\tname\tnetwork\n1\ta\tDefault\n")
    wf = init_trajectome_wf(subjects=subjects, output_dir=tmp_path, version="1.2.3",
                            atlases=[atlas], options=Options(), omp_nthreads=2, sloppy=True)
    flat = wf._create_flat_graph()  # resolves every connection, as running would
    into = {}
    for src, dst, data in flat.edges(data=True):
        into.setdefault(dst.fullname, set()).update(f"{src.fullname}:{a}" for a, _ in
                                                    data["connect"])
    pre = into["trajectome_1_2_wf.sub_01_wf.metrics_Test_ses_pre"]
    assert {s.rsplit(".", 1)[-1].split(":")[0] for s in pre} >= {
        "pick_fc_relmat_metrics_Test_ses_pre", "pick_fc_timeseries_metrics_Test_ses_pre",
        "pick_sc_relmat_metrics_Test_ses_pre", "pick_volumes_metrics_Test_ses_pre"}
    post = into["trajectome_1_2_wf.sub_01_wf.metrics_Test_ses_post"]  # no DWI there
    assert not any("pick_sc_" in s for s in post) and any("pick_fc_relmat" in s for s in post)
    preproc = wf.get_node("sub_01_wf.anat_wf.preproc_ses_pre")
    coreg = [n for n in wf.list_node_names() if ".coreg_" in n]
    assert preproc.n_procs == 1 and coreg  # registration single-threaded by default
    assert wf.get_node(coreg[0]).inputs.num_threads == 1
    bib = select_bibtex("\n".join(collect_methods(wf)))
    assert "{qsiprep," not in bib and "{satterthwaite2013," in bib  # raw DWI path, 36P text
    for key in ("trajectome", "nipype1", "ants", "dipy", "power2012", "ciric2017", "xcpd",
                "rubinov2010", "baum2020", "vazquezrodriguez2019", "honey2009", "kunsch1989"):
        assert f"{{{key}," in bib
    # the metrics paragraph closes the methods: it describes what the others produced
    methods = collect_methods(wf)
    assert methods[-1].startswith("Network measures were computed")
    assert "consensus over 100 runs" in methods[-1] and "(seed 42)" in methods[-1]


def test_methods_without_diffusion_leave_coupling_out():
    from workflows.base import MetricOptions, metrics_methods

    text = metrics_methods(MetricOptions(graph_density=0.1), ("anat", "func"), seed=7)
    assert "density of 0.1" in text and "(seed 7)" in text
    assert "coupling" not in text and "Jacobian" in text


def _fake_fmriprep(subjects, root):
    """Empty fMRIPrep outputs for every BOLD run (the graph only checks that they exist)."""
    from workflows.interfaces.func import find_fmriprep_run

    for subject in subjects:
        for session in subject.sessions:
            for run in session.bold:
                stem = run.path.name.split(".nii")[0].removesuffix("_bold")
                folder = root / f"sub-{subject.label}"
                folder = (folder / f"ses-{session.label}" if session.label else folder) / "func"
                folder.mkdir(parents=True, exist_ok=True)
                for suffix in ("space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz",
                               "space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz",
                               "desc-confounds_timeseries.tsv"):
                    (folder / f"{stem}_{suffix}").touch()
                assert find_fmriprep_run(root, run.path)["bold"]  # the layout the app reads


@pytest.mark.parametrize(
    ("modalities", "with_fmriprep", "anatomy"),
    [
        (("func",), True, False),   # template-space BOLD: nothing needs the T1w
        (("func",), False, True),   # raw BOLD: coregistration and MNI resampling need it
        (("func", "dwi"), True, True),  # DWI always uses the anatomy
        (("anat", "func"), True, True),
    ],
)
def test_anatomy_built_only_when_needed(subjects, tmp_path, modalities, with_fmriprep, anatomy):
    atlas = AtlasFiles("Test", tmp_path / "atlas.nii.gz", tmp_path / "atlas.tsv")
    atlas.image.touch()
    atlas.table.write_text("index\tname\tnetwork\n1\ta\tDefault\n")
    fmriprep = tmp_path / "fmriprep" if with_fmriprep else None
    if fmriprep:
        _fake_fmriprep(subjects, fmriprep)
    options = Options(modalities=modalities, func=FuncOptions(fmriprep_dir=fmriprep))
    wf = init_trajectome_wf(subjects=subjects, output_dir=tmp_path, version="1.2.3",
                            atlases=[atlas], options=options, sloppy=True)
    flat = wf._create_flat_graph()
    names = {n.fullname for n in flat.nodes}
    into = {}
    for src, dst, data in flat.edges(data=True):
        into.setdefault(dst.fullname, set()).update(f"{src.fullname}:{a}" for a, _ in
                                                    data["connect"])
    prefix = "trajectome_1_2_wf.sub_01_wf."
    assert any(n.startswith(prefix + "anat_wf.") for n in names) == anatomy
    for ses in ("pre", "post"):
        feeds = {s.split(":")[0].rsplit(".", 1)[-1]
                 for s in into[f"{prefix}metrics_Test_ses_{ses}"]}
        # FC always reaches the metrics; volumes only when the anatomy exists
        assert {f"pick_fc_relmat_metrics_Test_ses_{ses}",
                f"pick_fc_timeseries_metrics_Test_ses_{ses}"} <= feeds
        assert (f"pick_volumes_metrics_Test_ses_{ses}" in feeds) == anatomy
        func = f"{prefix}func_ses_{ses}_wf."
        coreg = [dst for dst in into if dst.startswith(func + "coreg_")]
        assert bool(coreg) != with_fmriprep  # the raw path registers BOLD to the T1w
        if coreg:
            assert all(f"{func}inputnode:t1w_preproc" in into[dst] for dst in coreg)
            assert any(".anat_wf." in s for s in into[func + "inputnode"])
    # sub-02 has no T1w: from fMRIPrep it still gets FC, never an anatomy
    sub02 = "trajectome_1_2_wf.sub_02_wf."
    assert not any(n.startswith(sub02 + "anat_wf.") for n in names)
    assert any(n.startswith(sub02 + "func_") for n in names) == with_fmriprep


@pytest.mark.parametrize(
    ("fullname", "expected"),
    [
        ("t_wf.sub_01_wf.anat_wf.preproc_ses_preECT", ("01", "preECT", "preproc_ses_preECT")),
        ("t_wf.sub_01_wf.ses_pre_wf.check_t1w_0", ("01", "pre", "check_t1w_0")),
        ("t_wf.sub_01_wf.anat_wf.subject_template", ("01", None, "subject_template")),
        ("t_wf.sub_A1_wf.anat_wf.ds_ses_fu2_preproc_T1w", ("A1", "fu2", "ds_ses_fu2_preproc_T1w")),
    ],
)
def test_locate_names_subject_and_session(fullname, expected):
    from workflows.run import locate

    assert locate(fullname) == expected


def test_one_session_subject_template_transforms_stay_a_list(tmp_path):
    """A one-session subject's template transforms feed the per-session Split (it crashed
    when Nipype unwrapped the one-element output to a string)."""
    from nipype.interfaces import utility as niu

    from workflows.interfaces.anat import SubjectTemplate

    path = tmp_path / "to_template_ses_preECT.json"
    path.write_text("{}")
    outputs = SubjectTemplate.output_spec()
    outputs.transforms = [str(path)]
    split = niu.Split(splits=[1], squeeze=True)
    split.inputs.inlist = outputs.get()["transforms"]
    assert split.run().outputs.out1 == str(path)


def test_regional_volumes_write_jacobian_volumes_with_their_error(tmp_path):
    # a session that is the template scaled by 1.1 per axis: every Jacobian volume is
    # 1.331 x the template's, so the registration noise floor (and every se) is zero
    import nibabel as nb
    import numpy as np
    import pandas as pd

    from pipeline.registration import Transform, affine_to_ants_file, save_transform
    from workflows.interfaces.anat import RegionalVolumes

    n = 24
    labels = np.zeros((24, 20, 20), np.int16)
    for k in range(n):
        labels[k, 2:2 + 4 + k % 5, 3:15] = k + 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    table = pd.DataFrame({
        "index": np.arange(1, n + 1), "name": [f"p{k}" for k in range(n)],
        "network": "N", "anatomy": ["hippocampus"] * 2 + ["cortex"] * (n - 2),
        "hemisphere": "L",
    })
    table.to_csv(tmp_path / "atlas.tsv", sep="\t", index=False)
    nb.save(nb.Nifti1Image(labels, affine), tmp_path / "labels.nii.gz")
    nb.save(nb.Nifti1Image((labels > 0).astype(np.uint8), affine), tmp_path / "mask.nii.gz")
    # fixed (template) point -> moving (session) point: x 1.1
    mat = affine_to_ants_file(np.diag([1.1, 1.1, 1.1, 1.0]), tmp_path / "scale.mat")
    save_transform(Transform(((mat, False),), ((mat, True),), "session", "template", (mat,)),
                   tmp_path / "to_template.json")
    result = RegionalVolumes(
        atlas_table=str(tmp_path / "atlas.tsv"), native_labels=str(tmp_path / "labels.nii.gz"),
        brain_mask=str(tmp_path / "mask.nii.gz"), template_labels=str(tmp_path / "labels.nii.gz"),
        to_template=str(tmp_path / "to_template.json"),
    ).run(cwd=str(tmp_path))
    out = pd.read_csv(result.outputs.out_file, sep="\t").set_index("region")
    assert (out["method"] == "jacobian").all()
    parcels = out.loc[table["name"]]
    np.testing.assert_allclose(parcels["volume_mm3"] / parcels["volume_labelcount_mm3"], 1.331,
                               rtol=1e-3)
    np.testing.assert_allclose(parcels["volume_se_mm3"], 0.0, atol=1e-2)
    assert out.loc["hippocampus_L", "volume_se_mm3"] == pytest.approx(0.0, abs=1e-3)
    assert np.isnan(out.loc["TICV", "volume_se_mm3"])
