"""Test configuration.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any
module that defines kernels is imported: without CUDA, kernels run in the interpreter.
"""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")



def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _kernel_mode_follows_env():
    """memoir reads MEMOIR_KERNELS once; a test that changed it leaves the next test the original."""
    yield
    from memoir import backends

    backends.kernel_mode.cache_clear()
