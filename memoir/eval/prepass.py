"""Share the unedited model's evaluation between runs.

Every sequential run starts by evaluating the unedited model on all N records (the "pre-edit pass":
the locality answers every later Loc score is compared with, and the pre-edit Rel/Gen).  It does not
depend on the editing method, yet on the whole hallucination set it costs about 25 CPU-minutes, so
comparing MEMOIR, FT-L and GRACE on one file used to pay for it three times.  The pass is stored
under ``<memoir cache>/pre-edit/`` keyed by everything it depends on: the model's weights (a digest of
every parameter and buffer), dtype, device type, tokenizer, the records, the metric kind and the
evaluation batch size (padding changes float rounding).  Any mismatch is simply a different key.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib

import torch

from memoir.atomic import write_text

from memoir.eval.checkpoint import records_digest
from memoir.eval.runner import json_default

log = logging.getLogger(__name__)
FORMAT = 2  # 2: neighbourhood continuations (pre_nbr)


def model_digest(model, tokenizer) -> str:
    """Digest of the unedited model: every tensor's name, shape, dtype and (abs-)sum, plus the tokenizer.

    Take it before a method wraps or edits the model.  Sums rather than bytes keep it to ~0.1 s for a
    135M model; two checkpoints differing only by a permutation-invariant change are not a concern here.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            d = t.detach().double()
            h.update(json.dumps([name, list(t.shape), str(t.dtype), t.device.type,
                                 float(d.sum()), float(d.abs().sum())]).encode())
    h.update(json.dumps([type(tokenizer).__name__, len(tokenizer), getattr(tokenizer, "name_or_path", "")]).encode())
    return h.hexdigest()


def pass_key(model_hash: str, records, kind: str, batch_size: int) -> str:
    doc = [FORMAT, model_hash, records_digest(records), kind, int(batch_size)]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:32]


def default_dir() -> pathlib.Path:
    from memoir.models import cache_dir

    return cache_dir() / "pre-edit"


class PrePassCache:
    """``load(key)`` / ``save(key, ...)`` of pre-edit passes in one folder (``None`` = caching off)."""

    def __init__(self, directory):
        self.directory = pathlib.Path(directory)

    def _file(self, key: str) -> pathlib.Path:
        return self.directory / f"{key}.json"

    def load(self, key: str) -> dict | None:
        path = self._file(key)
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT}")
            return {"pre_loc": {int(k): v for k, v in doc["pre_loc"].items()}, "pre_rows": list(doc["pre_rows"]),
                    "pre_nbr": {int(k): v for k, v in doc.get("pre_nbr", {}).items()}}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged entry is recomputed, not fatal
            log.warning("ignoring unreadable pre-edit cache entry %s (%s)", path, e)
            return None

    def save(self, key: str, pre_loc: dict, pre_rows: list[dict], pre_seconds: float, pre_nbr: dict | None = None) -> None:
        # Routing diagnostics belong to the method that computed the pass, not to the unedited model.
        rows = [{k: v for k, v in r.items() if not k.startswith("route_")} for r in pre_rows]
        doc = {"format": FORMAT, "pre_loc": {str(k): v for k, v in pre_loc.items()}, "pre_rows": rows,
               "pre_seconds": pre_seconds, "pre_nbr": {str(k): v for k, v in (pre_nbr or {}).items()}}
        try:
            write_text(self._file(key), json.dumps(doc, default=json_default))
        except OSError as e:  # a read-only cache must not fail an evaluation that already ran
            log.warning("could not write the pre-edit cache %s (%s)", self.directory, e)
