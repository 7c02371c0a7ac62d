"""Sparse residual-memory linear layer: y = a @ w0.T + bias + active[b] * a[b,:,cols[b]] @ memory[:, cols[b]].T.

Design: the frozen base projection ``F.linear(a, w0, bias)`` runs on the vendor GEMM
(already at roofline, any w0 strides, e.g. GPT-2 Conv1D's transposed view); a Triton
kernel then adds the residual into that output in place, accumulating in fp32 and
rounding once.  Three residual variants, chosen by shape (:func:`choose_variant`):

* ``gemv``     -- B*S <= 4 token rows (decode): one program per (token row, output
                 block), gathered GEMV over the k active columns only;
* ``gathered`` -- long rows (prefill): per batch row a GEMM over the k gathered columns,
                 tiles never cross batch rows so a tile shares one column set;
* ``masked``   -- many short rows with different masks (batched decode): one pass over
                 the whole memory, the activations masked per row while loading.

Bandwidth note: ``memory`` may have any strides.  With k/D ~ 0.3 nearly every 32-byte
sector of a row-major [d, D] memory holds an active column, so gathered reads cost
about as much as reading all of it; a column-major memory (a [D, d] parameter passed as
``.t()``) makes each active column one contiguous run and the gather reads only k*d.

Backward (:class:`ResidualLinearFunction`): grad_memory[:, cols[b]] += G_b^T A_b[:, cols[b]]
touches only the active columns (gather + bmm + index_add in PyTorch, fp32 accumulate);
grad_a = g @ w0 + scatter(g @ memory[:, cols]); grad_w0 and grad_bias when asked.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memoir.kernels._common import can_run_on, interpreting

VARIANTS = ("gemv", "gathered", "masked", "torch")
_GEMV_MAX_ROWS = 4
_EST_BLOCK_M = 64  # tile height assumed by the variant cost model


# ----------------------------------------------------------------------------- checks
def _check(a, w0, bias, memory, cols, active):
    if a.dim() != 3:
        raise ValueError(f"a must be [B, S, D], got shape {tuple(a.shape)}")
    bsz, _seq, d_in = a.shape
    if w0.dim() != 2 or w0.shape[1] != d_in:
        raise ValueError(f"w0 must be [d, {d_in}], got shape {tuple(w0.shape)}")
    d_out = w0.shape[0]
    if tuple(memory.shape) != (d_out, d_in):
        raise ValueError(f"memory must be [{d_out}, {d_in}], got shape {tuple(memory.shape)}")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias must be [{d_out}], got shape {tuple(bias.shape)}")
    if cols.dim() != 2 or cols.shape[0] != bsz or cols.dtype != torch.int64:
        raise ValueError(f"cols must be int64 [{bsz}, k], got {cols.dtype} {tuple(cols.shape)}")
    if not 1 <= cols.shape[1] <= d_in:
        raise ValueError(f"k must be in [1, {d_in}], got {cols.shape[1]}")
    if tuple(active.shape) != (bsz,):
        raise ValueError(f"active must be [{bsz}], got shape {tuple(active.shape)}")


def _dense_mask(cols: torch.Tensor, active: torch.Tensor, d_in: int, dtype) -> torch.Tensor:
    """[B, D] 0/1 mask in ``dtype``: ones at cols[b] for active rows, zeros otherwise."""
    m = torch.zeros((cols.shape[0], d_in), dtype=dtype, device=cols.device)
    src = active.to(device=cols.device, dtype=dtype)[:, None].expand_as(cols)
    return m.scatter_(1, cols, src)


# ----------------------------------------------------------------------------- oracles
def residual_linear_reference(a, w0, bias, memory, cols, active):
    """Dense-mask PyTorch oracle (differentiable with autograd):
    ``F.linear(a, w0, bias) + F.linear(a * M[:, None, :], memory)``."""
    _check(a, w0, bias, memory, cols, active)
    mask = _dense_mask(cols.to(a.device), active.to(a.device), a.shape[-1], a.dtype)
    y = F.linear(a, w0, bias)
    on = active.to(a.device).bool()[:, None, None]  # inactive rows never read the memory
    return torch.where(on, y + F.linear(a * mask[:, None, :], memory), y)


def residual_linear_gathered_torch(a, w0, bias, memory, cols, active):
    """PyTorch gathered form (the fallback where Triton cannot run):
    base + bmm over the k gathered columns of each row."""
    y = F.linear(a, w0, bias)
    bsz, seq, _ = a.shape
    k = cols.shape[1]
    a_g = a.gather(2, cols[:, None, :].expand(bsz, seq, k))  # [B, S, k]
    m_g = memory.t()[cols]  # [B, k, d]
    res = torch.bmm(a_g, m_g.to(a.dtype))
    return torch.where(active.to(y.device).bool()[:, None, None], y + res, y)


# ----------------------------------------------------------------------------- dispatch
def choose_variant(bsz: int, seq: int, d_in: int, k: int) -> str:
    """Residual variant for a shape: ``gemv`` for <= 4 token rows, else the cheaper (in
    memory bytes read) of ``gathered`` (B * ceil(S/BM) gathers of k columns) and
    ``masked`` (ceil(B*S/BM) full passes over D columns)."""
    rows = bsz * seq
    if rows <= _GEMV_MAX_ROWS:
        return "gemv"
    tiles_per_row = -(-seq // _EST_BLOCK_M)
    gathered_cost = bsz * tiles_per_row * k
    masked_cost = -(-rows // _EST_BLOCK_M) * d_in
    return "gathered" if gathered_cost <= masked_cost else "masked"


def _dot_f32(a: torch.Tensor, memory: torch.Tensor) -> bool:
    if a.dtype == torch.float32 or memory.dtype != a.dtype:
        return True
    # The Triton interpreter mis-computes bf16 tl.dot: upcast there (GPU keeps bf16 MMA).
    return interpreting() and a.dtype == torch.bfloat16


def _add_residual_(y, a, memory, cols, active, variant):
    """y[B, S, d] += active * a[..., cols] @ memory[:, cols].T via a Triton kernel (in place)."""
    from memoir.kernels import _triton_kernels as tk

    bsz, seq, d_in = a.shape
    d_out = memory.shape[0]
    k = cols.shape[1]
    if bsz * seq == 0:
        return y
    act8 = active.to(device=a.device, dtype=torch.int8).contiguous()
    cdiv = lambda x, b: -(-x // b)  # noqa: E731
    # The gemv and gathered kernels take the same tensors and strides (a, memory, cols, y).
    gathered_args = (a, memory, cols, act8, y, seq, d_out, k, *a.stride(), *memory.stride(), *cols.stride(),
                     *y.stride())
    if variant == "gemv":
        block_n, block_k = (16, 256) if not interpreting() else (64, 256)
        grid = (cdiv(d_out, block_n), bsz * seq)
        tk.residual_gemv_kernel[grid](
            *gathered_args,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        )
    elif variant == "gathered":
        bm = 64 if seq > 32 else (32 if seq > 16 else 16)
        bn, bk = 64, 64
        grid = (cdiv(seq, bm), cdiv(d_out, bn), bsz)
        tk.residual_gathered_gemm_kernel[grid](
            *gathered_args,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_F32=_dot_f32(a, memory),
            num_warps=4, num_stages=3,
        )
    elif variant == "masked":
        rows = bsz * seq
        mask = _dense_mask(cols, act8, d_in, torch.int8)
        bm = 64 if rows > 32 else (32 if rows > 16 else 16)
        bn, bk = 64, 64
        grid = (cdiv(rows, bm), cdiv(d_out, bn))
        tk.residual_masked_gemm_kernel[grid](
            a, memory, mask, y, rows, seq, d_out, d_in,
            a.stride(0), a.stride(1), a.stride(2),
            memory.stride(0), memory.stride(1),
            y.stride(0), y.stride(1), y.stride(2),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_F32=_dot_f32(a, memory),
            num_warps=4, num_stages=3,
        )
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return y


def _forward(a, w0, bias, memory, cols, active, variant):
    if variant == "torch" or not can_run_on(a, w0, memory, cols):
        return residual_linear_gathered_torch(a, w0, bias, memory, cols, active)
    if variant is None:
        variant = choose_variant(a.shape[0], a.shape[1], a.shape[2], cols.shape[1])
    y = F.linear(a, w0, bias).contiguous()
    return _add_residual_(y, a, memory, cols, active, variant)


# ----------------------------------------------------------------------------- autograd
class ResidualLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, w0, bias, memory, cols, active, variant):
        y = _forward(a, w0, bias, memory, cols, active, variant)
        ctx.save_for_backward(a, w0, memory, cols, active)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        a, w0, memory, cols, active = ctx.saved_tensors
        need_a, need_w0, need_bias, need_mem = ctx.needs_input_grad[:4]
        bsz, seq, d_in = a.shape
        d_out = w0.shape[0]
        k = cols.shape[1]
        idx = cols[:, None, :].expand(bsz, seq, k)
        act = active.to(device=g.device, dtype=torch.float32)
        grad_a = grad_w0 = grad_bias = grad_mem = None
        if need_a:
            grad_a = torch.matmul(g, w0.to(g.dtype)).float()  # [B, S, D]
            m_g = memory.t()[cols].to(g.dtype)  # [B, k, d]
            r = torch.bmm(g, m_g.transpose(1, 2)).float() * act[:, None, None]  # [B, S, k]
            grad_a = grad_a.scatter_add_(2, idx, r).to(a.dtype)
        if need_w0:
            grad_w0 = (g.reshape(-1, d_out).t() @ a.reshape(-1, d_in).to(g.dtype)).to(w0.dtype)
        if need_bias and ctx.has_bias:
            grad_bias = g.float().sum(dim=(0, 1)).to(w0.dtype)
        if need_mem:
            # Only the active columns: G_b^T A_b[:, cols[b]] -> index_add into columns cols[b].
            a_g = a.gather(2, idx).to(g.dtype)  # [B, S, k]
            contrib = torch.bmm(g.transpose(1, 2), a_g).float() * act[:, None, None]  # [B, d, k]
            acc = torch.zeros((d_in, d_out), dtype=torch.float32, device=g.device)
            acc.index_add_(0, cols.reshape(-1), contrib.transpose(1, 2).reshape(bsz * k, d_out))
            grad_mem = acc.t().to(memory.dtype)
        return grad_a, grad_w0, grad_bias, grad_mem, None, None, None


def residual_linear(a, w0, bias, memory, cols, active, variant: str | None = None):
    """y [B, S, d] = a @ w0.T + bias + active[b] * a[b, :, cols[b]] @ memory[:, cols[b]].T.

    a [B, S, D]; w0 [d, D] (any strides); bias [d] or None; memory [d, D] (any strides);
    cols int64 [B, k] (a row's memory columns); active bool [B] (rows with an edit).
    fp32 / fp16 / bf16, accumulated in fp32.  ``variant``: None (by shape), ``gemv``,
    ``gathered``, ``masked`` or ``torch``.  Uses the Triton kernels where they can run
    (CUDA tensors, or any tensors under ``TRITON_INTERPRET=1``), else PyTorch.
    Differentiable in a, w0, bias and memory.
    """
    _check(a, w0, bias, memory, cols, active)
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    cols = cols.to(a.device)
    active = active.to(a.device)
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (a, w0, bias, memory)
    )
    if grads:
        return ResidualLinearFunction.apply(a, w0, bias, memory, cols, active, variant)
    return _forward(a, w0, bias, memory, cols, active, variant)
