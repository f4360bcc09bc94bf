"""Workflow graphs build for many option combinations without running (cheap wiring checks)."""

import pytest
from bids_builder import SessionSpec, build_bids

from pipeline.bids import collect_subjects
from workflows.base import init_trajectome_wf
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
@pytest.mark.parametrize("omp_nthreads", [1, 4])
def test_graph_has_one_check_per_input_file(subjects, tmp_path, sloppy, omp_nthreads):
    wf = init_trajectome_wf(
        subjects=subjects,
        output_dir=tmp_path,
        version="1.2.3",
        omp_nthreads=omp_nthreads,
        sloppy=sloppy,
    )
    assert wf.name == "trajectome_1_2_wf"
    names = set(wf.list_node_names())
    assert {
        "sub_01_wf.ses_pre_wf.check_t1w_0",
        "sub_01_wf.ses_pre_wf.check_bold_task_rest_run_1",
        "sub_01_wf.ses_pre_wf.check_bold_task_rest_run_2",
        "sub_01_wf.ses_pre_wf.check_dwi_run",
        "sub_01_wf.ses_post_wf.check_bold_task_rest",
        "sub_01_wf.ds_sessions",
        "sub_02_wf.session_wf.check_dwi_run",
    } <= names
    assert not any("ses_post_wf.check_dwi" in n for n in names)
    assert not any(n.startswith("sub_02_wf.session_wf.check_t1w") for n in names)
    assert "*Trajectome* 1.2.3" in collect_methods(wf)[0]
