"""The memory layer's routing + residual as one registered op: ``torch.ops.memoir.routed_residual``.

``routed_residual(y, a, memory, bank_words, rows, top_k) = y + Wm (M ⊙ a)`` where ``y`` is the
base projection's output, ``a`` its input (``[B, S, D]``, or OPT-style ``[B*S, D]``
sequence-major) and ``M`` per sequence the stored mask of bank row ``rows[b]`` (zeros for
``-1``).  The route is data, not Python control flow: under ``torch.compile`` the op is opaque,
so a graph traced on a routed batch serves an unrouted one (and the reverse) correctly.

Kernels: the dense masked matmul (pure PyTorch, the specification), or Triton's sparse residual
kernels where :func:`memoir.backends.use_triton` says so; a fake kernel gives shapes to
``torch.compile``; autograd gives the gradients an edit trains with (memory and ``a``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memoir import backends
from memoir.ops import unpack_bits


def route_masks(bank_words: torch.Tensor, rows: torch.Tensor, num_bits: int, dtype) -> torch.Tensor:
    """Dense 0/1 masks ``[B, D]`` of bank rows ``rows`` (row -1 -> zeros)."""
    rows = rows.to(bank_words.device)
    dense = unpack_bits(bank_words[rows.clamp_min(0)], num_bits).to(dtype)
    return dense * (rows >= 0).to(dtype).unsqueeze(1)


def _token_masks(a: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sequence masks ``[B, D]`` broadcast to ``a``'s token rows."""
    b = masks.shape[0]
    if a.dim() == 3:
        if a.shape[0] != b:
            raise RuntimeError(f"the route covers {b} sequences but this step has {a.shape[0]}; "
                               "run a prompt (prefill) pass for the new batch first")
        return masks[:, None, :]
    if a.shape[0] % b != 0:
        raise RuntimeError(f"the route covers {b} sequences but this step has {a.shape[0]} token rows")
    return masks.repeat_interleave(a.shape[0] // b, dim=0)


def routed_residual_reference(y, a, memory, bank_words, rows, top_k: int):
    """``y + F.linear(a * M, memory)`` with dense masks: the specification (differentiable).

    Unrouted rows get ``y`` itself: they never read the memory (whatever it holds)."""
    masks = route_masks(bank_words, rows, a.shape[-1], a.dtype)
    routed = _token_masks(a, (rows.to(a.device) >= 0).to(a.dtype)[:, None]).bool()
    return torch.where(routed, y + F.linear(a * _token_masks(a, masks), memory), y)


def _triton_residual(y, a, memory, bank_words, rows, top_k: int):
    from memoir.kernels._residual import _add_residual_, choose_variant

    masks = route_masks(bank_words, rows, a.shape[-1], torch.float32)
    cols = masks.topk(top_k, dim=1).indices.sort(dim=1).values  # exactly k stored columns per row
    active = rows.to(a.device) >= 0
    out = y.contiguous().clone()
    variant = choose_variant(a.shape[0], a.shape[1], a.shape[2], top_k)
    return _add_residual_(out, a, memory, cols.to(a.device), active, variant)


@torch.library.custom_op("memoir::routed_residual", mutates_args=())
def routed_residual(y: torch.Tensor, a: torch.Tensor, memory: torch.Tensor, bank_words: torch.Tensor,
                    rows: torch.Tensor, top_k: int) -> torch.Tensor:
    if bank_words.shape[0] == 0:
        return y.clone()
    if a.dim() == 3 and a.shape[0] == rows.shape[0] and backends.use_triton(a):
        return _triton_residual(y, a, memory, bank_words, rows, top_k)
    return routed_residual_reference(y, a, memory, bank_words, rows, top_k)


@routed_residual.register_fake
def _(y, a, memory, bank_words, rows, top_k):
    torch._check(a.shape[-1] == memory.shape[1])
    torch._check(y.shape[-1] == memory.shape[0])
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    y, a, memory, bank_words, rows, top_k = inputs
    ctx.save_for_backward(a, memory, bank_words, rows)


def _backward(ctx, g):
    a, memory, bank_words, rows = ctx.saved_tensors
    need_y, need_a, need_mem = ctx.needs_input_grad[:3]
    if bank_words.shape[0] == 0:
        return g if need_y else None, torch.zeros_like(a) if need_a else None, \
            torch.zeros_like(memory) if need_mem else None, None, None, None
    m = _token_masks(a, route_masks(bank_words, rows, a.shape[-1], a.dtype))
    grad_a = grad_mem = None
    if need_a:
        grad_a = torch.where(m.bool(), g @ memory.to(g.dtype), torch.zeros((), dtype=g.dtype, device=g.device))
    if need_mem:
        x = (a * m).reshape(-1, a.shape[-1])
        grad_mem = (g.reshape(-1, g.shape[-1]).t() @ x.to(g.dtype)).to(memory.dtype)
    return g if need_y else None, grad_a, grad_mem, None, None, None


routed_residual.register_autograd(_backward, setup_context=_setup_context)
