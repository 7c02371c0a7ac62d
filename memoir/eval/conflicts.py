"""Which edits of a dataset are about the same subject, and do they agree?

ZsRE's MEND evaluation file asks about many subjects several times, in different words, with
different requested answers (USS Leedstown "made by" Arleigh Burke-class aircraft carrier /
Embassy Shipbuilding / Lockheed Shipbuilding ...).  A rephrase of one of those questions is a
paraphrase of its siblings too, so no router can tell which sibling's answer it should get; metrics
split by these classes show how much of a Gen shortfall is the data and how much the method.
"""
from __future__ import annotations

from collections import defaultdict

CLASSES = ("unique", "same_answer", "conflicting")


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def subject_groups(records) -> dict[str, list[int]]:
    """Positions of the records by subject (``extra["subject"]``, case- and space-insensitive).

    A record without a subject is a group of its own.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        subject = (rec.extra or {}).get("subject")
        groups[_norm(subject) if subject else f"\0record {i}"].append(i)
    return dict(groups)


def conflict_classes(records) -> list[str]:
    """Per record: ``unique`` subject, shared with records that all want the ``same_answer``, or
    shared with at least one record that wants a different answer (``conflicting``)."""
    out = ["unique"] * len(records)
    for members in subject_groups(records).values():
        if len(members) < 2:
            continue
        answers = {_norm(records[i].target) for i in members}
        for i in members:
            out[i] = "conflicting" if len(answers) > 1 else "same_answer"
    return out


def split_by_class(result_records: list[dict], classes: list[str], keys=("rel", "gen")) -> dict:
    """Mean of each metric in ``keys`` and of ``route_gen_own`` (the rephrase routed to its own edit)
    over the records of each class.

    ``result_records`` are one ``memoir eval`` run's per-edit records and ``classes`` the
    :func:`conflict_classes` of the same edits in the same order (only edits made in the run can conflict).
    """
    if len(result_records) != len(classes):
        raise ValueError(f"{len(result_records)} result records for {len(classes)} classes: pass the run's own edits")
    out = {}
    for name in CLASSES:
        # a record's route_gen is the stream position of the edit its rephrase was routed to (None: off)
        rows = [(pos, r) for pos, (r, c) in enumerate(zip(result_records, classes)) if c == name]
        entry: dict = {"n": len(rows)}
        for key in keys:
            vals = [r[key] for _, r in rows if r.get(key) is not None]
            entry[key] = sum(vals) / len(vals) if vals else None
        routed = [r.get("route_gen") == pos for pos, r in rows if "route_gen" in r]
        entry["route_gen_own"] = sum(routed) / len(routed) if routed else None
        out[name] = entry
    return out
