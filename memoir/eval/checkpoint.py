"""Resumable evaluation runs.

A sequential run over the whole hallucination set takes hours on a CPU.  Every K edits the runner
writes the edited state (``method.save_state``), the per-edit records so far and the pre-edit
snapshot into ``<output>.partial/``; a run started again with ``--resume`` restores them and goes on
with the next edit, so a crash, a killed job or a machine that goes away costs at most K edits.
The directory is replaced atomically (write to a temporary sibling, then rename), so an
interruption while saving leaves the previous checkpoint intact.

A checkpoint belongs to one run: method, config, records, protocol options.  Resuming with anything
else is refused with the fields that differ, because mixing two runs' edits would silently give
numbers that belong to neither.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import torch
from safetensors.torch import load_file, save_file

from memoir.atomic import atomic_folder
from memoir.eval.runner import json_default

PROGRESS_FILE = "progress.json"
RNG_FILE = "rng.safetensors"
FORMAT = 1


def records_digest(records) -> str:
    """sha256 over the fields the protocol reads, in order: identifies the edit stream."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.prompt, r.target, r.rephrase, r.loc_prompt, r.loc_answer, r.paraphrases, r.neighbours]).encode())
    return h.hexdigest()


def run_fingerprint(method, records, kind: str, eval_every, em: bool) -> dict:
    config = {k: v for k, v in method.config_dict().items() if k != "threshold_final"}
    return {"format": FORMAT, "method": method.name, "n_edits": len(records), "kind": kind, "config": config,
            "records_sha256": records_digest(records), "eval_every": eval_every, "em": em}


def has_checkpoint(path) -> bool:
    return (pathlib.Path(path) / PROGRESS_FILE).exists()


def default_path(output) -> pathlib.Path:
    output = pathlib.Path(output)
    return output.with_name(output.name + ".partial")


class RunCheckpoint:
    """The checkpoint directory of one run (``fingerprint`` from :func:`run_fingerprint`)."""

    def __init__(self, path, fingerprint: dict):
        self.path = pathlib.Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # JSON-normalised, comparable to a loaded one

    def exists(self) -> bool:
        return has_checkpoint(self.path)

    def save(self, method, progress: dict) -> None:
        with atomic_folder(self.path) as tmp:
            method_info = method.save_state(tmp)
            save_file({"torch": torch.get_rng_state()}, str(tmp / RNG_FILE))
            doc = {"fingerprint": self.fingerprint, "method_state": method_info, **progress}
            (tmp / PROGRESS_FILE).write_text(json.dumps(doc, default=json_default))

    def load(self, method) -> dict:
        """Restore the method's edited state and the RNG; returns the saved progress."""
        try:
            doc = json.loads((self.path / PROGRESS_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.path}: unreadable checkpoint ({e}); delete it to start over") from None
        saved = doc.get("fingerprint", {})
        if saved != self.fingerprint:
            diff = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            raise ValueError(f"{self.path} belongs to a different run (differs in: {', '.join(diff)}); "
                             "delete it or rerun with the same method, config, data and options")
        method.load_state(self.path, doc["method_state"])
        torch.set_rng_state(load_file(str(self.path / RNG_FILE))["torch"])
        return doc

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

