"""EasyEdit-style editing metrics, batched.

Two layers:

* pure functions on logits and a :class:`~memoir.batching.Batch` (``score_targets``,
  ``ood_accuracy``, ``agreement``, ``exact_match``): testable with hand-made logits;
* batched drivers (``teacher_forced``, ``ood_scores``, ``generation_em``) that take a *scorer*:
  any object with ``logits(batch, keep)`` (logits of the last ``keep`` positions, or all when
  ``keep`` is None), ``tokenizer`` and ``generate(prompts, max_new_tokens)``.  The scorer
  decides the routing (MEMOIR routes each row from ``batch.prompt_mask``).

Alignment: ``batch`` rows are ``prompt_ids + target_ids`` left padded (see ``build_batch``);
target tokens are ``tokenizer(" " + target)``.  The logit at position ``t - 1`` predicts token ``t``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memoir.batching import Batch, build_batch, prompt_ids, target_ids

OOD_PROB_THRESHOLD = 0.8
DEFAULT_BATCH_SIZE = 16
# Largest logits tensor (elements) one forward may produce: rows * kept positions * vocab.
DEFAULT_LOGIT_BUDGET = 1 << 26


@dataclass
class TargetScore:
    """Teacher-forced score of one row's target tokens."""

    acc: float  # fraction of target tokens whose argmax is the target token
    nll: float  # mean negative log-likelihood of the target tokens
    argmax: list[int]  # the argmax token at each target position
    n_tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(min(self.nll, 700.0))


# ----------------------------------------------------------------------------- pure functions
def score_targets(logits: torch.Tensor, batch: Batch) -> list[TargetScore]:
    """Per-row token accuracy, mean NLL and argmax on the target positions.

    ``logits`` is ``[B, K, V]`` for the *last* K positions of the batch (K = S: all positions);
    it must cover every position that predicts a target token.
    """
    ids, tmask = batch.input_ids, batch.target_mask
    b, s = ids.shape
    k = logits.shape[1]
    if logits.shape[0] != b or k > s:
        raise ValueError(f"logits {tuple(logits.shape)} do not fit a batch of shape {tuple(ids.shape)}")
    off = s - k
    if bool(tmask[:, : off + 1].any()):
        raise ValueError(f"logits of the last {k} positions miss target positions (need {int(_span_needed(batch))})")
    logits = logits[:, :-1].float()  # predicts positions off+1 .. s-1
    labels = ids[:, off + 1 :].to(logits.device)
    mask = tmask[:, off + 1 :].to(logits.device)
    pred = logits.argmax(-1)
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    n = mask.sum(1)
    if bool((n == 0).any()):
        raise ValueError("a row has no target tokens")
    acc = ((pred == labels) & mask).sum(1).float() / n
    mean_nll = (nll * mask).sum(1) / n
    out = []
    for r in range(b):
        out.append(TargetScore(float(acc[r]), float(mean_nll[r]), pred[r][mask[r]].tolist(), int(n[r])))
    return out


def _span_needed(batch: Batch) -> int:
    """Positions (from the end) whose logits ``score_targets`` needs: longest target + 1."""
    return int(batch.target_mask.sum(1).max()) + 1


def ood_accuracy(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 threshold: float = OOD_PROB_THRESHOLD) -> list[float]:
    """Per row: fraction of tokens (each real token after the first) whose probability > threshold.

    This is EasyEdit's ``OOD_PPL``: the model is scored on the sequence alone
    (no separate target), a token counts when ``-log p < -log threshold``.
    """
    logits = logits[:, :-1].float()
    labels = input_ids[:, 1:].to(logits.device)
    attn = attention_mask.bool().to(logits.device)
    mask = attn[:, 1:] & attn[:, :-1]
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    hit = (nll < -math.log(threshold)) & mask
    n = mask.sum(1)
    return [float(h) / float(c) if c > 0 else float("nan") for h, c in zip(hit.sum(1).tolist(), n.tolist())]


def agreement(pre: list[int], post: list[int]) -> float:
    """Loc: fraction of answer positions whose argmax token is unchanged."""
    if len(pre) != len(post):
        raise ValueError(f"pre-edit and post-edit answers differ in length ({len(pre)} vs {len(post)})")
    if not pre:
        raise ValueError("empty locality answer")
    return sum(int(a == b) for a, b in zip(pre, post)) / len(pre)


def exact_match(output: str, target: str) -> bool:
    """Does the stripped generation start with the target (case-insensitive)?"""
    return output.strip().lower().startswith(target.strip().lower())


def mean(values) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


# ----------------------------------------------------------------------------- batching helpers
def _chunks(lengths: list[tuple[int, int]], batch_size: int, vocab: int, budget: int):
    """Consecutive index chunks: ``lengths[i] = (total_len, kept_len)``; rows*kept*V <= budget."""
    chunk, kept = [], 0
    for i, (_, keep) in enumerate(lengths):
        new_keep = max(kept, keep)
        if chunk and (len(chunk) >= batch_size or (len(chunk) + 1) * new_keep * vocab > budget):
            yield chunk
            chunk, new_keep = [], keep
        chunk.append(i)
        kept = new_keep
    if chunk:
        yield chunk


def _vocab(scorer) -> int:
    model = getattr(scorer, "model", None)
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "vocab_size", None) or len(scorer.tokenizer)
    return int(v)


def teacher_forced(scorer, prompts: list[str], targets: list[str], batch_size: int = DEFAULT_BATCH_SIZE,
                   logit_budget: int = DEFAULT_LOGIT_BUDGET, on_batch=None) -> list[TargetScore]:
    """Score ``target`` after ``prompt + " "`` for each pair (Rel, Gen, Loc answers, PPL).

    ``on_batch(indices)`` is called after each forward (e.g. to read routing decisions).
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    tok = scorer.tokenizer
    lengths = []
    for p, t in zip(prompts, targets):
        np_, nt = len(prompt_ids(tok, p)), len(target_ids(tok, t))
        lengths.append((np_ + nt, nt + 1))
    out: list[TargetScore | None] = [None] * len(prompts)
    for idx in _chunks(lengths, batch_size, _vocab(scorer), logit_budget):
        batch = build_batch(tok, [prompts[i] for i in idx], [targets[i] for i in idx])
        logits = scorer.logits(batch, keep=_span_needed(batch))
        for i, score in zip(idx, score_targets(logits, batch)):
            out[i] = score
        if on_batch is not None:
            on_batch(idx)
    return out  # type: ignore[return-value]


def ood_scores(scorer, texts: list[str], batch_size: int = DEFAULT_BATCH_SIZE,
               logit_budget: int = DEFAULT_LOGIT_BUDGET, threshold: float = OOD_PROB_THRESHOLD,
               on_batch=None) -> list[float]:
    """OOD accuracy (see :func:`ood_accuracy`) of each text scored alone; routing from the whole text."""
    tok = scorer.tokenizer
    lengths = [(n, n) for n in (len(prompt_ids(tok, t)) for t in texts)]
    out: list[float | None] = [None] * len(texts)
    for idx in _chunks(lengths, batch_size, _vocab(scorer), logit_budget):
        batch = build_batch(tok, [texts[i] for i in idx])
        logits = scorer.logits(batch, keep=None)
        for i, v in zip(idx, ood_accuracy(logits, batch.input_ids, batch.attention_mask, threshold)):
            out[i] = v
        if on_batch is not None:
            on_batch(idx)
    return out  # type: ignore[return-value]


def generation_em(scorer, prompts: list[str], targets: list[str], batch_size: int = DEFAULT_BATCH_SIZE,
                  extra_tokens: int = 2) -> list[tuple[bool, str]]:
    """Greedy generation exact match: ``max_new_tokens = len(target tokens) + extra_tokens``.

    Rows are batched; each row's output is cut to its own token budget before decoding.
    Returns ``(match, generated_text)`` per prompt.
    """
    tok = scorer.tokenizer
    budgets = [len(target_ids(tok, t)) + extra_tokens for t in targets]
    ids = continuations(scorer, prompts, max(budgets, default=0), batch_size)
    out = []
    for row, budget, target in zip(ids, budgets, targets):
        text = tok.decode(row[:budget], skip_special_tokens=True)
        out.append((exact_match(text, target), text))
    return out


def continuations(scorer, prompts: list[str], max_new_tokens: int, batch_size: int = DEFAULT_BATCH_SIZE,
                  on_batch=None) -> list[list[int]]:
    """Greedy continuations (token ids) of each prompt, batched; ``on_batch(indices)`` after each batch."""
    out: list = [None] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(len(prompts), start + batch_size)))
        for i, ids in zip(idx, scorer.generate_ids([prompts[i] for i in idx], max_new_tokens)):
            out[i] = list(ids)
        if on_batch is not None:
            on_batch(idx)
    return out


# ----------------------------------------------------------------------------- model helpers
def keeps_logits(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def model_logits(model, batch: Batch, keep: int | None, supports_keep: bool | None = None) -> torch.Tensor:
    """Logits of the last ``keep`` positions (all when None) of a plain HF causal LM."""
    device = next(model.parameters()).device
    kwargs = {}
    if supports_keep is None:
        supports_keep = keeps_logits(model)
    if keep is not None and supports_keep:
        kwargs["logits_to_keep"] = keep
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False, **kwargs
        ).logits
    if keep is not None and logits.shape[1] > keep:
        logits = logits[:, -keep:]
    return logits


@torch.no_grad()
def greedy_generate_ids(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (token ids, prompt excluded), left padded batch."""
    device = next(model.parameters()).device
    batch = build_batch(tokenizer, prompts, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=pad,
    )
    new = out[:, batch.input_ids.shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    rows = []
    for row in new:
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        rows.append(row)
    return rows


def loss_on_targets(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over target tokens (for the baselines' optimisation)."""
    k = logits.shape[1]
    s = batch.input_ids.shape[1]
    labels = batch.labels[:, s - k + 1 :].to(logits.device)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
