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
import torch.nn.functional as F
from torch import nn

from memoir import ops
from memoir.bank import MaskBank
from memoir.preserve import KeyStore
from memoir.route import CallLocal, Route
from memoir.state import Float32Buffers
from memoir.tophash import masks_from_features, prompt_features


def _kernels_available() -> bool:
    try:
        from memoir import kernels
    except Exception:  # pragma: no cover - kernels are optional
        return False
    return kernels.available()


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
        self.calls = CallLocal(prefill=False, span=None, route=None, pinned=None, capture=None, disabled=False)
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

    # ------------------------------------------------------------------ kernel dispatch
    def _use_kernels(self, a: torch.Tensor) -> bool:
        """Triton kernels serve CUDA tensors under MEMOIR_KERNELS=auto.  On CPU the dense
        masked matmul stays: it measured fastest for decode (benchmarks/results/residual_cpu.json)."""
        if a.dim() != 3:
            return False
        mode = ops.kernel_mode()
        if mode == "triton":
            return _kernels_available()
        return a.is_cuda and mode == "auto" and _kernels_available()

    def _base_weight(self):
        w = self.base.weight
        return (w.t() if self.transposed else w), getattr(self.base, "bias", None)

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

    def route(self, acts: torch.Tensor, span: torch.Tensor | None = None) -> Route:
        """The route of each sequence from its prompt: layer inputs ``[B, S, D]`` (or OPT-style
        ``[B*S, D]``) and the prompt positions ``[B, S]`` (``None``: every position)."""
        if acts.dim() == 2:  # OPT-style flattened tokens [B*S, D]: recover the sequences
            acts = acts.reshape(1 if span is None else span.shape[0], -1, acts.shape[-1])
        b, s = acts.shape[0], acts.shape[1]
        if span is None or span.shape != (b, s):
            span = torch.ones((b, s), dtype=torch.bool, device=acts.device)
        if len(self.bank) == 0:
            return Route.unrouted(b, acts.device)
        if self._use_kernels(acts):
            from memoir.kernels import tophash_select

            _, packed = tophash_select(self.features(acts, span.to(acts.device)), self.top_k, self.permutation)
        else:
            _, _, packed = self.query_masks(acts, span.to(acts.device))
        scores, rows = self.bank.best_match(packed, self.threshold)
        return Route(rows, scores)

    def _route_masks(self, route: Route, dtype) -> torch.Tensor:
        """Dense 0/1 masks ``[B, D]`` of a route's rows (zeros for unrouted rows), once per route."""
        masks = route.cache.get("masks")
        if masks is None or masks.dtype != dtype or masks.device != self.memory.device:
            masks = self.bank.rows_to_dense(route.rows.to(self.memory.device)).to(dtype)
            route.cache["masks"] = masks
        return masks

    def _route_cols(self, route: Route) -> torch.Tensor:
        """Each row's memory columns ``[B, k]`` (exactly k stored ones; unrouted rows are inactive)."""
        cols = route.cache.get("cols")
        if cols is None:
            masks = self._route_masks(route, self.memory.dtype)
            cols = masks.topk(self.top_k, dim=1).indices.sort(dim=1).values
            route.cache["cols"] = cols
        return cols

    # ------------------------------------------------------------------ forward
    def forward(self, a: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        """``base(a)`` plus the memory read by ``route`` (given, pinned for the call, or decided on
        this call's prompt pass)."""
        call = self.calls
        capture = call.get("capture")
        if capture is not None:
            capture(a)
        if not self.enabled or call.get("disabled"):
            return self.base(a)
        if route is None:
            route = call.get("pinned")
        if route is None:
            if call.get("prefill"):
                route = self.route(a, call.get("span"))
                call.set(prefill=False, span=None, route=route)
            else:
                route = call.get("route")
        if route is None or len(self.bank) == 0:
            return self.base(a)
        if self._use_kernels(a):
            from memoir.kernels import residual_linear

            w0, bias = self._base_weight()
            active = route.rows.to(a.device) >= 0
            return residual_linear(a, w0, bias, self.memory, self._route_cols(route), active)
        return self.base(a) + self.memory_term(a, self._route_masks(route, a.dtype))

    def memory_term(self, a: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``Wm (M ⊙ a)`` for per-sequence masks ``[B, D]``."""
        b, rows = masks.shape[0], a.shape[0]
        if a.dim() == 3:
            if rows != b:
                raise RuntimeError(
                    f"the route covers {b} sequences but this step has {rows}; "
                    "run a prompt (prefill) pass for the new batch first"
                )
            masks = masks[:, None, :]
        else:  # flattened tokens [B*S, D], sequence-major
            if rows % b != 0:
                raise RuntimeError(f"the route covers {b} sequences but this step has {rows} token rows")
            masks = masks.repeat_interleave(rows // b, dim=0)
        return F.linear(a * masks.to(a.dtype), self.memory)

    # ------------------------------------------------------------------ inspection
    def column_usage(self) -> torch.Tensor:
        """How many stored edits own each memory column ``[D]``."""
        if len(self.bank) == 0:
            return torch.zeros(self.in_features, dtype=torch.int64)
        return ops.unpack_bits(self.bank.words, self.in_features).sum(dim=0)
