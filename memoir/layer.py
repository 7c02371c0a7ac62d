"""The residual-memory layer that replaces the edited FFN output projection.

``y = W0 a + Wm (M ⊙ a)``: the frozen original projection plus a zero-initialised memory,
where M is one mask per batch row, chosen on the prompt (prefill) by retrieval from the mask
bank and reused at every decode step.  No host synchronisation happens in ``forward``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memoir import ops
from memoir.bank import MaskBank
from memoir.tophash import masks_from_features, prompt_features


def _kernels_available() -> bool:
    try:
        from memoir import kernels
    except Exception:  # pragma: no cover - kernels are optional
        return False
    return kernels.available()


class MemoirLayer(nn.Module):
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
        self.bank = MaskBank(in_features, device=weight.device)
        self.top_k = int(top_k)
        self.threshold = float(threshold)
        self.aggregation = aggregation
        self.feature_scaling = feature_scaling
        self.enabled = True
        # Routing state: a Python flag says *when* to route; the decision itself stays on device.
        self._prefill_pending = False
        self._pending_span: torch.Tensor | None = None
        self._row_masks: torch.Tensor | None = None  # [B, D] 0/1, or None: memory off
        self._forced: torch.Tensor | None = None  # [D] 0/1 during an edit
        self.last_scores: torch.Tensor | None = None
        self.last_rows: torch.Tensor | None = None
        self.capture = None  # optional callable(a): lets the editor read the layer input
        self._row_cols: torch.Tensor | None = None  # [B, k] memory columns per row (kernel path)
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

    # ------------------------------------------------------------------ routing control
    def begin_prefill(self, span: torch.Tensor | None) -> None:
        """The next forward is a prompt pass: route each row from it (span: prompt tokens)."""
        self._prefill_pending = True
        self._pending_span = span

    def reset_routing(self) -> None:
        self._prefill_pending = False
        self._pending_span = None
        self._row_masks = None

    def force_mask(self, dense: torch.Tensor | None) -> None:
        """Apply one mask to every row (editing); ``None`` returns to retrieval."""
        self._forced = None if dense is None else dense.to(self.memory.device, self.memory.dtype)

    def _route(self, acts: torch.Tensor, span: torch.Tensor | None) -> None:
        if acts.dim() == 2:  # OPT-style flattened tokens [B*S, D]: recover the sequences
            acts = acts.reshape(1 if span is None else span.shape[0], -1, acts.shape[-1])
        b, s = acts.shape[0], acts.shape[1]
        if span is None or span.shape != (b, s):
            span = torch.ones((b, s), dtype=torch.bool, device=acts.device)
        if len(self.bank) == 0:
            self.last_scores = torch.zeros(b, device=acts.device)
            self.last_rows = torch.full((b,), -1, dtype=torch.int64, device=acts.device)
            self._row_masks = None
            return
        if self._use_kernels(acts):
            from memoir.kernels import tophash_select

            _, packed = tophash_select(self.features(acts, span.to(acts.device)), self.top_k, self.permutation)
        else:
            _, _, packed = self.query_masks(acts, span.to(acts.device))
        scores, rows = self.bank.best_match(packed, self.threshold)
        self.last_scores, self.last_rows = scores, rows
        self._row_masks = self.bank.rows_to_dense(rows).to(acts.dtype)
        # Each routed row's stored columns (exactly k ones; unrouted rows are inactive).
        self._row_cols = self._row_masks.topk(self.top_k, dim=1).indices.sort(dim=1).values

    # ------------------------------------------------------------------ forward
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.capture is not None:
            self.capture(a)
        masks = None
        if self.enabled:
            if self._forced is not None:
                masks = self._forced
            else:
                if self._prefill_pending:
                    self._route(a, self._pending_span)
                    self._prefill_pending = False
                    self._pending_span = None
                masks = self._row_masks
        if masks is None:
            return self.base(a)
        if self._use_kernels(a):
            from memoir.kernels import residual_linear

            if masks.dim() == 1:
                cols = masks.topk(self.top_k).indices.sort().values.expand(a.shape[0], -1)
                active = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
            else:
                cols, active = self._row_cols, self.last_rows >= 0
            w0, bias = self._base_weight()
            return residual_linear(a, w0, bias, self.memory, cols, active)
        return self.base(a) + self.memory_term(a, masks)

    def memory_term(self, a: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``Wm (M ⊙ a)`` for per-sequence masks ``[B, D]`` (or one mask ``[D]`` for all rows)."""
        if masks.dim() == 2:
            b = masks.shape[0]
            rows = a.shape[0]
            if rows % b != 0:
                raise RuntimeError(
                    f"routing was decided for {b} sequences but this step has {rows} rows; "
                    "run a prompt (prefill) pass for the new batch first"
                )
            if a.dim() == 3:
                if rows != b:
                    raise RuntimeError(f"routing was decided for {b} sequences but this step has {rows}")
                masks = masks[:, None, :]
            else:  # flattened tokens [B*S, D], sequence-major
                masks = masks.repeat_interleave(rows // b, dim=0)
        return F.linear(a * masks.to(a.dtype), self.memory)

    # ------------------------------------------------------------------ inspection
    def column_usage(self) -> torch.Tensor:
        """How many stored edits own each memory column ``[D]``."""
        if len(self.bank) == 0:
            return torch.zeros(self.in_features, dtype=torch.int64)
        return ops.unpack_bits(self.bank.words, self.in_features).sum(dim=0)
