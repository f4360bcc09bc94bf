"""Tests of the session model (pipeline/bids.py) on small fake BIDS datasets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bids_builder import (
    BOLD_SHAPE,
    BVALS,
    DWI_SHAPE,
    T1W_SHAPE,
    SessionSpec,
    build_bids,
    standard_dataset,
)

from pipeline.bids import (
    ROLES,
    BIDSInputError,
    collect_subjects,
    infer_role,
    load_layout,
    natural_key,
    parse_session_roles,
    session_table,
    strip_prefix,
)


@pytest.fixture(scope="module")
def std_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return standard_dataset(tmp_path_factory.mktemp("std") / "ds")


@pytest.fixture(scope="module")
def std_layout(std_root: Path):
    return load_layout(std_root)


def _summary(subjects) -> list[tuple]:
    return [(s.subject, s.label, s.role, s.order) for sub in subjects for s in sub.sessions]


# ----------------------------------------------------------------------------- labels
@pytest.mark.parametrize(
    ("label", "role"),
    [("pre", "pre"), ("PreECT", "pre"), ("baseline", "pre"), ("ses-post", "post"),
     ("postECT", "post"), ("maint2", "maintenance"), ("followup", "maintenance"),
     ("FU10", "maintenance"), ("1", None), ("A", None), ("ses-2", None)],
)
def test_infer_role(label: str, role: str | None) -> None:
    assert infer_role(label) == role


def test_strip_prefix_and_natural_sort() -> None:
    assert strip_prefix("sub-01", "sub") == "01"
    assert strip_prefix("01", "sub-") == "01"
    assert strip_prefix("ses-sub-x", "sub") == "ses-sub-x"  # only a leading prefix
    assert sorted(["fu10", "fu2", "FU1", "pre"], key=natural_key) == ["FU1", "fu2", "fu10", "pre"]


def test_parse_session_roles() -> None:
    assert parse_session_roles(["ses-A=Post", "B=pre", "C=maintenance", "D=baseline"]) == {
        "A": "post", "B": "pre", "C": "maintenance", "D": "pre"}
    with pytest.raises(BIDSInputError, match="expected LABEL=ROLE"):
        parse_session_roles(["A"])
    with pytest.raises(BIDSInputError, match="unknown session role 'middle'"):
        parse_session_roles(["A=middle"])
    with pytest.raises(BIDSInputError, match="two roles"):
        parse_session_roles(["A=pre", "ses-A=post"])


# ----------------------------------------------------------------------------- model
def test_standard_dataset(std_root: Path, std_layout) -> None:
    subjects = collect_subjects(std_root, layout=std_layout)
    assert [(s.label, s.group) for s in subjects] == [
        ("01", "patient"), ("02", "patient"), ("03", "control")]
    assert _summary(subjects) == [
        ("01", "pre", "pre", 1), ("01", "post", "post", 2),
        ("01", "fu1", "maintenance", 3), ("01", "fu2", "maintenance", 4),
        ("02", "pre", "pre", 1), ("02", "post", "post", 2),
        ("03", "pre", "pre", 1),  # single session: cross-sectional, role still inferred
    ]
    pre = subjects[0].sessions[0]
    ses_dir = std_root.resolve() / "sub-01" / "ses-pre"
    assert pre.acq_time == "2021-01-04T09:00:00"
    assert pre.t1w == (ses_dir / "anat" / "sub-01_ses-pre_T1w.nii.gz",)
    (bold,) = pre.bold
    assert bold.path == ses_dir / "func" / "sub-01_ses-pre_task-rest_bold.nii.gz"
    assert bold.repetition_time == 2.0
    assert bold.metadata["TaskName"] == "rest"
    assert bold.entities["task"] == "rest" and bold.entities["session"] == "pre"
    (dwi,) = pre.dwi
    assert dwi.path == ses_dir / "dwi" / "sub-01_ses-pre_dwi.nii.gz"
    assert dwi.bval == ses_dir / "dwi" / "sub-01_ses-pre_dwi.bval"
    assert dwi.bvec == ses_dir / "dwi" / "sub-01_ses-pre_dwi.bvec"
    assert [int(v) for v in dwi.bval.read_text().split()] == list(BVALS)
    assert pre.missing_modalities == ()
    assert pre.bids_entities == {"subject": "01", "session": "pre"}
    assert pre.name == "sub-01_ses-pre"

    post02 = subjects[1].sessions[1]
    assert post02.dwi == () and len(post02.bold) == 1 and len(post02.t1w) == 1
    assert post02.missing_modalities == ("dwi",)
    assert post02.acq_time is None


def test_session_table(std_root: Path, std_layout) -> None:
    table = session_table(collect_subjects(std_root, layout=std_layout))
    assert list(table.columns) == ["subject", "session", "role", "order", "acq_time", "group",
                                   "n_t1w", "n_bold", "n_dwi", "missing"]
    assert table["session"].tolist() == ["pre", "post", "fu1", "fu2", "pre", "post", "pre"]
    assert table["order"].tolist() == [1, 2, 3, 4, 1, 2, 1]
    assert table["n_dwi"].tolist() == [1, 1, 1, 1, 1, 0, 1]
    assert table["missing"].tolist() == ["", "", "", "", "", "dwi", ""]
    assert table["group"].tolist() == ["patient"] * 6 + ["control"]


def test_labels_with_and_without_prefix(std_root: Path, std_layout) -> None:
    plain = collect_subjects(std_root, layout=std_layout, participant_labels=["01", "02"],
                             session_labels=["post", "fu2"])
    prefixed = collect_subjects(std_root, layout=std_layout,
                                participant_labels=["sub-01", "sub-02"],
                                session_labels=["ses-post", "ses-fu2"])
    assert plain == prefixed
    # selection keeps role and order computed over all sessions of the subject
    assert _summary(plain) == [("01", "post", "post", 2), ("01", "fu2", "maintenance", 4),
                               ("02", "post", "post", 2)]


def test_subject_without_selected_session_is_dropped(std_root: Path, std_layout) -> None:
    subjects = collect_subjects(std_root, layout=std_layout, session_labels=["fu1"])
    assert _summary(subjects) == [("01", "fu1", "maintenance", 3)]


def test_unknown_labels_list_existing(std_root: Path, std_layout) -> None:
    with pytest.raises(BIDSInputError, match="--participant-label") as err:
        collect_subjects(std_root, layout=std_layout, participant_labels=["sub-01", "sub-09"])
    assert "09" in str(err.value) and "sub-01, sub-02, sub-03" in str(err.value)
    with pytest.raises(BIDSInputError, match="--session-label") as err:
        collect_subjects(std_root, layout=std_layout, session_labels=["ses-maint"])
    assert "label(s) maint;" in str(err.value)
    assert "ses-fu1, ses-fu2, ses-post, ses-pre" in str(err.value)
    with pytest.raises(BIDSInputError, match="--session-roles") as err:
        collect_subjects(std_root, layout=std_layout, session_roles={"fu3": "maintenance"})
    assert "ses-fu1, ses-fu2, ses-post, ses-pre" in str(err.value)


def test_layout_built_when_not_given(std_root: Path, std_layout) -> None:
    assert collect_subjects(std_root) == collect_subjects(std_root, layout=std_layout)


def test_unequal_sessions_and_missing_modalities(tmp_path: Path) -> None:
    root = build_bids(tmp_path / "ds", {
        "01": {"pre": SessionSpec(bold=2), "post": SessionSpec(t1w=0, bold=0)},
        "02": {"baseline": SessionSpec(dwi=0), "post": SessionSpec(),
               "maint": SessionSpec(t1w=0, dwi=0)},
    })
    subjects = collect_subjects(root)
    assert _summary(subjects) == [
        ("01", "pre", "pre", 1), ("01", "post", "post", 2),
        ("02", "baseline", "pre", 1), ("02", "post", "post", 2),
        ("02", "maint", "maintenance", 3)]
    s1, s2 = subjects
    assert [len(s.bold) for s in s1.sessions] == [2, 0]
    assert [r.entities["run"] for r in s1.sessions[0].bold] == [1, 2]
    assert [s.missing_modalities for s in s1.sessions] == [(), ("t1w", "bold")]
    assert [s.missing_modalities for s in s2.sessions] == [("dwi",), (), ("t1w", "dwi")]
    assert s1.group is None  # no group column in participants.tsv


def test_single_session_subject_needs_no_role(tmp_path: Path) -> None:
    root = build_bids(tmp_path / "ds", {
        "01": {"A": SessionSpec()},
        "02": {"pre": SessionSpec(), "post": SessionSpec()},
    })
    assert _summary(collect_subjects(root)) == [
        ("01", "A", None, 1), ("02", "pre", "pre", 1), ("02", "post", "post", 2)]
    # a role can still be given to the single session
    subjects = collect_subjects(root, participant_labels=["01"], session_roles=["A=post"])
    assert _summary(subjects) == [("01", "A", "post", 1)]


def test_dataset_without_session_level(tmp_path: Path) -> None:
    root = build_bids(tmp_path / "ds", {"01": {None: SessionSpec()},
                                        "02": {None: SessionSpec(bold=0)}},
                      groups={"01": "Patient", "02": "control"})
    subjects = collect_subjects(root)
    assert _summary(subjects) == [("01", None, None, 1), ("02", None, None, 1)]
    ses = subjects[0].sessions[0]
    assert subjects[0].group == "patient"  # normalised to lower case
    assert ses.t1w == (root.resolve() / "sub-01" / "anat" / "sub-01_T1w.nii.gz",)
    assert ses.bold[0].path.name == "sub-01_task-rest_bold.nii.gz"
    assert ses.dwi[0].bvec.name == "sub-01_dwi.bvec"
    assert ses.bids_entities == {"subject": "01"} and ses.name == "sub-01"
    assert subjects[1].sessions[0].missing_modalities == ("bold",)
    assert session_table(subjects)["session"].tolist() == [None, None]
    with pytest.raises(BIDSInputError, match="no session level"):
        collect_subjects(root, session_labels=["pre"])


def test_unknown_roles_error_says_what_to_pass(tmp_path: Path) -> None:
    root = build_bids(tmp_path / "ds", {"01": {"1": SessionSpec(), "2": SessionSpec()}})
    with pytest.raises(BIDSInputError) as err:
        collect_subjects(root)
    msg = str(err.value)
    assert "sub-01" in msg and "ses-1, ses-2" in msg
    assert "--session-roles 1=pre 2=post" in msg
    assert "ect_phase" in msg and "sub-01_sessions.tsv" in msg
    # with the roles given, the same dataset works
    assert _summary(collect_subjects(root, session_roles=["1=pre", "ses-2=post"])) == [
        ("01", "1", "pre", 1), ("01", "2", "post", 2)]


def test_unknown_roles_suggestion_follows_acq_time(tmp_path: Path) -> None:
    root = build_bids(tmp_path / "ds", {"01": {
        "A": SessionSpec(acq_time="2020-06-01T10:00:00"),
        "B": SessionSpec(acq_time="2020-01-01T10:00:00"),
        "C": SessionSpec(acq_time="2020-09-01T10:00:00")}})
    with pytest.raises(BIDSInputError, match="--session-roles A=post B=pre C=maintenance"):
        collect_subjects(root)


def test_duplicate_pre_is_an_error(tmp_path: Path) -> None:
    root = build_bids(tmp_path / "ds", {"01": {"pre": SessionSpec(), "preECT": SessionSpec(),
                                               "post": SessionSpec()}})
    with pytest.raises(BIDSInputError, match="only 'maintenance' may repeat") as err:
        collect_subjects(root)
    msg = str(err.value)
    assert "ses-pre, ses-preECT all have role 'pre'" in msg
    assert "--session-roles" in msg and "sub-01" in msg
    roles = {"preECT": "pre", "pre": "maintenance"}  # weird but explicit: CLI wins
    assert _summary(collect_subjects(root, session_roles=roles)) == [
        ("01", "preECT", "pre", 1), ("01", "post", "post", 2), ("01", "pre", "maintenance", 3)]


def test_several_maintenance_sessions_allowed(tmp_path: Path) -> None:
    root = build_bids(tmp_path / "ds", {"01": {
        "pre": SessionSpec(), "post": SessionSpec(), "fu10": SessionSpec(),
        "fu2": SessionSpec(), "maint1": SessionSpec()}})
    # no acq_time: role then natural label order (fu2 < fu10 < maint1)
    assert _summary(collect_subjects(root)) == [
        ("01", "pre", "pre", 1), ("01", "post", "post", 2), ("01", "fu2", "maintenance", 3),
        ("01", "fu10", "maintenance", 4), ("01", "maint1", "maintenance", 5)]


def test_acq_time_orders_follow_ups(tmp_path: Path) -> None:
    root = build_bids(tmp_path / "ds", {"01": {
        "fu2": SessionSpec(acq_time="2021-09-01T08:00:00"),
        "fu10": SessionSpec(acq_time="2021-03-01T08:00:00"),  # acquired before fu2
        "post": SessionSpec(acq_time="2021-02-01T08:00:00"),
        "pre": SessionSpec(acq_time="2021-01-01T08:00:00Z")}})
    subjects = collect_subjects(root)
    assert _summary(subjects) == [
        ("01", "pre", "pre", 1), ("01", "post", "post", 2),
        ("01", "fu10", "maintenance", 3), ("01", "fu2", "maintenance", 4)]
    assert [s.acq_time for s in subjects[0].sessions] == [
        "2021-01-01T08:00:00Z", "2021-02-01T08:00:00", "2021-03-01T08:00:00",
        "2021-09-01T08:00:00"]


def test_acq_time_contradicting_roles(tmp_path: Path) -> None:
    root = build_bids(tmp_path / "ds", {"01": {
        "pre": SessionSpec(acq_time="2021-05-01T08:00:00"),
        "post": SessionSpec(acq_time="2021-01-01T08:00:00")}})
    with pytest.raises(BIDSInputError, match="contradicts the session roles") as err:
        collect_subjects(root)
    msg = str(err.value)
    assert "ses-pre (pre, 2021-05-01T08:00:00) was acquired after ses-post" in msg
    assert "--session-roles post=pre pre=post" in msg  # suggestion in time order


def test_bad_acq_time_names_file(tmp_path: Path) -> None:
    root = build_bids(tmp_path / "ds", {"01": {"pre": SessionSpec(acq_time="last week"),
                                               "post": SessionSpec()}})
    with pytest.raises(BIDSInputError, match=r"sub-01_sessions\.tsv, session pre: acq_time"):
        collect_subjects(root)


def test_ect_phase_column(tmp_path: Path) -> None:
    root = build_bids(tmp_path / "ds", {"01": {
        "A": SessionSpec(ect_phase="post"), "B": SessionSpec(ect_phase="Pre"),
        "C": SessionSpec(ect_phase="maintenance"), "D": SessionSpec(ect_phase="follow-up")}})
    assert _summary(collect_subjects(root)) == [
        ("01", "B", "pre", 1), ("01", "A", "post", 2), ("01", "C", "maintenance", 3),
        ("01", "D", "maintenance", 4)]


def test_ect_phase_wins_over_label_and_cli_wins_over_both(tmp_path: Path) -> None:
    # labels say pre/post, ect_phase says the opposite
    root = build_bids(tmp_path / "ds", {"01": {
        "pre": SessionSpec(ect_phase="post"), "post": SessionSpec(ect_phase="pre")}})
    assert _summary(collect_subjects(root)) == [("01", "post", "pre", 1),
                                                ("01", "pre", "post", 2)]
    assert _summary(collect_subjects(root, session_roles=["pre=pre", "post=post"])) == [
        ("01", "pre", "pre", 1), ("01", "post", "post", 2)]
    # a partial CLI mapping only overrides the sessions it names
    with pytest.raises(BIDSInputError, match="all have role 'pre'"):
        collect_subjects(root, session_roles={"ses-pre": "pre"})


def test_bad_ect_phase_value(tmp_path: Path) -> None:
    root = build_bids(tmp_path / "ds", {"01": {"A": SessionSpec(ect_phase="during"),
                                               "B": SessionSpec(ect_phase="post")}})
    with pytest.raises(BIDSInputError, match="ect_phase: unknown session role 'during'"):
        collect_subjects(root)


@pytest.fixture(scope="module")
def multi_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bids(tmp_path_factory.mktemp("multi") / "ds", {"01": {"pre": SessionSpec(
        t1w=[{"acq": "mprage"}, {"acq": "fast"}],
        bold=[{"run": "1"}, {"run": "2"}, {"task": "faces"}],
        dwi=[{}, {"acq": "multi"}],
    )}})


@pytest.mark.parametrize(
    ("bids_filter", "task", "expected"),
    [
        (None, "rest", {"t1w": ["acq-fast", "acq-mprage"], "bold": ["rest_run-1", "rest_run-2"],
                        "dwi": ["acq-multi", "pre_dwi"]}),
        (None, None, {"bold": ["faces", "rest_run-1", "rest_run-2"]}),
        ({"t1w": {"acquisition": "mprage"}, "bold": {"run": 2}, "dwi": {"acq": None}}, "rest",
         {"t1w": ["acq-mprage"], "bold": ["rest_run-2"], "dwi": ["pre_dwi"]}),
        ({"bold": {"task": "faces"}, "dwi": {"acq": "*"}}, "rest",
         {"bold": ["faces"], "dwi": ["acq-multi"]}),
        ({"bold": {"run": [1, 2]}}, None, {"bold": ["rest_run-1", "rest_run-2"]}),
    ],
)
def test_bids_filter(multi_root: Path, bids_filter, task, expected) -> None:
    (sub,) = collect_subjects(multi_root, bids_filter=bids_filter, task=task)
    ses = sub.sessions[0]
    names = {"t1w": [p.name for p in ses.t1w], "bold": [r.path.name for r in ses.bold],
             "dwi": [r.path.name for r in ses.dwi]}
    for modality, fragments in expected.items():
        assert len(names[modality]) == len(fragments), names[modality]
        for name, fragment in zip(sorted(names[modality]), fragments, strict=True):
            assert fragment in name


@pytest.mark.parametrize(
    ("bids_filter", "match"),
    [({"T1w": {"acq": "x"}}, "unknown key"), ({"bold": {"foo": "x"}}, "not a recognized entity"),
     ({"bold": {"session": "pre"}}, "use --session-label"), ({"dwi": {"ses": "pre"}}, "session"),
     ({"t1w": {"subject": "01"}}, "use --participant-label"), ({"dwi": "acq-x"}, "must map")],
)
def test_bad_bids_filter(multi_root: Path, bids_filter, match: str) -> None:
    with pytest.raises(BIDSInputError, match=match):
        collect_subjects(multi_root, bids_filter=bids_filter)


def test_missing_repetition_time_and_bvec_are_left_to_the_preflight(tmp_path: Path) -> None:
    """Indexing keeps such runs; pipeline.inputs rejects them one by one (other runs go on)."""
    from pipeline.inputs import preflight_session

    root = build_bids(tmp_path / "ds", {"01": {None: SessionSpec()}})
    sidecar = root / "sub-01" / "func" / "sub-01_task-rest_bold.json"
    meta = json.loads(sidecar.read_text())
    del meta["RepetitionTime"]
    sidecar.write_text(json.dumps(meta))
    bvec = root / "sub-01" / "dwi" / "sub-01_dwi.bvec"
    bvec.unlink()
    (session,) = collect_subjects(root)[0].sessions
    assert len(session.bold) == 1 and session.dwi[0].bvec == bvec
    usable, problems, _ = preflight_session(session)
    assert usable.t1w and not usable.bold and not usable.dwi
    dwi_message, bold_message = sorted(p.message for p in problems)
    assert "sub-01_task-rest_bold.nii.gz: RepetitionTime is missing" in bold_message
    assert dwi_message.startswith(f"{bvec}: not found, cannot read the gradient table")


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(BIDSInputError, match="does not exist"):
        collect_subjects(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BIDSInputError, match="No subjects"):
        collect_subjects(tmp_path / "empty")


def test_builder_is_deterministic(tmp_path: Path) -> None:
    def digest(root: Path) -> str:
        sha = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            sha.update(str(path.relative_to(root)).encode() + path.read_bytes())
        return sha.hexdigest()

    first = digest(standard_dataset(tmp_path / "a", seed=3))
    assert first == digest(standard_dataset(tmp_path / "b", seed=3))
    assert first != digest(standard_dataset(tmp_path / "c", seed=4))


def test_builder_images(std_root: Path, std_layout) -> None:
    ses = collect_subjects(std_root, layout=std_layout, participant_labels=["01"])[0].sessions[0]
    bold = nib.load(ses.bold[0].path)
    assert bold.shape == BOLD_SHAPE and bold.header.get_zooms()[3] == 2.0
    assert nib.load(ses.t1w[0]).shape == T1W_SHAPE
    dwi = ses.dwi[0]
    assert nib.load(dwi.path).shape == DWI_SHAPE
    bvecs = np.loadtxt(dwi.bvec)
    assert bvecs.shape == (3, len(BVALS)) and np.allclose(np.linalg.norm(bvecs[:, 1:], axis=0), 1)
    custom = build_bids(std_root.parent / "custom", {"01": {None: SessionSpec(
        n_volumes=30, repetition_time=0.8)}})
    img = nib.load(custom / "sub-01" / "func" / "sub-01_task-rest_bold.nii.gz")
    assert img.shape == (*BOLD_SHAPE[:3], 30) and np.isclose(img.header.get_zooms()[3], 0.8)


def test_roles_constant() -> None:
    assert ROLES == ("pre", "post", "maintenance")
