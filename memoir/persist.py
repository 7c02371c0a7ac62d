"""Saving and loading edits, peft-style: ``memoir_config.json`` + ``memoir_state.safetensors``.

The state holds the memory, the packed mask bank and its edit ids, the permutation and the
background statistics: a fresh permutation or background after reload would silently corrupt
every stored edit, so they always travel together.  Loading checks the format, the target
module, a fingerprint of the base weight and the state file's checksum, and fails loudly.
Saving writes into a temporary folder and renames it (``memoir.atomic``), so a crash never
leaves half a save.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

import torch
from safetensors.torch import load_file, save_file

from memoir.atomic import atomic_folder
from memoir.config import MemoirConfig
from memoir.types import EditRequest

FORMAT = "memoir-edits/1"
CONFIG_FILE = "memoir_config.json"
STATE_FILE = "memoir_state.safetensors"


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weight_fingerprint(weight: torch.Tensor) -> str:
    """sha256 of the base projection's weight: identifies the model the edits belong to."""
    return hashlib.sha256(weight.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def save_editor(editor, path) -> None:
    path = pathlib.Path(path)
    layer = editor.layer
    with atomic_folder(path) as tmp:
        state = {
            "memory": layer.memory.detach().contiguous().cpu(),
            "bank_words": layer.bank.words.contiguous().cpu(),
            "bank_edit_ids": torch.tensor(layer.bank.edit_ids, dtype=torch.int64),
            "permutation": layer.permutation.cpu(),
            "background_mean": layer.background_mean.cpu(),
            "background_std": layer.background_std.cpu(),
            **editor.keys.state(),
        }
        if layer.subject is not None:
            state.update(subject_keys=layer.subject.keys.contiguous().cpu(),
                         subject_key_ids=layer.subject.edit_ids.contiguous().cpu(),
                         subject_key_groups=layer.subject.groups.contiguous().cpu(),
                         subject_mean=layer.subject.mean.contiguous().cpu())
        if editor.config.threshold_mode == "auto":
            state["background_masks"] = editor.background_masks().contiguous().cpu()
        save_file(state, str(tmp / STATE_FILE))
        meta = {
            "format": FORMAT,
            "config": editor.config.to_dict(),
            "target": {
                "name": editor.target.qualified_name,
                "in_features": editor.target.in_features,
                "out_features": editor.target.out_features,
                "model_type": getattr(editor.model.config, "model_type", None),
                "weight_sha256": weight_fingerprint(layer.base.weight),
            },
            "edits": [{"edit_id": i, "prompt": r.prompt, "target": r.target, "subject": r.subject}
                      for i, r in editor.edits.items()],
            "next_edit_id": editor._next_id,
            "context_templates": editor._templates,
            "state_sha256": _sha256(tmp / STATE_FILE),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def load_editor(cls, model, tokenizer, path):
    path = pathlib.Path(path)
    meta_path, state_path = path / CONFIG_FILE, path / STATE_FILE
    if not meta_path.exists() or not state_path.exists():
        raise FileNotFoundError(f"{path} is not a saved MEMOIR memory (needs {CONFIG_FILE} and {STATE_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unsupported format {meta.get('format')!r} (expected {FORMAT})")
    if _sha256(state_path) != meta["state_sha256"]:
        raise ValueError(f"{state_path} is corrupt: its checksum does not match {CONFIG_FILE}")
    state = load_file(str(state_path))
    config = MemoirConfig.from_dict(meta["config"])
    editor = cls(model, tokenizer, config, background=(state["background_mean"], state["background_std"]))
    try:
        t = meta["target"]
        if t["name"] != editor.target.qualified_name or t["in_features"] != editor.target.in_features:
            raise ValueError(f"saved edits target {t['name']} ({t['in_features']} features) but this model's "
                             f"target is {editor.target.qualified_name} ({editor.target.in_features})")
        if weight_fingerprint(editor.layer.base.weight) != t["weight_sha256"]:
            raise ValueError("these edits were made on a different base model (weight fingerprint differs)")
        layer = editor.layer
        if state["memory"].shape != layer.memory.shape:
            raise ValueError(f"memory shape {tuple(state['memory'].shape)} != {tuple(layer.memory.shape)}")
        with torch.no_grad():
            layer.memory.copy_(state["memory"].to(layer.memory.dtype))
            layer.permutation.copy_(state["permutation"])
        layer.bank.load(state["bank_words"], state["bank_edit_ids"].tolist())
        editor.edits = {e["edit_id"]: EditRequest(e["prompt"], e["target"], e["subject"]) for e in meta["edits"]}
        editor.keys.load(state, layer.memory.device)
        if layer.subject is not None:
            if "subject_keys" not in state:
                raise ValueError(f"{state_path} has no subject keys but its config uses router 'subject'")
            device = layer.memory.device
            layer.subject.keys = state["subject_keys"].to(device)
            layer.subject.edit_ids = state["subject_key_ids"].to(device)
            layer.subject.groups = state["subject_key_groups"].to(device)
            layer.subject.mean = state["subject_mean"].to(device)
        if "background_masks" in state:
            editor._background_masks = state["background_masks"].to(layer.memory.device)
        editor.calibrate_threshold()
        editor._next_id = int(meta["next_edit_id"])
        editor._templates = meta.get("context_templates")
    except BaseException:
        editor.detach()
        raise
    return editor
