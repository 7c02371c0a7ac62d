"""best_match (bit-packed mask overlap, best stored edit per query) against NumPy bitwise_count
and faiss IndexBinaryFlat, for growing banks.  GB/s = bank bytes read per call / best time."""
import numpy as np
import pytest
import torch

from bench_retrieval import numpy_best_match, random_bank
from conftest import sizes, pedantic
from memoir import ops

BANKS = sizes([1_000, 10_000, 100_000], [1_000, 10_000, 100_000, 1_000_000])
BITS = [1536, 14336]
QUERIES = [1, 16]
IMPLS = ["memoir", "numpy", "faiss"]


def _case(n, d, q):
    if n * ops.num_words(d) * 8 > sizes(2**28, 2**30):
        pytest.skip(f"bank of {n} x {d} bits is larger than this run's memory budget")
    return random_bank(n, d, seed=1), random_bank(q, d, seed=2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("q", QUERIES)
@pytest.mark.parametrize("d", BITS)
@pytest.mark.parametrize("n", BANKS)
def test_best_match(benchmark, n, d, q, impl):
    bank, queries = _case(n, d, q)
    benchmark.group = f"retrieval n={n} d={d} q={q}"
    if impl == "memoir":
        fn = lambda: ops.best_match(queries, bank, 0.0)  # noqa: E731
    elif impl == "numpy":
        b, qq = bank.numpy().view(np.uint64), queries.numpy().view(np.uint64)
        fn = lambda: numpy_best_match(qq, b, 0.0)  # noqa: E731
    else:
        faiss = pytest.importorskip("faiss")
        faiss.omp_set_num_threads(1)
        index = faiss.IndexBinaryFlat(d)
        index.add(bank.numpy().view(np.uint8))
        qb = queries.numpy().view(np.uint8)
        fn = lambda: index.search(qb, 1)  # noqa: E731  (Hamming distance: the closest faiss measure)
    pedantic(benchmark, fn, rounds=sizes(3, 10) if n >= 100_000 else None)
    nbytes = bank.numel() * 8
    benchmark.extra_info.update(impl=impl, baseline=impl != "memoir", n=n, bits=d, queries=q, bank_bytes=nbytes,
                                gb_s=nbytes / benchmark.stats.stats.min / 1e9, backend=ops.backend()["cpu"])
