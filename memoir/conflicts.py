"""Which stored edits a new edit updates: the same question (subject and relation) with a new answer.

Rule (``MemoirEditor.conflicts``): an earlier edit ``j`` asks the new edit's question when
1. it is about the same subject: under ``router: subject`` the new prompt passes ``j``'s subject
   test (the score the router computes for a query, >= ``subject_threshold``); otherwise both
   edits name a subject and the names are equal up to case and spacing; and
2. it asks the same relation: the TopHash masks of the two prompts *with their subjects replaced by
   one neutral phrase* share at least ``conflict_threshold`` of their columns.  With the subject
   left in, the shared subject dominates the pooled features and another relation of the same
   subject overlaps about as much as a rewording of the same question
   (experiments/results/conflict_rule_probe.json); an edit without a subject is compared by its
   whole prompt.
The target plays no part: re-teaching a question (with its old or a new answer) replaces it too.
"""
from __future__ import annotations

import torch

from memoir import ops
from memoir.batching import build_batch

PLACEHOLDER = "this thing"


def _norm(text: str | None) -> str:
    return " ".join(str(text).lower().split()) if text else ""


def relation_prompt(prompt: str, subject: str | None) -> str:
    """The prompt with its subject replaced by :data:`PLACEHOLDER` (unchanged without one)."""
    if not subject:
        return prompt
    at = prompt.lower().find(subject.lower())
    if at < 0:
        return prompt
    return prompt[:at] + PLACEHOLDER + prompt[at + len(subject):]


@torch.no_grad()
def relation_masks(editor, requests) -> torch.Tensor:
    """Packed TopHash masks ``[n, W]`` of the requests' relation prompts (frozen model)."""
    prompts = [relation_prompt(r.prompt, r.subject) for r in requests]
    batch = build_batch(editor.tokenizer, prompts, device=editor.device)
    return editor.layer.query_masks(editor.layer_inputs(batch), batch.prompt_mask)[2]


@torch.no_grad()
def same_subject(editor, request) -> list[int]:
    """Ids of the stored edits about the new request's subject (rule 1)."""
    layer = editor.layer
    if len(layer.bank) == 0:
        return []
    ids = layer.bank.edit_ids
    if layer.subject is not None:
        states, own = editor._subject_states(texts=[request.prompt])
        scores = layer.subject.scores(states, own, layer.bank.ids)[0]
        return [ids[i] for i in (scores >= editor.config.subject_threshold).nonzero().flatten().tolist()]
    name = _norm(request.subject)
    if not name:
        return []
    return [i for i in ids if _norm(editor._records[i].subject) == name]


@torch.no_grad()
def find_conflicts(editor, request) -> list[int]:
    """Ids of the stored edits that ask the new request's question (both rules)."""
    candidates = same_subject(editor, request)
    if not candidates:
        return []
    masks = relation_masks(editor, [request] + [editor._records[i] for i in candidates])
    shared = ops.overlap_counts(masks[:1], masks[1:])[0].float() / ops.popcounts(masks[:1]).clamp_min(1)[0]
    return [i for i, s in zip(candidates, shared.tolist()) if s >= editor.config.conflict_threshold]
