"""The machine's streaming bandwidth: the yardstick for the memory-bound kernels (retrieval, the
residual read).  Two figures, one table: read (sum over a large int64 tensor) and copy."""
import pytest
import torch

from conftest import QUICK, pedantic

MB = 2**20
SIZE = (64 if QUICK else 512) * MB  # well beyond the last-level cache


@pytest.mark.parametrize("kind", ["read", "copy"])
def test_streaming_bandwidth(benchmark, kind):
    benchmark.group = "bandwidth"
    x = torch.ones(SIZE // 8, dtype=torch.int64)
    if kind == "read":
        fn, moved = (lambda: x.sum()), SIZE
    else:
        y = torch.empty_like(x)
        fn, moved = (lambda: y.copy_(x)), 2 * SIZE
    pedantic(benchmark, fn)
    benchmark.extra_info.update(kind=kind, bytes=moved, gb_s=moved / benchmark.stats.stats.min / 1e9)
