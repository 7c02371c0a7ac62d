"""Tokenising prompt(+target) batches with an exact prompt/target boundary and left padding."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S], left padded
    attention_mask: torch.Tensor  # [B, S]
    prompt_mask: torch.Tensor  # [B, S] bool: prompt tokens (incl. BOS), not pads, not targets
    target_mask: torch.Tensor  # [B, S] bool: target tokens

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.prompt_mask, self.target_mask)))

    @property
    def labels(self) -> torch.Tensor:
        """Next-token labels: the token id on target positions, -100 elsewhere."""
        return torch.where(self.target_mask, self.input_ids, torch.full_like(self.input_ids, -100))


def target_ids(tokenizer, target: str) -> list[int]:
    """Target tokens as they follow a prompt: ``" " + target``, no special tokens."""
    ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    # Some tokenizers append EOS as a special token; a prompt must not end the sequence.
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id and len(ids) > 1:
        ids = ids[:-1]
    if not ids:
        raise ValueError(f"prompt {prompt!r} tokenises to nothing")
    return ids


def build_batch(tokenizer, prompts, targets=None, device=None) -> Batch:
    """Rows ``prompt_ids + target_ids`` (targets optional), left padded with the pad token."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given (an empty list): pass a prompt or a list of prompts")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is a {type(p).__name__} ({p!r}), not a string")
    if targets is not None and isinstance(targets, str):
        targets = [targets] * len(prompts)
    if targets is not None and len(targets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    rows = []
    for i, p in enumerate(prompts):
        pi = prompt_ids(tokenizer, p)
        ti = target_ids(tokenizer, targets[i]) if targets is not None else []
        rows.append((pi, ti))
    return pad_rows(rows, tokenizer, device)


def pad_rows(rows, tokenizer, device=None) -> Batch:
    """A :class:`Batch` of ``(prompt ids, target ids)`` rows, left padded with the pad token."""
    length = max(len(pi) + len(ti) for pi, ti in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    b = len(rows)
    ids = torch.full((b, length), pad, dtype=torch.long)
    attn = torch.zeros((b, length), dtype=torch.long)
    pmask = torch.zeros((b, length), dtype=torch.bool)
    tmask = torch.zeros((b, length), dtype=torch.bool)
    for r, (pi, ti) in enumerate(rows):
        n = len(pi) + len(ti)
        start = length - n
        ids[r, start:] = torch.tensor(pi + ti, dtype=torch.long)
        attn[r, start:] = 1
        pmask[r, start : start + len(pi)] = True
        tmask[r, start + len(pi) :] = True
    batch = Batch(ids, attn, pmask, tmask)
    return batch.to(device) if device is not None else batch


def target_logits_and_labels(logits: torch.Tensor, batch: Batch):
    """Align next-token logits with target labels: ``(logits [B, S-1, V], labels [B, S-1])``."""
    return logits[:, :-1], batch.labels[:, 1:]
