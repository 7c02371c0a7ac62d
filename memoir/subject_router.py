"""Subject verification for routing (``router: subject``): an edit is eligible for a query only when
the query mentions the edit's subject, judged from hidden states, not from strings.

Key of an edit: the hidden state, at an early layer ``L``, of the last token of the edit's subject in
``PREFIX + prompt``, minus the mean token state of background texts there (a few keys per edit:
the subject as given and lower-cased).  Score of a query for an edit: the largest cosine between
the key and any token state of ``PREFIX + query`` (one partial forward through the first ``L``
layers at the prompt pass).  The neutral ``PREFIX`` matters: without it the subject of a prompt
often sits on the first tokens, whose states are dominated by the attention sink and match no
later mention of the same words (experiments/subject_key_probe.py measures both).

Among the eligible edits (score >= ``subject_threshold``) the memory layer picks the one with the
largest TopHash mask overlap, so two edits about one subject are told apart by their relation, and
switches it on only when that overlap reaches ``threshold``: with hundreds of stored subjects some
unrelated prompt token matches some key by chance, but not with the edit's wording as well
(experiments/subject_routing_sim.py measures both rules on the whole public files).
Only the prompt is searched for the subject: in a teacher-forced ``prompt + target`` pass the
target tokens are not part of the query.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from memoir.state import GrowingBuffers

PREFIX = "Here is a question. "


class _Stop(Exception):
    pass


def token_states(model, layers, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states after decoder layer ``layer - 1`` (``hidden_states[layer]``): ``[B, S, d]``.

    Runs only the first ``layer`` decoder layers (a forward hook stops the pass there).
    """
    seen = []

    def grab(module, args, output):
        seen.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = layers[layer - 1].register_forward_hook(grab)
    kwargs = {}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"decoder layer {layer - 1} did not run")
    return seen[0].float()


def with_prefix(prefix_ids: list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int):
    """Rows ``prefix + row`` (left padded again) and the mask of the row's own tokens."""
    rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
    length = len(prefix_ids) + max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), length), dtype=torch.long)
    own = torch.zeros((len(rows), length), dtype=torch.bool)
    for b, row in enumerate(rows):
        full = prefix_ids + row
        ids[b, length - len(full):] = torch.tensor(full)
        attn[b, length - len(full):] = 1
        own[b, length - len(row):] = True
    device = input_ids.device
    return ids.to(device), attn.to(device), own.to(device)


class SubjectKeys(GrowingBuffers):
    """Subject keys of the stored edits (module state): ``keys [K, d]`` float32, ``edit_ids [K]``,
    and the background token mean ``mean [d]`` at the key layer."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("keys", torch.zeros((0, dim)))
        self.register_buffer("edit_ids", torch.zeros((0,), dtype=torch.int64))
        self.register_buffer("mean", torch.zeros(dim))

    def __len__(self) -> int:
        return self.keys.shape[0]

    def add(self, edit_id: int, keys: torch.Tensor) -> None:
        keys = F.normalize(keys.float().to(self.keys.device) - self.mean, dim=-1)
        self.keys = torch.cat([self.keys, keys])
        ids = torch.full((keys.shape[0],), int(edit_id), dtype=torch.int64, device=self.keys.device)
        self.edit_ids = torch.cat([self.edit_ids, ids])

    def pop(self, edit_id: int) -> None:
        keep = self.edit_ids != int(edit_id)
        self.keys, self.edit_ids = self.keys[keep], self.edit_ids[keep]

    def snapshot(self):
        return self.keys, self.edit_ids

    def restore(self, snapshot) -> None:
        self.keys, self.edit_ids = snapshot

    def scores(self, states: torch.Tensor, own: torch.Tensor, bank_ids: torch.Tensor) -> torch.Tensor:
        """``[B, N]``: per query and bank row, the best cosine between the row's keys and the query's tokens."""
        b, n = states.shape[0], bank_ids.shape[0]
        out = torch.full((b, n), -1.0, device=states.device)
        if len(self) == 0 or n == 0:
            return out
        q = F.normalize(states - self.mean.to(states.device), dim=-1)  # [B, S, d]
        sim = torch.einsum("bsd,kd->bsk", q, self.keys.to(states.device))
        sim = sim.masked_fill(~own[..., None], -1.0).amax(dim=1)  # [B, K]: best query token per key
        # Key -> bank row (edit ids are unique in the bank); keys of edits no longer stored drop out.
        match = self.edit_ids.to(states.device)[:, None] == bank_ids.to(states.device)[None, :]  # [K, N]
        per_row = torch.where(match[None], sim[:, :, None], torch.full_like(sim[:, :, None], -1.0))
        return per_row.amax(dim=1)


def subject_positions(tokenizer, prefix: str, prompt: str, subject: str | None) -> tuple[list[int], list[int]]:
    """Token ids of ``prefix + prompt`` and the index of the subject's last token in them.

    Without a subject (or when it is not in the prompt) the position is ``-1``: the caller falls back
    to the prompt tokens whose states stand out most from the background.
    """
    text = prefix + prompt
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if not subject:
        return ids, [-1]
    at = text.find(subject, len(prefix))
    if at < 0:
        at = text.lower().find(subject.lower(), len(prefix))
    if at < 0:
        return ids, [-1]
    end = at + len(subject)
    pos = [j for j, (a, b) in enumerate(offsets) if a < end and b > at]
    return ids, [pos[-1] if pos else -1]
