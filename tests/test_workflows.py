"""Workflow graphs build for many option combinations without running (cheap wiring checks)."""

import pytest
from bids_builder import SessionSpec, build_bids

from pipeline.bids import collect_subjects
from workflows.anat import AtlasFiles
from workflows.base import Options, init_trajectome_wf
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
        options=Options(modalities=("anat",), anat_reference=anat_reference),
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
    # sub-02 has no T1w: no anatomy, but its sessions table is still written
    assert "sub_02_wf.ds_sessions" in names
    assert not any(n.startswith("sub_02_wf.anat_wf") for n in names)
    preproc = wf.get_node("sub_01_wf.anat_wf.preproc_ses_pre")
    assert preproc.inputs.settings == ("sloppy" if sloppy else "default")
    assert preproc.n_procs == 2
    methods = collect_methods(wf)
    assert "*Trajectome* 1.2.3" in methods[0]
    assert any("N4" in text for text in methods)


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
