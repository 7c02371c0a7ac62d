"""FT-L: fine-tune the edited layer's projection weight directly (EasyEdit FT-L style).

Per edit: Adam on that single weight matrix for ``n_iter`` steps, cross-entropy on the target
tokens of ``prompt + " " + target`` (one row, no context templates, no memory, no locality
term).  Edits accumulate in the weight: the stream is applied sequentially to the same matrix.
Optional ``norm_constraint`` clamps the weight to ``W0 +- eps`` after each step (the "L" of
FT-L in ROME/EasyEdit; off by default as in EasyEdit's LLaMA FT hparams).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch

from memoir.batching import build_batch
from memoir.config import DictFields
from memoir.baselines._train import train_on_target
from memoir.models import locate_target


@dataclass
class FTConfig(DictFields):
    layer: int | None = None
    n_iter: int = 30
    lr: float = 5e-4
    norm_constraint: float | None = None
    early_stop_loss: float = 1e-2  # EasyEdit FT stops once the loss is below 1e-2
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.n_iter < 0 or self.lr <= 0:
            raise ValueError(f"FTConfig: n_iter must be >= 0 and lr > 0 (got {self.n_iter}, {self.lr})")



@dataclass
class FTResult:
    edit_id: int
    steps: int
    loss: float
    seconds: float


class FTEditor:
    """Sequential FT-L on one FFN output projection (the same one MEMOIR wraps)."""

    name = "ft"

    def __init__(self, model, tokenizer, config: FTConfig | None = None):
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.model, self.tokenizer = model, tokenizer
        self.config = config or FTConfig()
        self.target = locate_target(model, self.config.layer)
        self.config = dataclasses.replace(self.config, layer=self.target.layer_index)
        for p in model.parameters():
            p.requires_grad_(False)
        self.weight = self.target.module.weight
        self.original = self.weight.detach().clone()
        self.n_edits = 0

    @property
    def device(self):
        return self.weight.device

    def prompt_span(self, span):  # no routing: same interface as MemoirEditor
        return contextlib.nullcontext()

    def edit(self, prompt: str, target: str) -> FTResult:
        cfg = self.config
        start = time.perf_counter()
        batch = build_batch(self.tokenizer, [prompt], [target], device=self.device)
        n_t = int(batch.target_mask.sum())
        labels = batch.input_ids[:, -n_t:]
        w = self.weight
        w.requires_grad_(True)
        def constrain():
            if cfg.norm_constraint:
                with torch.no_grad():
                    eps = cfg.norm_constraint
                    w.copy_(torch.clamp(w, self.original - eps, self.original + eps))

        try:
            steps, loss_value = train_on_target(self.model, batch, labels, w, cfg.n_iter, cfg.lr,
                                                cfg.early_stop_loss, cfg.weight_decay, constrain, target=self.target)
        finally:
            w.requires_grad_(False)
            w.grad = None
        self.n_edits += 1
        return FTResult(self.n_edits - 1, steps, loss_value, time.perf_counter() - start)

    @torch.no_grad()
    def restore(self) -> None:
        """Undo every edit."""
        self.weight.copy_(self.original)
        self.n_edits = 0
