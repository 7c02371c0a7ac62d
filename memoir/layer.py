"""The residual-memory layer that replaces the edited FFN output projection.

``y = W0 a + Wm (M ⊙ a)``: the frozen original projection plus a zero-initialised memory,
where M is one mask per batch row: the stored mask of the edit the row's :class:`Route` names.
The route is an input (``layer(a, route=...)``) or, on the HF convenience path, decided on the
call's prompt pass and kept per thread / task for its decode steps (``memoir.route``).  No host
synchronisation happens in ``forward``.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from memoir import backends, memory_op, ops, private  # noqa: F401  (memory_op, private register the ops)
from memoir.bank import MaskBank
from memoir.preserve import KeyStore
from memoir.route import CallLocal, Route
from memoir.state import Float32Buffers
from memoir.tophash import masks_from_features, prompt_features


class _InputSeen(Exception):
    """Ends a :meth:`MemoirLayer.run_until_input` pass once the layer has seen its input."""


class MemoirLayer(Float32Buffers):
    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        *,
        top_k: int,
        threshold: float,
        aggregation: str,
        feature_scaling: str,
        permutation: torch.Tensor,
        background_mean: torch.Tensor,
        background_std: torch.Tensor,
    ):
        super().__init__()
        weight = base.weight
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.memory = nn.Parameter(torch.zeros(out_features, in_features, dtype=weight.dtype, device=weight.device))
        self.register_buffer("permutation", permutation.to(weight.device, torch.int64))
        self.register_buffer("background_mean", background_mean.to(weight.device, torch.float32))
        self.register_buffer("background_std", background_std.to(weight.device, torch.float32))
        # Module state (buffers): it moves with model.to(...) and is part of model.state_dict().
        self.bank = MaskBank(in_features, device=weight.device)
        self.keys = KeyStore(in_features).to(weight.device)  # preservation keys (when enabled)
        self.top_k = int(top_k)
        self.threshold = float(threshold)
        self.aggregation = aggregation
        self.feature_scaling = feature_scaling
        self.enabled = True  # the user's switch (editor.disable / enable), for every call
        # Per-call state, private to each thread / task (memoir.route.CallLocal): a prompt pass
        # to route from (``prefill`` + ``span``), the route it decided, a route pinned for every
        # pass of a call (an edit's own mask, or one an inference stack passes), a callable that
        # reads the layer input, and a per-call off switch.
        self.calls = CallLocal(prefill=False, span=None, route=None, pinned=None, capture=None, disabled=False,
                               eligible=None, scratch=False, augment=None, decoded=None, stop=False)
        self.private = None  # PrivateBlocks under memory "private" (set by the editor)
        self.subject = None  # SubjectKeys under router "subject" (set by the editor)
        self.stop_after_target = False  # memory private: a block is read until its target is produced
        self.block_gain = 1.0  # memory private: the gain the blocks were stored with
        self.transposed = type(base).__name__ == "Conv1D"  # GPT-2 stores the weight as [in, out]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, top_k={self.top_k}, "
            f"threshold={self.threshold}, edits={len(self.bank)}"
        )

    # ------------------------------------------------------------------ TopHash
    def features(self, acts: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        feat = prompt_features(acts, span, self.aggregation, self.background_mean)
        if self.feature_scaling == "std":
            feat = feat / self.background_std
        return feat

    def query_masks(self, acts: torch.Tensor, span: torch.Tensor):
        """``(columns [B, k], dense [B, D], packed [B, W])`` for each row's prompt span."""
        return masks_from_features(self.features(acts, span), self.top_k, self.permutation)

    # ------------------------------------------------------------------ routing
    def begin_prefill(self, span: torch.Tensor | None) -> None:
        """The next forward in this call is a prompt pass: route each row from it (span: prompt tokens)."""
        self.calls.set(prefill=True, span=span)

    @contextlib.contextmanager
    def using_route(self, route: Route | None):
        """Every pass inside the block reads ``route`` (``None``: route from each prompt again)."""
        with self.calls.overriding(pinned=route):
            yield

    @contextlib.contextmanager
    def disabled(self):
        """The unedited model for passes inside the block, in this thread / task only."""
        with self.calls.overriding(disabled=True):
            yield

    @contextlib.contextmanager
    def capturing(self):
        """Collect this layer's inputs of the passes inside the block (in this thread / task)."""
        seen: list = []
        with self.calls.overriding(capture=seen.append):
            yield seen

    @property
    def last_route(self) -> Route | None:
        """The route the latest prompt pass of this thread / task decided."""
        return self.calls.get("route")

    def route(self, acts: torch.Tensor, span: torch.Tensor | None = None,
              eligible: torch.Tensor | None = None) -> Route:
        """The route of each sequence from its prompt: layer inputs ``[B, S, D]`` (or OPT-style
        ``[B*S, D]``) and the prompt positions ``[B, S]`` (``None``: every position).

        ``eligible`` (``[B, N]`` bool, the subject router's verdict): only those bank rows may be
        chosen, the one with the largest mask overlap, and only if that overlap reaches the threshold.
        """
        if acts.dim() == 2:  # OPT-style flattened tokens [B*S, D]: recover the sequences
            acts = acts.reshape(1 if span is None else span.shape[0], -1, acts.shape[-1])
        b, s = acts.shape[0], acts.shape[1]
        if span is None or span.shape != (b, s):
            span = torch.ones((b, s), dtype=torch.bool, device=acts.device)
        if len(self.bank) == 0:
            return Route.unrouted(b, acts.device)
        if acts.dim() == 3 and self.aggregation == "mean_decentered" and backends.use_triton(acts):
            from memoir.kernels import tophash  # the features and the selection in two fused kernels

            scale = self.background_std if self.feature_scaling == "std" else None
            _, packed = tophash(acts, span.to(acts.device), self.background_mean, self.top_k, self.permutation,
                                scale)
        else:
            _, _, packed = self.query_masks(acts, span.to(acts.device))
        if eligible is not None and eligible.shape == (b, len(self.bank)):
            ratio = ops.overlap_counts(packed, self.bank.words).float() / ops.popcounts(packed).clamp_min(1)[:, None]
            ratio = ratio.masked_fill(~eligible.to(ratio.device), -1.0)
            scores, rows = ratio.max(dim=1)
            rows = torch.where(scores >= self.threshold, rows, torch.full_like(rows, -1))
            return Route(rows, scores.clamp_min(0))
        scores, rows = self.bank.best_match(packed, self.threshold)
        return Route(rows, scores)

    # ------------------------------------------------------------------ forward
    def forward(self, a: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        """``base(a)`` plus the memory read by ``route``.

        An explicit ``route`` is used as given (an inference stack's own per-request routing; no
        per-call state is read, so this path compiles to one graph).  Without it the route is the
        one pinned for this call, or the one decided on this call's prompt pass.
        """
        if route is not None:
            return self.routed(a, route) if self.enabled else self.base(a)
        call = self.calls
        capture = call.get("capture")
        if capture is not None:
            capture(a)
        if call.get("stop"):
            raise _InputSeen
        if not self.enabled or call.get("disabled"):
            return self.base(a)
        route, decoded = call.get("pinned"), None
        if route is None:
            if call.get("prefill"):
                route = self.route(a, call.get("span"), call.get("eligible"))
                call.set(prefill=False, span=None, route=route, eligible=None, decoded=0)
            else:
                route, decoded = call.get("route"), call.get("decoded")
                if decoded is not None:  # one more decode step of this call (a host-side count)
                    call.set(decoded=decoded + 1)
        if route is None:
            return self.base(a)
        return self.routed(a, route, scratch=call.get("scratch"), augment=call.get("augment"), decoded=decoded)

    def run_until_input(self, model: nn.Module, **inputs) -> None:
        """``model(**inputs)`` stopped as soon as this layer has seen (and captured) its input, in this
        thread / task only: passes that read the layer input skip the layers above and the head."""
        # set, not a scope: what the pass decides for this call (e.g. the subject router's verdict,
        # set by the model's pre-hook) must outlive it
        before = self.calls.get("stop")
        self.calls.set(stop=True)
        try:
            model(**inputs)
        except _InputSeen:
            pass
        finally:
            self.calls.set(stop=before)

    @contextlib.contextmanager
    def training_passes(self, augment=None):
        """Passes inside the block are an edit's training passes: they read the memory being trained
        (under memory "private" the scratch, not the stored blocks), and ``augment`` (a function of the
        layer input, or None) changes what the memory reads, never what the frozen projection reads."""
        with self.calls.overriding(scratch=True, augment=augment):
            yield

    def routed(self, a: torch.Tensor, route: Route, scratch: bool = False, augment=None,
               decoded: int | None = None) -> torch.Tensor:
        """``base(a) + Wm (M ⊙ a)`` with each sequence's mask from ``route`` (one opaque op, so
        nothing here branches on the route's values: safe to compile).  Under memory "private" a
        sequence reads its edit's own block instead (``memoir.private``), except while an edit trains."""
        if len(self.bank) == 0:
            return self.base(a)
        y = self.base(a)
        if scratch:
            read = augment(a) if augment is not None else a
            return torch.ops.memoir.routed_residual(y, read, self.memory, self.bank.words, route.rows, self.top_k)
        return self.read(y, a, route.rows, decoded)

    def read(self, y: torch.Tensor, a: torch.Tensor, rows: torch.Tensor,
             decoded: int | torch.Tensor | None = None) -> torch.Tensor:
        """``y`` (the frozen projection's output) plus the stored memory read of each sequence's bank
        row ``rows`` ``[B]`` (-1: none).  ``decoded``: ``None`` for a prompt pass, the number of decode
        steps made (every sequence), or per sequence ``[B]``, negative for a prompt (an inference stack
        whose batch mixes prompts and decode steps, ``memoir.integrations.step_router``)."""
        if self.private is None:
            return torch.ops.memoir.routed_residual(y, a, self.memory, self.bank.words, rows, self.top_k)
        p = self.private
        index = p.index_for(self.bank.ids, rows)
        if self.stop_after_target and decoded is not None:
            index = p.still_needed(index, decoded)
        out = torch.ops.memoir.private_residual(y, a, p.u, p.v, p.cols, index)
        if decoded is not None and self.block_gain != 1.0:
            # Blocks are stored with the gain, which serves the prompt pass (the target's first
            # token); the target's later tokens, fed back one per decode step, read the block as
            # trained, so a long target does not overshoot into repeating its first tokens.
            gained = y + (out - y) / self.block_gain
            if isinstance(decoded, torch.Tensor):
                step = (decoded.to(out.device) >= 0).reshape(-1, *([1] * (out.dim() - 1)))
                return torch.where(step, gained, out)
            return gained
        return out

    # ------------------------------------------------------------------ inspection
    def column_usage(self) -> torch.Tensor:
        """How many stored edits own each memory column ``[D]``."""
        if len(self.bank) == 0:
            return torch.zeros(self.in_features, dtype=torch.int64)
        return ops.unpack_bits(self.bank.words, self.in_features).sum(dim=0)
