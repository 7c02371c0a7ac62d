"""Fused TopHash: (masked prompt mean - background) / scale -> exact top-k by |.| -> permutation
-> packed mask words and ascending memory columns.

The oracle is :mod:`memoir.tophash` (``prompt_features`` + ``masks_from_features``);
:func:`tophash_reference` chains the two with the same signature as :func:`tophash`.
"""
from __future__ import annotations

import torch

from memoir.kernels._common import can_run_on, interpreting, next_pow2
from memoir.ops import num_words

_SINGLE_MAX = 16384  # rows up to this many features are kept in registers
_CHUNK = 4096  # block size of the chunked path for longer rows (multiple of 64)


def _check_perm(permutation: torch.Tensor, d: int) -> None:
    if permutation.dim() != 1 or permutation.shape[0] != d:
        raise ValueError(f"permutation must be 1-D of length {d}, got shape {tuple(permutation.shape)}")


def tophash_reference(acts, span, background, k, permutation, scale=None):
    """PyTorch oracle: ``(cols int64[B, k] ascending, packed int64[B, W])``."""
    from memoir.tophash import masks_from_features, prompt_features

    feat = prompt_features(acts, span, "mean_decentered", background)
    if scale is not None:
        feat = feat / scale.to(feat.device, torch.float32)
    cols, _dense, packed = masks_from_features(feat, k, permutation)
    return cols, packed


def _select_launch(feat: torch.Tensor, k: int, permutation: torch.Tensor):
    from memoir.kernels import _triton_kernels as tk

    bsz, d = feat.shape
    w = num_words(d)
    perm = permutation.to(device=feat.device, dtype=torch.int64).contiguous()
    dense = torch.zeros((bsz, d), dtype=torch.int8, device=feat.device)
    cols = torch.empty((bsz, k), dtype=torch.int64, device=feat.device)
    packed = torch.empty((bsz, w), dtype=torch.int64, device=feat.device)
    if bsz == 0:
        return cols, packed
    single = d <= _SINGLE_MAX
    block = max(64, next_pow2(d)) if single else _CHUNK
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    tk.tophash_select_kernel[(bsz,)](
        feat, perm, dense, cols, packed, d, k, w,
        SINGLE=single, BLOCK=block, num_warps=num_warps,
    )
    return cols, packed


def tophash_select(feat: torch.Tensor, k: int, permutation: torch.Tensor):
    """Selection stage alone: features float [B, D] -> ``(cols [B, k], packed [B, W])``.

    Bit-exact with ``memoir.tophash.masks_from_features`` (ties to the lower index).
    """
    if feat.dim() != 2:
        raise ValueError(f"feat must be [B, D], got shape {tuple(feat.shape)}")
    d = feat.shape[1]
    if not 1 <= k <= d:
        raise ValueError(f"k must be in [1, {d}], got {k}")
    _check_perm(permutation, d)
    feat = feat.to(torch.float32).contiguous()
    if not can_run_on(feat):
        from memoir.tophash import masks_from_features

        cols, _dense, packed = masks_from_features(feat, k, permutation)
        return cols, packed
    return _select_launch(feat, k, permutation)


def tophash(
    acts: torch.Tensor,
    span: torch.Tensor,
    background: torch.Tensor | None,
    k: int,
    permutation: torch.Tensor,
    scale: torch.Tensor | None = None,
):
    """TopHash masks for a batch of prompts.

    acts [B, S, D] (any float dtype, any strides), span [B, S] bool (the prompt tokens),
    background [D] or None, permutation int64 [D], scale [D] or None (the feature is divided
    by it: the layer's ``feature_scaling: std``).  Returns
    ``(cols int64[B, k] sorted ascending, packed int64[B, ceil(D/64)])``.
    Rows with an empty span get the feature ``-background`` (as the oracle does).
    Falls back to the PyTorch oracle where Triton cannot run.
    """
    if acts.dim() != 3:
        raise ValueError(f"acts must be [B, S, D], got shape {tuple(acts.shape)}")
    bsz, seq, d = acts.shape
    if tuple(span.shape) != (bsz, seq):
        raise ValueError(f"span must be [{bsz}, {seq}], got shape {tuple(span.shape)}")
    if not 1 <= k <= d:
        raise ValueError(f"k must be in [1, {d}], got {k}")
    _check_perm(permutation, d)
    if background is not None and tuple(background.shape) != (d,):
        raise ValueError(f"background must be [{d}], got shape {tuple(background.shape)}")
    if scale is not None and tuple(scale.shape) != (d,):
        raise ValueError(f"scale must be [{d}], got shape {tuple(scale.shape)}")
    if not acts.is_floating_point():
        raise TypeError(f"acts must be floating point, got {acts.dtype}")
    if not can_run_on(acts):
        return tophash_reference(acts, span, background, k, permutation, scale)

    from memoir.kernels import _triton_kernels as tk

    span8 = span.to(device=acts.device, dtype=torch.int8)
    feat = torch.empty((bsz, d), dtype=torch.float32, device=acts.device)
    if bsz > 0:
        bg = background.to(device=acts.device, dtype=torch.float32).contiguous() if background is not None else feat
        sc = scale.to(device=acts.device, dtype=torch.float32).contiguous() if scale is not None else feat
        if interpreting():  # few, large tiles: the interpreter pays per operation
            block_d, block_s = min(1024, max(16, next_pow2(d))), min(16, max(2, next_pow2(seq)))
        else:  # enough programs to fill the GPU even for one long prompt
            block_d, block_s = 128, 16
        grid = (bsz, triton_cdiv(d, block_d))
        tk.tophash_feature_kernel[grid](
            acts, span8, bg, sc, feat, seq, d,
            acts.stride(0), acts.stride(1), acts.stride(2),
            span8.stride(0), span8.stride(1),
            HAS_BG=background is not None, HAS_SCALE=scale is not None, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
        )
    return _select_launch(feat, k, permutation)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
