"""The optimisation loop both baselines share: target-token cross-entropy, Adam, loss-threshold stop."""
from __future__ import annotations

import contextlib

import torch

from memoir.replay import capture_below, contiguous_head, keep_logits, replaying_below


def train_on_target(model, batch, labels, param, n_iter, lr, early_stop_loss, weight_decay=0.0, after_step=None,
                    target=None):
    """Fit ``param`` so every row's last ``labels.shape[1]`` tokens follow; returns ``(steps, loss)``.

    With ``target`` (the edited layer's ``Target``; ``param`` must only act at or above it) the
    frozen layers below run once and are replayed, and only the scored logits are computed,
    exactly as MEMOIR's editor does: same result, a fraction of the time.
    """
    n_t = labels.shape[1]
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    replay = None
    if target is not None:
        with torch.no_grad(), capture_below(target) as seen:
            model(**kwargs, **keep_logits(model, 1))
        replay = seen[0] if seen else None
        kwargs.update(keep_logits(model, n_t + 1))
    opt = torch.optim.Adam([param], lr=lr, weight_decay=weight_decay)
    steps, loss_value = 0, float("nan")
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        if target is not None:
            stack.enter_context(replaying_below(target, replay))
            stack.enter_context(contiguous_head(model))
        for _ in range(n_iter):
            logits = model(**kwargs).logits[:, -(n_t + 1) : -1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
            loss_value = float(loss.detach())
            if loss_value < early_stop_loss:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if after_step is not None:
                after_step()
    return steps, loss_value
