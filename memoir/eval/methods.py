"""One interface over the editing methods the harness evaluates: ``memoir``, ``ft``, ``grace``.

A method exposes ``model``, ``tokenizer``, ``edit(prompt, target) -> dict``,
``logits(batch, keep)`` (teacher-forced forward; MEMOIR/GRACE route each row from
``batch.prompt_mask``), ``generate_ids(prompts, max_new_tokens)``, ``routes()`` (which edit each
row of the last forward was routed to, or None when the method does not route) and
``config_dict()``; ``save_state(dir) -> dict`` / ``load_state(dir, info)`` write and restore
everything the edits so far changed (for resumable runs, ``memoir.eval.checkpoint``).
"""
from __future__ import annotations

import dataclasses
import pathlib

import torch
from safetensors.torch import load_file, save_file

from memoir.batching import Batch
from memoir.eval import metrics

METHODS = ("memoir", "ft", "grace")


class _Base:
    name = "base"

    def __init__(self, editor):
        self.editor = editor
        self.model = editor.model
        self.tokenizer = editor.tokenizer
        self._keep = metrics.keeps_logits(self.model)
        self.edit_index: dict[int, int] = {}  # editor's edit id -> position in the stream

    def _span(self, batch: Batch):
        return self.editor.prompt_span(batch.prompt_mask.to(self.editor.device))

    def logits(self, batch: Batch, keep: int | None) -> torch.Tensor:
        with self._span(batch):
            return metrics.model_logits(self.model, batch, keep, self._keep)

    def generate_ids(self, prompts, max_new_tokens: int):
        return metrics.greedy_generate_ids(self.model, self.tokenizer, prompts, max_new_tokens)

    def routes(self):
        return None

    @property
    def layer_index(self) -> int:
        return self.editor.target.layer_index

    @property
    def module_name(self) -> str:
        return self.editor.target.qualified_name


class MemoirMethod(_Base):
    name = "memoir"

    def edit(self, prompt, target, position: int, subject: str | None = None) -> dict:
        return self._row(self.editor.edit(prompt, target, subject), position)

    def edit_batch(self, records, positions, subjects: bool = True) -> list[dict]:
        """Several records trained together (``edit_many(batch_size=len(records))``)."""
        results = self.editor.edit_many([(r.prompt, r.target, r.extra.get("subject") if subjects else None)
                                         for r in records],
                                        progress=False, batch_size=len(records))
        return [self._row(r, i) for r, i in zip(results, positions)]

    def _row(self, r, position: int) -> dict:
        if r.edit_id is not None:
            self.edit_index[r.edit_id] = position
        out = {"steps": r.steps, "loss": r.loss, "seconds": r.seconds, "edit_id": r.edit_id, "converged": r.converged,
               "disturbed": list(r.disturbed)}
        if r.replaced:  # stream positions of the earlier edits this one superseded
            out["replaced"] = [self.edit_index[j] for j in r.replaced]
        return out

    _route = None

    def logits(self, batch: Batch, keep: int | None) -> torch.Tensor:
        layer = self.editor.layer
        with layer.calls.overriding(), self._span(batch):
            out = metrics.model_logits(self.model, batch, keep, self._keep)
            self._route = layer.last_route
        return out

    def generate_ids(self, prompts, max_new_tokens: int):
        layer = self.editor.layer
        with layer.calls.overriding():
            ids = metrics.greedy_generate_ids(self.model, self.tokenizer, prompts, max_new_tokens)
            self._route = layer.last_route
        return ids

    def routes(self):
        if self._route is None:
            return None
        ids = self.editor.layer.bank.edit_ids
        return [self.edit_index.get(ids[r]) if r >= 0 else None for r in self._route.rows.tolist()]

    def config_dict(self) -> dict:
        # The tau in force at the end (differs from the config's under threshold "auto").
        return {**self.editor.config.to_dict(), "threshold_final": self.editor.threshold}

    def save_state(self, path: pathlib.Path) -> dict:
        self.editor.save(path / "memory")
        return {"edit_index": {str(k): v for k, v in self.edit_index.items()}}

    def load_state(self, path: pathlib.Path, info: dict) -> None:
        from memoir.editor import MemoirEditor

        self.editor.detach()
        self.editor = MemoirEditor.load(self.model, self.tokenizer, path / "memory")
        self.edit_index = {int(k): v for k, v in info["edit_index"].items()}


class FTMethod(_Base):
    name = "ft"

    def edit(self, prompt, target, position: int, subject: str | None = None) -> dict:
        r = self.editor.edit(prompt, target)
        return {"steps": r.steps, "loss": r.loss, "seconds": r.seconds}

    def config_dict(self) -> dict:
        return self.editor.config.to_dict()

    def save_state(self, path: pathlib.Path) -> dict:
        save_file({"weight": self.editor.weight.detach().contiguous().cpu()}, str(path / "ft.safetensors"))
        return {"n_edits": self.editor.n_edits}

    def load_state(self, path: pathlib.Path, info: dict) -> None:
        with torch.no_grad():
            self.editor.weight.copy_(load_file(str(path / "ft.safetensors"))["weight"])
        self.editor.n_edits = int(info["n_edits"])


class GraceMethod(_Base):
    name = "grace"

    def edit(self, prompt, target, position: int, subject: str | None = None) -> dict:
        r = self.editor.edit(prompt, target)
        self.edit_index[r.edit_id] = position
        return {"steps": r.steps, "loss": r.loss, "seconds": r.seconds, "slot": r.slot, "codebook": r.action}

    def routes(self):
        slots = self.editor.layer.last_slots
        if slots is None:
            return None
        owners = self.editor.layer.owners
        return [self.edit_index.get(owners[s]) if s >= 0 else None for s in slots.tolist()]

    def config_dict(self) -> dict:
        return self.editor.config.to_dict()

    def save_state(self, path: pathlib.Path) -> dict:
        L = self.editor.layer
        save_file({"keys": L.keys.contiguous().cpu(), "values": L.values.contiguous().cpu(),
                   "radii": L.radii.contiguous().cpu(), "generator": self.editor._gen.get_state()},
                  str(path / "grace.safetensors"))
        return {"labels": list(L.labels), "owners": list(L.owners), "n_edits": self.editor.n_edits,
                "edit_index": {str(k): v for k, v in self.edit_index.items()}}

    def load_state(self, path: pathlib.Path, info: dict) -> None:
        L = self.editor.layer
        state = load_file(str(path / "grace.safetensors"))
        dev = L.keys.device
        L.keys, L.values, L.radii = (state[k].to(dev) for k in ("keys", "values", "radii"))
        L.labels, L.owners = list(info["labels"]), list(info["owners"])
        self.editor._gen.set_state(state["generator"])
        self.editor.n_edits = int(info["n_edits"])
        self.edit_index = {int(k): v for k, v in info["edit_index"].items()}


def build_method(name: str, model, tokenizer, memoir_config=None, ft_config=None, grace_config=None):
    """The method ``name`` on ``model`` at MEMOIR's layer (``memoir_config.layer``, or MEMOIR's default)."""
    from memoir.baselines import FTConfig, FTEditor, GraceConfig, GraceEditor
    from memoir.config import MemoirConfig
    from memoir.editor import MemoirEditor
    from memoir.models import locate_target

    memoir_config = memoir_config or MemoirConfig()
    layer = locate_target(model, memoir_config.layer).layer_index  # MEMOIR's layer, resolved
    if name == "memoir":
        return MemoirMethod(MemoirEditor(model, tokenizer, dataclasses.replace(memoir_config, layer=layer)))
    if name == "ft":
        cfg = ft_config or FTConfig(n_iter=memoir_config.n_iter)
        return FTMethod(FTEditor(model, tokenizer, dataclasses.replace(cfg, layer=layer)))
    if name == "grace":
        cfg = grace_config or GraceConfig(n_iter=memoir_config.n_iter)
        return GraceMethod(GraceEditor(model, tokenizer, dataclasses.replace(cfg, layer=layer)))
    raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
