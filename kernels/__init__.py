"""Triton kernels for MEMOIR: fused TopHash masking and the sparse residual-memory matmul.

Public API:

* :func:`available` -- True when Triton imports and kernels can run here (CUDA, or the
  Triton interpreter with ``TRITON_INTERPRET=1``).
* :func:`tophash` -- prompt activations -> (sorted memory columns, packed mask words).
* :func:`residual_linear` -- ``a @ w0.T + bias + active * a[..., cols] @ memory[:, cols].T``,
  differentiable (an ``autograd.Function`` whose memory gradient touches only the
  active columns).
* :func:`residual_linear_reference` -- the dense-mask PyTorch oracle.

Importing this package never needs Triton; the kernels are compiled lazily on first use.
"""
from __future__ import annotations

if __name__ != "memoir.kernels":
    # Imported as a top-level ``kernels`` because a source checkout's root is on sys.path
    # (transformers probes that name for the Hugging Face ``kernels`` package on every
    # import). Expose nothing and import nothing, so the probe neither fails nor mistakes
    # this folder for that package; the kernels live at ``memoir.kernels``.
    __all__: list[str] = []
else:
    from memoir.kernels._common import available, interpreting
    from memoir.kernels._residual import (
        choose_variant,
        residual_linear,
        residual_linear_gathered_torch,
        residual_linear_reference,
    )
    from memoir.kernels._tophash import tophash, tophash_reference, tophash_select

    __all__ = [
        "available",
        "interpreting",
        "tophash",
        "tophash_select",
        "tophash_reference",
        "residual_linear",
        "residual_linear_reference",
        "residual_linear_gathered_torch",
        "choose_variant",
    ]
