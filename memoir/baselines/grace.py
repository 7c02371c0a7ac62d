"""GRACE (Hartvigsen et al. 2023) as in EasyEdit: a key-value codebook at one layer.

* key   = the layer *input* at the last prompt token of the edit;
* value = a replacement for the layer *output* at that position, trained for ``n_iter`` Adam
  steps at ``lr`` (EasyEdit: lr 1.0) with cross-entropy on the target tokens;
* each key has a deferral radius ``eps`` (init ``eps``, default 1.0, euclidean distance).

Codebook update when a new edit arrives (EasyEdit / paper): no key within ``eps_init + eps_near``
-> add a key; a near key with a *different* target -> add a key and split: both radii become
half the distance (the old one minus 1e-5) -- except for a numerically identical key (distance
<= 1e-4 |key|, e.g. the same prompt re-edited), whose slot the new edit overwrites (a departure:
EasyEdit would split to two zero radii that only a bit-exact query reaches); a near key with the *same* target -> grow its radius
to the distance (if larger) and keep training its value.

Inference: each batch row is routed from its prompt (prefill pass): query = layer input at the
row's last prompt token; if the nearest key is within its radius, the row's layer output is
replaced by that key's value.  ``replacement="last"`` (default, EasyEdit ``replace_last`` with a
fixed token location) replaces only the last prompt token's output, which is exactly where the
value was trained; the target / generated tokens see it through attention (and the KV cache).
``replacement="after"`` replaces the last prompt token and every later position, in training,
teacher forcing and each decode step.  Routing is vectorised over rows (``torch.where``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from memoir.batching import build_batch
from memoir.config import DictFields
from memoir.baselines._train import train_on_target
from memoir.models import locate_target
from memoir.routing import PromptRouting

REPLACEMENTS = ("last", "after")


@dataclass
class GraceConfig(DictFields):
    layer: int | None = None
    n_iter: int = 30
    lr: float = 1.0
    eps: float = 1.0
    replacement: str = "last"
    val_init: str = "cold"  # "cold": uniform random (EasyEdit default); "warm": the current layer output
    early_stop_loss: float = 0.0  # 0 = always run n_iter steps (EasyEdit)
    seed: int = 0

    def __post_init__(self):
        if self.replacement not in REPLACEMENTS:
            raise ValueError(f"GraceConfig.replacement must be one of {REPLACEMENTS}, got {self.replacement!r}")
        if self.val_init not in ("cold", "warm"):
            raise ValueError(f"GraceConfig.val_init must be 'cold' or 'warm', got {self.val_init!r}")
        if self.eps <= 0 or self.lr <= 0 or self.n_iter < 0:
            raise ValueError("GraceConfig: eps and lr must be > 0, n_iter >= 0")



def last_positions(span: torch.Tensor) -> torch.Tensor:
    """Index of the last True position per row of a [B, S] bool span (0 for empty rows)."""
    pos = torch.arange(span.shape[1], device=span.device).expand_as(span)
    return torch.where(span.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values.clamp_min(0)


class GraceLayer(nn.Module):
    """Wraps the projection: ``base(a)`` with codebook replacements."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, replacement: str = "last"):
        super().__init__()
        w = base.weight
        self.base = base
        self.replacement = replacement
        self.keys = torch.zeros((0, in_features), dtype=torch.float32, device=w.device)
        self.values = torch.zeros((0, out_features), dtype=torch.float32, device=w.device)
        self.radii = torch.zeros((0,), dtype=torch.float32, device=w.device)
        self.labels: list[str] = []
        self.owners: list[int] = []  # the last edit id trained into each slot
        self.enabled = True
        self._prefill_pending = False
        self._pending_span: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None  # [B] query position of each row
        self._slot: torch.Tensor | None = None  # [B] codebook slot per row, -1 = no replacement
        self._forced = None  # (positions [B], value [D_out]) while training a value
        self.capture = None
        self.last_slots: torch.Tensor | None = None
        self.last_dists: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.keys.shape[0]

    @contextlib.contextmanager
    def disabled(self):
        was = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = was

    def begin_prefill(self, span):
        self._prefill_pending, self._pending_span = True, span

    def _position_mask(self, s: int, pos: torch.Tensor, device) -> torch.Tensor:
        ar = torch.arange(s, device=device)[None, :]
        return ar >= pos[:, None] if self.replacement == "after" else ar == pos[:, None]

    def nearest(self, query: torch.Tensor):
        """``(distance [B], slot [B])`` of the nearest key (slot -1 when the codebook is empty)."""
        b = query.shape[0]
        if len(self) == 0:
            return (torch.full((b,), float("inf"), device=query.device), torch.full((b,), -1, dtype=torch.long, device=query.device))
        d = torch.cdist(query.float(), self.keys)  # [B, K]
        return d.min(dim=1)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        out = self.base(a)
        if self.capture is not None:
            self.capture(a, out)
        if not self.enabled:
            return out
        if self._forced is not None:
            pos, value = self._forced
            m = self._position_mask(a.shape[1], pos, a.device)
            return torch.where(m[..., None], value.to(out.dtype).expand_as(out), out)
        if a.dim() != 3:
            return out
        if self._prefill_pending:
            self._prefill_pending = False
            span = self._pending_span
            self._pending_span = None
            b, s = a.shape[:2]
            if span is None or span.shape != (b, s):
                span = torch.ones((b, s), dtype=torch.bool, device=a.device)
            pos = last_positions(span.to(a.device))
            query = a[torch.arange(b, device=a.device), pos]
            dist, slot = self.nearest(query)
            if len(self):
                hit = dist <= self.radii[slot.clamp_min(0)]
                slot = torch.where(hit, slot, torch.full_like(slot, -1))
            self._pos, self._slot = pos, slot
            self.last_slots, self.last_dists = slot, dist
            mask = self._position_mask(s, pos, a.device)
        else:  # a decode step with a KV cache: the new positions come after the prompt
            if self._slot is None or self.replacement != "after" or len(self) == 0:
                return out
            if self._slot.shape[0] != a.shape[0]:
                raise RuntimeError("GRACE routing was decided for another batch; run a prefill pass first")
            mask = torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
        if len(self) == 0:
            return out
        slot = self._slot
        values = self.values[slot.clamp_min(0)].to(out.dtype)  # [B, D_out]
        m = mask & (slot >= 0)[:, None]
        return torch.where(m[..., None], values[:, None, :].expand_as(out), out)


@dataclass
class GraceResult:
    edit_id: int
    slot: int
    action: str  # "new", "split", "overwrite", "expand", "reuse"
    steps: int
    loss: float
    seconds: float


class GraceEditor(PromptRouting):
    name = "grace"

    def __init__(self, model, tokenizer, config: GraceConfig | None = None):
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.model, self.tokenizer = model, tokenizer
        self.config = config or GraceConfig()
        target = locate_target(model, self.config.layer)
        self.config = dataclasses.replace(self.config, layer=target.layer_index)
        self.target = target
        for p in model.parameters():
            p.requires_grad_(False)
        self.layer = GraceLayer(target.module, target.in_features, target.out_features, self.config.replacement)
        target.install(self.layer)
        self._install_routing()
        self._gen = torch.Generator().manual_seed(self.config.seed)
        self.n_edits = 0

    @property
    def device(self):
        return self.layer.base.weight.device

    # ------------------------------------------------------------------ editing
    def _codebook_slot(self, key: torch.Tensor, init_value: torch.Tensor, label: str):
        """Update keys/radii for a new edit; returns (slot whose value is trained, action)."""
        L, eps = self.layer, self.config.eps
        dev = L.keys.device

        def add():
            L.keys = torch.cat([L.keys, key[None].float()])
            L.values = torch.cat([L.values, init_value[None].float()])
            L.radii = torch.cat([L.radii, torch.tensor([eps], device=dev)])
            L.labels.append(label)
            L.owners.append(self.n_edits)
            return len(L) - 1

        if len(L) == 0:
            return add(), "new"
        dist, slot = L.nearest(key[None])
        d, s = float(dist[0]), int(slot[0])
        if d > eps + float(L.radii[s]):
            return add(), "new"
        if L.labels[s] != label:
            if d <= 1e-4 * max(1.0, float(key.norm())):
                # (Numerically) the same key with a new label: splitting would leave both radii
                # ~0, unreachable except bit-exactly.  The newer fact overwrites the slot instead.
                L.labels[s] = label
                L.values[s] = init_value.float()
                L.owners[s] = self.n_edits
                return s, "overwrite"
            new = add()
            L.radii[s] = d / 2 - 1e-5
            L.radii[new] = d / 2
            return new, "split"
        if d > float(L.radii[s]):
            L.radii[s] = d
            action = "expand"
        else:
            action = "reuse"
        L.owners[s] = self.n_edits
        return s, action

    def edit(self, prompt: str, target: str) -> GraceResult:
        cfg = self.config
        start = time.perf_counter()
        batch = build_batch(self.tokenizer, [prompt], [target], device=self.device)
        n_t = int(batch.target_mask.sum())
        labels = batch.input_ids[:, -n_t:]
        pos = last_positions(batch.prompt_mask)
        seen = []
        self.layer.capture = lambda a, out: seen.append((a.detach(), out.detach()))
        try:
            with torch.no_grad(), self.disabled():
                self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            self.layer.capture = None
        a, out = seen[0]
        key = a[0, pos[0]].float()
        if cfg.val_init == "warm":
            init = out[0, pos[0]].float()
        else:
            init = torch.rand(out.shape[-1], generator=self._gen).to(out.device)
        slot, action = self._codebook_slot(key, init, target.strip())
        value = nn.Parameter(self.layer.values[slot].clone())
        self.layer._forced = (pos, value)
        try:
            steps, loss_value = train_on_target(self.model, batch, labels, value, cfg.n_iter, cfg.lr,
                                                cfg.early_stop_loss, target=self.target)
        finally:
            self.layer._forced = None
        with torch.no_grad():
            self.layer.values[slot] = value.detach()
        self.n_edits += 1
        return GraceResult(self.n_edits - 1, slot, action, steps, loss_value, time.perf_counter() - start)

    def detach(self):
        self._remove_routing()
        self.target.install(self.layer.base)
        return self.model
