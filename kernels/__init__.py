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
    # Imported as a top-level ``kernels`` because a source checkout's root is on sys.path. That
    # name belongs to the Hugging Face ``kernels`` package, which transformers imports on every
    # import when it is installed: hand the import over to it, so this folder never stands in for
    # it. Without it, expose and import nothing (transformers' probe then finds no package). The
    # Triton kernels live at ``memoir.kernels``.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.origin and _os.path.abspath(_spec.origin) != _os.path.abspath(__file__):
        _real = _util.module_from_spec(_spec)
        _this = _sys.modules.get(__name__)
        _sys.modules[__name__] = _real  # the import statement returns what sys.modules holds
        try:
            _spec.loader.exec_module(_real)
        except BaseException:
            _sys.modules[__name__] = _this
            raise
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
