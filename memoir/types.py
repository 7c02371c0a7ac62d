"""The values the editor API takes and returns (shared by the editor, saving and the harness)."""
from __future__ import annotations

import itertools
import unicodedata
from dataclasses import dataclass

_VERSIONS = itertools.count()


def visible(text: str) -> str:
    """``text`` without whitespace, control and format characters (zero-width spaces, BOMs)."""
    return "".join(ch for ch in text if not ch.isspace() and unicodedata.category(ch)[0] != "C")


def _text(value, name: str, item, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"edit request {item!r}: {name} must be a string, not {type(value).__name__}")
    if not visible(value):
        raise ValueError(f"edit request {item!r}: {name} has no visible characters")
    return value


@dataclass
class EditRequest:
    prompt: str
    target: str
    subject: str | None = None  # the entity the fact is about (used by the subject router)
    aliases: tuple[str, ...] = ()  # other names of the subject ("USA", "the States"), routed like it

    @classmethod
    def coerce(cls, item) -> "EditRequest":
        """An edit request from a request, a ``{prompt, target[, subject][, aliases]}`` dict or a
        ``(prompt, target[, subject[, aliases]])`` tuple; anything else, a non-string value (a JSON
        null included), a text with no visible characters or aliases that are not a list of such
        texts is refused, naming the field."""
        if isinstance(item, EditRequest):
            values = (item.prompt, item.target, item.subject, item.aliases)
        elif isinstance(item, dict):
            missing = [k for k in ("prompt", "target") if k not in item]
            if missing:
                raise ValueError(f"edit request {item!r} lacks {' and '.join(missing)}")
            values = (item["prompt"], item["target"], item.get("subject"), item.get("aliases", ()))
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3, 4):
            values = tuple(item) + (None, ())[len(item) - 2:]
        else:
            raise TypeError(f"cannot read an edit request from {type(item).__name__}: {item!r} "
                            "(expected {prompt, target[, subject][, aliases]} or (prompt, target[, subject]))")
        aliases = values[3] if values[3] is not None else ()
        if isinstance(aliases, str) or not isinstance(aliases, (list, tuple)):
            raise ValueError(f"edit request {item!r}: aliases must be a list of strings, not "
                             f"{type(aliases).__name__}")
        return cls(_text(values[0], "prompt", item), _text(values[1], "target", item),
                   _text(values[2], "subject", item, optional=True),
                   tuple(_text(a, "each alias", item) for a in aliases))


@dataclass
class EditResult:
    """One edit as it was made (``editor.edit`` returns it; ``editor.edits()`` lists the stored ones)."""

    edit_id: int | None  # None: not kept (on_unconverged="rollback")
    prompt: str
    target: str
    steps: int
    loss: float  # teacher-forced loss of the memory as kept
    seconds: float
    preserved: tuple[int, ...] = ()  # earlier edits whose keys this edit's update left unchanged
    replaced: tuple[int, ...] = ()  # earlier edits asking the same question, removed (on_conflict="supersede")
    converged: bool = True  # the bare prompt predicts every target token (teacher-forced argmax)
    kept: bool = True  # False: rolled back because it did not converge
    disturbed: tuple[int, ...] = ()  # earlier edits that stopped producing their target (check_neighbours)
    subject: str | None = None
    aliases: tuple[str, ...] = ()


@dataclass
class Retrieval:
    edit_id: int | None
    score: float


class EditRecords(dict):
    """The stored edits by id, oldest first; ``version`` takes a new value at every change, so an
    index derived from the records (the subject spellings) knows when to rebuild without comparing
    every record."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.version = next(_VERSIONS)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.version = next(_VERSIONS)

    def __delitem__(self, key):
        super().__delitem__(key)
        self.version = next(_VERSIONS)

    def pop(self, *args):
        out = super().pop(*args)
        self.version = next(_VERSIONS)
        return out

    def clear(self):
        super().clear()
        self.version = next(_VERSIONS)

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self.version = next(_VERSIONS)
