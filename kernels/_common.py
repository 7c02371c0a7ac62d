"""Availability checks shared by the kernel wrappers (no Triton import at module load)."""
from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def available() -> bool:
    """Triton imports and kernels can run: CUDA is available or ``TRITON_INTERPRET=1``."""
    if not _triton_imports():
        return False
    return bool(torch.cuda.is_available() or interpreting())


def can_run_on(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can take these tensors (all CUDA, or interpreter + CPU)."""
    if not available():
        return False
    if interpreting():
        return True  # the interpreter runs kernels on host copies of any tensor
    return all(t.is_cuda for t in tensors)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
