"""Kernel selection, in one place: which implementation serves each op for a given tensor.

``MEMOIR_KERNELS`` is read once (the first time a kernel is chosen):

* ``auto`` (default): the fastest available: C++/CUDA retrieval (``memoir._C``) where built,
  Triton TopHash and residual kernels for CUDA tensors;
* ``reference``: the pure-PyTorch kernels everywhere (the specification);
* ``triton``: as ``auto``, and the Triton kernels wherever they can run, including the CPU
  interpreter under ``TRITON_INTERPRET=1`` (for testing).

:func:`set_kernel_mode` changes it for the process (benchmarks comparing paths, tests);
:func:`reload` reads the environment again.
"""
from __future__ import annotations

import functools
import os

import torch

KERNEL_MODES = ("auto", "reference", "triton")


@functools.lru_cache(maxsize=1)
def kernel_mode() -> str:
    """The kernel mode in force (``MEMOIR_KERNELS``, read once)."""
    mode = os.environ.get("MEMOIR_KERNELS", "auto").lower()
    if mode not in KERNEL_MODES:
        raise ValueError(f"MEMOIR_KERNELS must be one of {KERNEL_MODES}, got {mode!r}")
    return mode


def reload() -> str:
    """Read ``MEMOIR_KERNELS`` again (after the environment changed); returns the mode."""
    kernel_mode.cache_clear()
    return kernel_mode()


def set_kernel_mode(mode: str) -> None:
    """Use ``mode`` from now on in this process (sets ``MEMOIR_KERNELS`` for child processes too)."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    os.environ["MEMOIR_KERNELS"] = mode
    reload()


def _triton_available() -> bool:
    try:
        from memoir import kernels
    except Exception:  # pragma: no cover - kernels are optional
        return False
    return kernels.available()


def use_triton(t: torch.Tensor) -> bool:
    """Triton TopHash / residual kernels for this tensor: CUDA tensors under ``auto``, any tensor the
    kernels can run on under ``triton``.  On CPU the dense masked matmul stays under ``auto``: it
    measured fastest for decode (experiments/results/residual_cpu.json)."""
    mode = kernel_mode()
    if mode == "triton":
        return _triton_available()
    return mode == "auto" and t.is_cuda and _triton_available()


def retrieval() -> dict:
    """Which implementation serves retrieval for CPU and CUDA tensors: 'cpp', 'cuda' or 'torch'."""
    from memoir import ops

    native = ops._native() if kernel_mode() != "reference" else None
    cpu = "cpp" if native is not None and getattr(native, "has_cpu", lambda: False)() else "torch"
    cuda = "cuda" if native is not None and getattr(native, "has_cuda", lambda: False)() else "torch"
    return {"cpu": cpu, "cuda": cuda}


def native_retrieval(t: torch.Tensor) -> bool:
    """Whether the C++/CUDA retrieval kernels serve this tensor."""
    if t.device.type not in ("cpu", "cuda"):
        return False
    return retrieval()["cuda" if t.is_cuda else "cpu"] != "torch"
