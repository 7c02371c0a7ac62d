"""Saving and loading edits, peft-style: ``memoir_config.json`` + ``memoir_state.safetensors``.

The state holds the memory, the packed mask bank and its edit ids, the permutation and the
background statistics: a fresh permutation or background after reload would silently corrupt
every stored edit, so they always travel together.  Loading checks the format, checksums of
both files (the config's covers every field that changes behaviour), what the tensors mean
(a permutation, masks of exactly k columns, unique ids matching the records, finite values),
the target module, dtype and a fingerprint of the base weight, and fails loudly, naming the
file and field.  Saving writes into a temporary folder and renames it (``memoir.atomic``), so a
crash never leaves half a save, and refuses a folder holding files memoir did not write.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

import torch
from safetensors.torch import load_file, save_file

from memoir.atomic import atomic_folder, recover_folder
from memoir.config import MemoirConfig
from memoir.ops import popcounts
from memoir.types import EditRecords, EditResult

FORMAT = "memoir-edits/1"
CONFIG_FILE = "memoir_config.json"
STATE_FILE = "memoir_state.safetensors"
OWN_FILES = (CONFIG_FILE, STATE_FILE)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weight_fingerprint(weight: torch.Tensor) -> str:
    """sha256 of the base projection's weight: identifies the model the edits belong to."""
    return hashlib.sha256(weight.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


RECORD_FIELDS = ("edit_id", "prompt", "target", "subject", "aliases", "steps", "loss", "seconds", "converged",
                 "preserved", "replaced", "disturbed")
TUPLE_FIELDS = ("aliases", "preserved", "replaced", "disturbed")


def record_to_json(r: EditResult) -> dict:
    return {f: list(getattr(r, f)) if f in TUPLE_FIELDS else getattr(r, f) for f in RECORD_FIELDS}


def record_from_json(e: dict) -> EditResult:
    values = {f: tuple(e[f]) if f in TUPLE_FIELDS else e[f] for f in RECORD_FIELDS}
    return EditResult(**values)


def meta_checksum(meta: dict) -> str:
    """sha256 of everything in ``memoir_config.json`` but this checksum itself (canonical JSON)."""
    rest = {k: v for k, v in meta.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, allow_nan=False).encode()).hexdigest()


def check_save_target(path: pathlib.Path) -> None:
    """Refuse to replace anything but an earlier memoir save: saving swaps the folder whole."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"cannot save into {path}: it is a file, not a folder")
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir() if p.name not in OWN_FILES)
    if foreign:
        raise ValueError(f"refusing to save into {path}: it holds files memoir did not write "
                         f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); saving replaces the "
                         "whole folder, so choose a new or empty folder")


def save_editor(editor, path) -> None:
    path = pathlib.Path(path)
    recover_folder(path)
    check_save_target(path)
    layer = editor.layer
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
    if layer.private is not None:
        state.update(layer.private.state())
    if editor.config.threshold_mode == "auto":
        state["background_masks"] = editor.background_masks().contiguous().cpu()
    edits = [record_to_json(r) for r in editor.edits()]
    # The checks load makes, made before anything is written: a state load would refuse is never saved.
    check_state(state, _Fields({"edits": edits, "next_edit_id": editor._next_id}, str(path / CONFIG_FILE)),
                editor.config, path / STATE_FILE)
    with atomic_folder(path) as tmp:
        save_file(state, str(tmp / STATE_FILE))
        meta = {
            "format": FORMAT,
            "config": editor.config.to_dict(),
            "target": {
                "name": editor.target.qualified_name,
                "in_features": editor.target.in_features,
                "out_features": editor.target.out_features,
                "model_type": getattr(editor.model.config, "model_type", None),
                "dtype": str(layer.base.weight.dtype).removeprefix("torch."),
                "weight_sha256": weight_fingerprint(layer.base.weight),
            },
            "edits": edits,
            "removed_edit_ids": list(editor.removed),
            "next_edit_id": editor._next_id,
            "context_templates": editor._templates,
            "state_sha256": _sha256(tmp / STATE_FILE),
        }
        meta["config_sha256"] = meta_checksum(meta)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False))


class _Fields:
    """``meta[...]`` lookups that name the file and the missing field instead of a bare KeyError."""

    def __init__(self, data, where: str):
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, found {type(data).__name__}")
        self.data, self.where = data, where

    def __getitem__(self, key):
        if key not in self.data:
            raise ValueError(f"{self.where}: missing field {key!r}")
        return self.data[key]


def read_meta(path: pathlib.Path) -> _Fields:
    """``memoir_config.json``, its format and checksum verified."""
    meta_path = path / CONFIG_FILE
    try:
        raw = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    meta = _Fields(raw, str(meta_path))
    if meta["format"] != FORMAT:
        raise ValueError(f"{meta_path}: unsupported format {meta['format']!r} (expected {FORMAT})")
    if meta_checksum(raw) != meta["config_sha256"]:
        raise ValueError(f"{meta_path} was changed after it was saved (its checksum does not match); "
                         "change a saved memory through MemoirEditor and save it again")
    return meta


def check_state(state: dict, meta: _Fields, config: MemoirConfig, state_path: pathlib.Path) -> None:
    """What the state file's tensors mean, checked before any of it is used."""
    def bad(field, why):
        raise ValueError(f"{state_path}: {field} {why}")

    for name in ("memory", "bank_words", "bank_edit_ids", "permutation", "background_mean", "background_std"):
        if name not in state:
            bad(name, "is missing")
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad(name, "holds non-finite values (NaN or inf)")
    perm = state["permutation"]
    if perm.dim() != 1 or not torch.equal(perm.sort().values, torch.arange(perm.numel(), dtype=perm.dtype)):
        bad("permutation", "is not a permutation")
    words, ids = state["bank_words"], state["bank_edit_ids"].tolist()
    if words.dim() != 2 or words.shape[0] != len(ids):
        bad("bank_words", f"has shape {tuple(words.shape)} for {len(ids)} edit ids")
    if len(set(ids)) != len(ids):
        bad("bank_edit_ids", "repeats an edit id")
    if len(ids) and not bool((popcounts(words) == config.top_k).all()):
        bad("bank_words", f"has a mask without exactly top_k = {config.top_k} columns")
    if config.memory == "private":
        check_private(state, ids, config, bad)
    records = [e["edit_id"] if isinstance(e, dict) and "edit_id" in e else None for e in meta["edits"]]
    if sorted(records, key=str) != sorted(ids, key=str):
        raise ValueError(f"{state_path.parent / CONFIG_FILE}: its edits ({len(records)}) are not the bank's "
                         f"({len(ids)} masks)")
    if ids and max(ids) >= int(meta["next_edit_id"]):
        raise ValueError(f"{state_path.parent / CONFIG_FILE}: next_edit_id {meta['next_edit_id']} is not above "
                         f"every stored edit id")


def check_private(state: dict, bank_ids: list[int], config: MemoirConfig, bad) -> None:
    """The private blocks of memory "private": one per stored edit, shapes that fit the config."""
    names = ("private_ids", "private_cols", "private_u", "private_v", "private_lens")
    for name in names:
        if name not in state:
            bad(name, "is missing (the config says memory 'private')")
    ids, cols, u, v, lens = (state[n] for n in names)
    if sorted(ids.tolist()) != sorted(bank_ids):
        bad("private_ids", f"holds blocks of edits {sorted(ids.tolist())[:8]}... but the bank {sorted(bank_ids)[:8]}...")
    n, k, r = len(bank_ids), config.top_k, config.private_rank
    if cols.shape != (n, k) or v.shape != (n, r, k) or u.dim() != 3 or u.shape[0] != n or u.shape[2] != r:
        bad("private_cols/u/v", f"have shapes {tuple(cols.shape)}, {tuple(u.shape)}, {tuple(v.shape)} for {n} edits "
                                f"of top_k {k} at private_rank {r}")
    if n and (int(cols.min()) < 0 or int(cols.max()) >= state["memory"].shape[1]):
        bad("private_cols", "names a column outside the memory")
    if lens.shape != (n,) or (n and int(lens.min()) < 1):
        bad("private_lens", f"must hold one target length >= 1 per edit ({n}); has shape {tuple(lens.shape)}")


def read_save(path: pathlib.Path):
    """``(meta, state, config, records)`` of a saved memory, every check that needs no model passed."""
    meta_path, state_path = path / CONFIG_FILE, path / STATE_FILE
    if not meta_path.exists() or not state_path.exists():
        raise FileNotFoundError(f"{path} is not a saved MEMOIR memory (needs {CONFIG_FILE} and {STATE_FILE})")
    meta = read_meta(path)
    if _sha256(state_path) != meta["state_sha256"]:
        raise ValueError(f"{state_path} is corrupt: its checksum does not match {CONFIG_FILE}")
    state = load_file(str(state_path))
    config = MemoirConfig.from_dict(meta["config"], source=f"{meta_path} 'config'")
    check_state(state, meta, config, state_path)
    try:
        records = {r.edit_id: r for r in map(record_from_json, meta["edits"])}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{meta_path}: an edit record is malformed ({e})") from None
    return meta, state, config, records


def load_editor(cls, model, tokenizer, path):
    path = pathlib.Path(path)
    recover_folder(path)  # a save killed between its renames leaves the previous version aside
    meta, state, config, records = read_save(path)
    state_path = path / STATE_FILE
    t = _Fields(meta["target"], f"{path / CONFIG_FILE} 'target'")
    editor = cls(model, tokenizer, config, background=(state["background_mean"], state["background_std"]))
    try:
        if t["name"] != editor.target.qualified_name or t["in_features"] != editor.target.in_features:
            raise ValueError(f"saved edits target {t['name']} ({t['in_features']} features) but this model's "
                             f"target is {editor.target.qualified_name} ({editor.target.in_features})")
        layer = editor.layer
        dtype = str(layer.base.weight.dtype).removeprefix("torch.")
        if t["dtype"] != dtype:
            raise ValueError(f"these edits were saved on the model in {t['dtype']}, this one is loaded in {dtype}: "
                             f"load the model with dtype=torch.{t['dtype']}")
        if weight_fingerprint(layer.base.weight) != t["weight_sha256"]:
            raise ValueError("these edits were made on a different base model (weight fingerprint differs)")
        if state["memory"].shape != layer.memory.shape:
            raise ValueError(f"memory shape {tuple(state['memory'].shape)} != {tuple(layer.memory.shape)}")
        with torch.no_grad():
            layer.memory.copy_(state["memory"].to(layer.memory.dtype))
            layer.permutation.copy_(state["permutation"])
        layer.bank.load(state["bank_words"], state["bank_edit_ids"].tolist())
        editor._records = EditRecords(records)
        editor.keys.load(state, layer.memory.device)
        if layer.subject is not None:
            if "subject_keys" not in state:
                raise ValueError(f"{state_path} has no subject keys but its config uses router 'subject'")
            device = layer.memory.device
            layer.subject.keys = state["subject_keys"].to(device)
            layer.subject.edit_ids = state["subject_key_ids"].to(device)
            layer.subject.groups = state["subject_key_groups"].to(device)
            layer.subject.mean = state["subject_mean"].to(device)
        if layer.private is not None:
            layer.private.load(state, layer.memory.device)
        if "background_masks" in state:
            editor._background_masks = state["background_masks"].to(layer.memory.device)
        editor.calibrate_threshold()
        editor.removed = [int(i) for i in meta["removed_edit_ids"]]
        editor._next_id = int(meta["next_edit_id"])
        editor._templates = meta["context_templates"]
    except BaseException:
        editor.detach()
        raise
    return editor


def describe(path) -> dict:
    """What a saved memory holds, every load check but the base model's passed (``memoir inspect``)."""
    path = pathlib.Path(path)
    meta, state, config, _ = read_save(path)
    memory = state["memory"]
    used = (memory != 0).any(dim=0)
    return {
        "path": str(path),
        "format": meta["format"],
        "target": meta["target"],
        "config": {k: getattr(config, k) for k in ("layer", "top_k", "threshold", "threshold_mode", "router", "memory")},
        "edits": meta["edits"],
        "removed_edit_ids": meta["removed_edit_ids"],
        "next_edit_id": meta["next_edit_id"],
        "memory": {"shape": list(memory.shape), "columns_written": int(used.sum()),
                   "norm": float(memory.float().norm())},
        "bytes": sum((path / name).stat().st_size for name in OWN_FILES),
    }
