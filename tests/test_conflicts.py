"""Subject-conflict classes of a dataset and metrics split by them (memoir.eval.conflicts)."""
import pytest

from memoir.eval.conflicts import conflict_classes, split_by_class, subject_groups
from memoir.eval.datasets import EditRecord


def _rec(subject, target):
    return EditRecord("q", target, extra={} if subject is None else {"subject": subject})


RECORDS = [
    _rec("USS Leedstown", "Lockheed"),      # 0: conflicts with 1
    _rec(" uss  leedstown", "Embassy"),     # 1: same subject after case/space folding
    _rec("Paris", "France"),                # 2: same answer as 3 (case and spaces ignored)
    _rec("paris", "france "),               # 3
    _rec(None, "x"),                        # 4: no subject: its own group
    _rec(None, "x"),                        # 5
    _rec("Rome", "Italy"),                  # 6
]


def test_subject_groups_fold_case_and_spaces_and_keep_subjectless_records_apart():
    groups = sorted(subject_groups(RECORDS).values())
    assert groups == [[0, 1], [2, 3], [4], [5], [6]]


def test_conflict_classes():
    assert conflict_classes(RECORDS) == ["conflicting", "conflicting", "same_answer", "same_answer",
                                         "unique", "unique", "unique"]
    assert conflict_classes([]) == []


def test_split_by_class_means_and_own_routing():
    # route_gen is the stream position of the edit a rephrase went to; None = no edit fired
    rows = [{"rel": 1.0, "gen": 0.5, "route_gen": 0}, {"rel": 0.0, "gen": 1.0, "route_gen": 0},
            {"rel": 1.0, "gen": None, "route_gen": 2}, {"rel": 0.5, "gen": 0.25, "route_gen": None},
            {"rel": 1.0, "gen": 1.0, "route_gen": 4}, {"rel": 0.0, "gen": 0.0, "route_gen": 4},
            {"rel": 0.5, "gen": 0.5, "route_gen": 6}]
    out = split_by_class(rows, conflict_classes(RECORDS))
    assert out["conflicting"] == {"n": 2, "rel": 0.5, "gen": 0.75, "route_gen_own": 0.5}
    assert out["same_answer"] == {"n": 2, "rel": 0.75, "gen": 0.25, "route_gen_own": 0.5}  # gen None skipped
    assert out["unique"]["n"] == 3 and out["unique"]["route_gen_own"] == pytest.approx(2 / 3)
    assert out["unique"]["rel"] == pytest.approx(0.5)


def test_split_by_class_without_routing_and_with_empty_classes():
    out = split_by_class([{"rel": 1.0, "gen": 0.0}], ["unique"])
    assert out["unique"]["route_gen_own"] is None  # a baseline that does not route
    assert out["conflicting"] == {"n": 0, "rel": None, "gen": None, "route_gen_own": None}


def test_split_by_class_refuses_misaligned_records():
    with pytest.raises(ValueError, match="run's own edits"):
        split_by_class([{"rel": 1.0}], ["unique", "unique"])
