"""The values the editor API takes and returns (shared by the editor, saving and the harness)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EditRequest:
    prompt: str
    target: str
    subject: str | None = None  # the entity the fact is about (used by the subject router)

    @classmethod
    def coerce(cls, item) -> "EditRequest":
        if isinstance(item, EditRequest):
            return item
        if isinstance(item, dict):
            missing = [k for k in ("prompt", "target") if not isinstance(item.get(k), str) or not item.get(k).strip()]
            if missing:
                raise ValueError(f"edit request {item!r} lacks a non-empty {' and '.join(missing)}")
            subject = item.get("subject")
            if subject is not None and (not isinstance(subject, str) or not subject.strip()):
                raise ValueError(f"edit request {item!r}: subject must be a non-empty string when given")
            return cls(item["prompt"], item["target"], subject)
        if isinstance(item, (tuple, list)) and len(item) in (2, 3):
            return cls(*(str(v) for v in item))
        raise TypeError(f"cannot read an edit request from {type(item).__name__}: {item!r}")


@dataclass
class EditResult:
    edit_id: int
    prompt: str
    target: str
    steps: int
    loss: float
    seconds: float
    preserved: tuple[int, ...] = ()  # earlier edits whose keys this edit's update left unchanged
    replaced: tuple[int, ...] = ()  # earlier edits asking the same question, removed (on_conflict="supersede")


@dataclass
class Retrieval:
    edit_id: int | None
    score: float
