"""The optimisation loop both baselines share: target-token cross-entropy, Adam, loss-threshold stop."""
from __future__ import annotations

import torch


def train_on_target(model, batch, labels, param, n_iter, lr, early_stop_loss, weight_decay=0.0, after_step=None):
    """Fit ``param`` so every row's last ``labels.shape[1]`` tokens follow; returns ``(steps, loss)``."""
    n_t = labels.shape[1]
    opt = torch.optim.Adam([param], lr=lr, weight_decay=weight_decay)
    steps, loss_value = 0, float("nan")
    with torch.enable_grad():
        for _ in range(n_iter):
            logits = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).logits[:, -(n_t + 1) : -1]
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
