"""Background statistics: what an ordinary prompt's edited-layer input looks like on the base model.

TopHash de-centres each prompt feature by the background mean (and, with ``feature_scaling: std``,
divides by the background std) so that masks pick features particular to the prompt, not the ones
every text activates.  The statistics come from a fixed list of generic texts, once per base model,
and are cached under the user cache dir keyed by the base weight, the target module and the texts.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import logging

import torch
from safetensors.torch import load_file, save_file

from memoir.atomic import atomic_file
from memoir.models import cache_dir
from memoir.persist import weight_fingerprint

log = logging.getLogger(__name__)


def default_background_texts() -> list[str]:
    text = importlib.resources.files("memoir").joinpath("data/background.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


RELATION_PLACEHOLDERS = ("it", "this one", "them", "that person", "the thing")


def relation_templates() -> list[str]:
    """Wordings of common relations, ``{}`` standing for the subject ("The capital of {} is")."""
    text = importlib.resources.files("memoir").joinpath("data/relation_templates.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def relation_texts() -> list[str]:
    """Relation wordings with neutral placeholder subjects ("The capital of it is")."""
    return [t.format(RELATION_PLACEHOLDERS[i % len(RELATION_PLACEHOLDERS)]) for i, t in enumerate(relation_templates())]


def background_statistics(model, tokenizer, target, texts: list[str]):
    """``(mean [D], std [D])`` of the texts' mean edited-layer inputs, from the cache when present."""
    key = hashlib.sha256(
        "\n".join([weight_fingerprint(target.module.weight), target.qualified_name, *texts]).encode()
    ).hexdigest()[:32]
    path = cache_dir() / "background" / f"{key}.safetensors"
    if path.exists():
        try:
            state = load_file(str(path))
            return state["mean"], state["std"]
        except Exception as exc:  # a damaged cache entry is recomputed
            log.warning("ignoring unreadable background cache %s: %s", path, exc)
    mean, std = compute_background_statistics(model, tokenizer, target, texts)
    try:
        with atomic_file(path) as tmp:
            save_file({"mean": mean.cpu().contiguous(), "std": std.cpu().contiguous()}, str(tmp))
    except OSError as exc:
        log.warning("could not cache background statistics in %s: %s", path, exc)
    return mean, std


@torch.no_grad()
def compute_background_statistics(model, tokenizer, target, texts: list[str], batch_size: int = 16):
    """Mean and std over texts of each text's mean edited-layer input (frozen base model)."""
    if not texts:
        raise ValueError("background_texts is empty")
    feats = []
    seen = []
    handle = target.module.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            seen.clear()
            model(**enc, use_cache=False)
            w = enc["attention_mask"].float()
            acts = seen[0].float().reshape(*w.shape, -1)
            feats.append(torch.einsum("bs,bsd->bd", w, acts) / w.sum(1, keepdim=True))
    finally:
        handle.remove()
    feats = torch.cat(feats)
    std = feats.std(dim=0) if len(feats) > 1 else torch.ones_like(feats[0])
    return feats.mean(dim=0), std.clamp_min(1e-6)
