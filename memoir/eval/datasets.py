"""Loaders for the editing benchmarks: every format becomes a list of :class:`EditRecord`.

Formats (``format=``):

``zsre``           MEND/WISE ZsRE: ``src``, ``alt``, ``rephrase``, ``loc``, ``loc_ans``.
``knowedit``       KnowEdit ZsRE: ``prompt``, ``target_new``, ``rephrase_prompt``,
                   ``locality.Relation_Specificity[0].{prompt, ground_truth}``.
``hallucination``  WISE hallucination: ``prompt``, ``target_new``, ``locality_prompt``,
                   ``locality_ground_truth``; no rephrase.
``temporal``       WISE temporal: ``prompt``, ``target_new``, ``ood_rephrase``, ``locality_prompt``,
                   ``locality_ground_truth``.
``counterfact``    either CounterFact layout, detected per file:
                   ROME (``requested_rewrite{prompt with {}, subject, target_new.str, target_true.str}``,
                   ``paraphrase_prompts``, ``neighborhood_prompts``; locality = first neighbourhood
                   prompt answered by ``target_true``) or the flat EasyEdit layout (``prompt``,
                   ``target_new``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``).
                   ``counterfact_rome`` / ``counterfact_flat`` force one layout.
``auto``           detect from the first record's fields.

Ground-truth fields may be strings or (nested) lists of strings; the first string is used.
An empty locality answer (7 records of ``hallucination-edit.json``) is not an error: the
record gets ``loc_prompt = loc_answer = None`` and ``extra["loc_skipped"]`` says why, and the
Loc metric skips that record (Loc is averaged over the records that have a locality probe).
A malformed record raises ``ValueError`` naming the file, the record index and the field.
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import asdict, dataclass, field

FORMATS = ("auto", "zsre", "knowedit", "hallucination", "temporal", "counterfact", "counterfact_rome", "counterfact_flat")

# How each format is scored: "qa" = token accuracy (Rel/Gen) + Loc; "ppl" = target perplexity
# (hallucination); "ood" = token accuracy for Rel, OOD probability accuracy for Gen (temporal).
FORMAT_KIND = {
    "zsre": "qa",
    "knowedit": "qa",
    "counterfact": "qa",
    "counterfact_rome": "qa",
    "counterfact_flat": "qa",
    "hallucination": "ppl",
    "temporal": "ood",
}


@dataclass
class EditRecord:
    """One edit request with its evaluation probes."""

    prompt: str
    target: str
    rephrase: str | None = None
    loc_prompt: str | None = None
    loc_answer: str | None = None
    extra: dict = field(default_factory=dict)
    # Every paraphrase and every neighbourhood prompt of the record (CounterFact has several;
    # other formats one each, the rephrase and the locality prompt).
    paraphrases: list[str] = field(default_factory=list)
    neighbours: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.paraphrases and self.rephrase is not None:
            self.paraphrases = [self.rephrase]
        if not self.neighbours and self.loc_prompt is not None:
            self.neighbours = [self.loc_prompt]

    def to_dict(self) -> dict:
        return asdict(self)


class _Rec:
    """Field access with errors that name the file, record and field."""

    def __init__(self, raw, index: int, source: str):
        self.index, self.source = index, source
        if not isinstance(raw, dict):
            self.fail(None, f"expected a JSON object, got {type(raw).__name__}")
        self.raw = raw

    def fail(self, name, why):
        where = f"{self.source}: record {self.index}"
        raise ValueError(f"{where}: {why}" if name is None else f"{where}: field {name!r} {why}")

    def get(self, path: str, *, required: bool = True):
        obj = self.raw
        for part in path.split("."):
            if isinstance(obj, dict) and part in obj:
                obj = obj[part]
            elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
                obj = obj[int(part)]
            else:
                if required:
                    self.fail(path, "is missing")
                return None
        return obj

    def text(self, path: str, *, required: bool = True, allow_empty: bool = False) -> str | None:
        """A string field; lists (possibly nested) of strings give their first string."""
        value = self.get(path, required=required)
        if value is None and not required:
            return None
        value = _first_string(value)
        if value is None:
            self.fail(path, f"must be a string or a list of strings, got {self.get(path)!r:.80}")
        if not value.strip() and not allow_empty:
            if required:
                self.fail(path, "is empty")
            return None
        return value


def _first_string(value):
    while isinstance(value, list):
        if not value:
            return None
        value = value[0]
    return value if isinstance(value, str) else None


def _loc(rec: _Rec, prompt_field: str, answer_field: str):
    """Locality pair; an empty answer skips Loc for this record (documented above)."""
    prompt = rec.text(prompt_field)
    answer = rec.text(answer_field, allow_empty=True)
    if answer is None or not answer.strip():
        return None, None, {"loc_skipped": f"empty {answer_field}"}
    return prompt, answer, {}


# ----------------------------------------------------------------------------- per-format parsers
def _zsre(rec: _Rec) -> EditRecord:
    loc_prompt, loc_answer, extra = _loc(rec, "loc", "loc_ans")
    for key in ("subject", "pred", "answers", "portability"):
        if key in rec.raw:
            extra[key] = rec.raw[key]
    return EditRecord(rec.text("src"), rec.text("alt"), rec.text("rephrase"), loc_prompt, loc_answer, extra)


def _knowedit(rec: _Rec) -> EditRecord:
    locality = rec.get("locality")
    if not isinstance(locality, dict):
        rec.fail("locality", "must be an object")
    spec = rec.get("locality.Relation_Specificity")
    if not isinstance(spec, list) or not spec:
        rec.fail("locality.Relation_Specificity", "must be a non-empty list of {prompt, ground_truth}")
    loc_prompt, loc_answer, extra = _loc(
        rec, "locality.Relation_Specificity.0.prompt", "locality.Relation_Specificity.0.ground_truth"
    )
    for key in ("subject", "ground_truth", "portability"):
        if key in rec.raw:
            extra[key] = rec.raw[key]
    if len(spec) > 1:
        extra["more_locality"] = spec[1:]
    return EditRecord(
        rec.text("prompt"), rec.text("target_new"), rec.text("rephrase_prompt"), loc_prompt, loc_answer, extra
    )


def _hallucination(rec: _Rec) -> EditRecord:
    loc_prompt, loc_answer, extra = _loc(rec, "locality_prompt", "locality_ground_truth")
    if "subject" in rec.raw:
        extra["subject"] = rec.raw["subject"]
    return EditRecord(rec.text("prompt"), rec.text("target_new"), None, loc_prompt, loc_answer, extra)


def _temporal(rec: _Rec) -> EditRecord:
    loc_prompt, loc_answer, extra = _loc(rec, "locality_prompt", "locality_ground_truth")
    if "subject" in rec.raw:
        extra["subject"] = rec.raw["subject"]
    return EditRecord(
        rec.text("prompt"), rec.text("target_new"), rec.text("ood_rephrase"), loc_prompt, loc_answer, extra
    )


def _counterfact_flat(rec: _Rec) -> EditRecord:
    loc_prompt, loc_answer, extra = _loc(rec, "locality_prompt", "locality_ground_truth")
    for key in ("case_id", "subject", "ground_truth"):
        if key in rec.raw:
            extra[key] = rec.raw[key]
    return EditRecord(
        rec.text("prompt"), rec.text("target_new"), rec.text("rephrase_prompt"), loc_prompt, loc_answer, extra
    )


def _counterfact_rome(rec: _Rec) -> EditRecord:
    rw = rec.get("requested_rewrite")
    if not isinstance(rw, dict):
        rec.fail("requested_rewrite", "must be an object")
    template = rec.text("requested_rewrite.prompt")
    subject = rec.text("requested_rewrite.subject")
    if "{}" not in template:
        rec.fail("requested_rewrite.prompt", "has no '{}' placeholder for the subject")
    target = rec.text("requested_rewrite.target_new.str")
    true = rec.text("requested_rewrite.target_true.str")
    paraphrases = rec.get("paraphrase_prompts")
    neighbours = rec.get("neighborhood_prompts")
    for name, value in (("paraphrase_prompts", paraphrases), ("neighborhood_prompts", neighbours)):
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            rec.fail(name, "must be a non-empty list of non-empty strings")
    extra = {
        "case_id": rec.raw.get("case_id"),
        "subject": subject,
        "target_true": true,
        "paraphrase_prompts": paraphrases,
        "neighborhood_prompts": neighbours,
    }
    if "portability" in rec.raw:
        extra["portability"] = rec.raw["portability"]
    return EditRecord(template.replace("{}", subject), target, paraphrases[0], neighbours[0], true, extra,
                      list(paraphrases), list(neighbours))


PARSERS = {
    "zsre": _zsre,
    "knowedit": _knowedit,
    "hallucination": _hallucination,
    "temporal": _temporal,
    "counterfact_rome": _counterfact_rome,
    "counterfact_flat": _counterfact_flat,
}


def detect_format(record) -> str:
    """The concrete format of a record from its fields (raises ValueError if unknown)."""
    if not isinstance(record, dict):
        raise ValueError(f"cannot detect the format of a {type(record).__name__} record")
    keys = set(record)
    if {"src", "alt"} <= keys:
        return "zsre"
    if "requested_rewrite" in keys:
        return "counterfact_rome"
    if "locality" in keys and "target_new" in keys:
        return "knowedit"
    if "ood_rephrase" in keys:
        return "temporal"
    if {"rephrase_prompt", "locality_prompt"} <= keys:
        return "counterfact_flat"
    if {"prompt", "target_new", "locality_prompt"} <= keys:
        return "hallucination"
    raise ValueError(f"unrecognised record fields {sorted(keys)}; pass format= explicitly ({', '.join(FORMATS[1:])})")


def _read(path) -> tuple[list, str]:
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(data, dict):  # tolerate {"data": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"{path}: expected a JSON list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: no records")
    return data, str(path)


def resolve_format(data: list, fmt: str = "auto", source: str = "data") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "auto":
        try:
            return detect_format(data[0])
        except ValueError as exc:
            raise ValueError(f"{source}: record 0: {exc}") from None
    if fmt == "counterfact":
        return "counterfact_rome" if isinstance(data[0], dict) and "requested_rewrite" in data[0] else "counterfact_flat"
    return fmt


def load_records(path, format: str = "auto", limit: int | None = None, offset: int = 0):
    """``(records, concrete_format)`` for the first ``limit`` records after ``offset``."""
    if offset < 0 or (limit is not None and int(limit) < 0):
        raise ValueError(f"offset {offset} and limit {limit} must not be negative")
    data, source = _read(path)
    fmt = resolve_format(data, format, source)
    parser = PARSERS[fmt]
    end = len(data) if limit is None else min(len(data), offset + int(limit))
    records = []
    for i in range(offset, end):
        rec = parser(_Rec(data[i], i, source))
        rec.extra.setdefault("index", i)
        records.append(rec)
    return records, fmt


def load_dataset(path, format: str = "auto", limit: int | None = None, offset: int = 0) -> list[EditRecord]:
    return load_records(path, format, limit, offset)[0]


def load_zsre(path, limit=None):
    return load_dataset(path, "zsre", limit)


def load_knowedit(path, limit=None):
    return load_dataset(path, "knowedit", limit)


def load_hallucination(path, limit=None):
    return load_dataset(path, "hallucination", limit)


def load_temporal(path, limit=None):
    return load_dataset(path, "temporal", limit)


def load_counterfact(path, limit=None):
    return load_dataset(path, "counterfact", limit)


def kind_of(fmt: str) -> str:
    return FORMAT_KIND[fmt]
