"""CUDA retrieval kernels vs the pure-PyTorch oracle (skipped without CUDA, see conftest)."""
import pytest
import torch

from memoir import ops

pytestmark = pytest.mark.gpu

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def rand_words(rows, w, gen, sparse=False):
    a = torch.randint(INT64_MIN, INT64_MAX, (rows, w), dtype=torch.int64, generator=gen)
    if sparse:
        a &= torch.randint(INT64_MIN, INT64_MAX, (rows, w), dtype=torch.int64, generator=gen)
    return a


def check(q_cpu, m_cpu, thresholds=(0.0, 0.3, 0.5, 1.0)):
    q, m = q_cpu.cuda(), m_cpu.cuda()
    ref = ops.overlap_counts_reference(q_cpu.contiguous(), m_cpu.contiguous())
    got = ops.overlap_counts(q, m)
    assert got.is_cuda and got.dtype == torch.int32
    assert torch.equal(got.cpu(), ref)
    for metric in ("hamming", "jaccard"):
        assert torch.equal(ops.overlap_counts(q, m, metric).cpu(), ops.overlap_counts(q_cpu, m_cpu, metric))
    assert torch.equal(ops.popcounts(m).cpu(), ops.popcounts_reference(m_cpu.contiguous()))
    for thr in thresholds:
        s, i = ops.best_match(q, m, thr)
        s_ref, i_ref = ops.best_match_reference(q_cpu.contiguous(), m_cpu.contiguous(), thr)
        assert s.is_cuda and i.is_cuda
        assert torch.equal(s.cpu(), s_ref), thr
        assert torch.equal(i.cpu(), i_ref), thr


def test_backend_reports_cuda():
    assert ops.backend()["cuda"] == "cuda"


@pytest.mark.parametrize(
    "b,n,w",
    [(1, 0, 24), (0, 4, 3), (1, 1, 1), (3, 2, 24), (5, 7, 225), (17, 33, 1), (16, 1000, 224), (33, 513, 13),
     (64, 300, 24), (2, 50, 7000), (4, 10, 0)],
)
def test_cuda_matches_reference(b, n, w):
    gen = torch.Generator().manual_seed(b * 1000 + n + w)
    check(rand_words(b, w, gen, sparse=True), rand_words(n, w, gen, sparse=True))
    check(rand_words(b, w, gen), rand_words(n, w, gen))


def test_cuda_ties_lowest_index_large_bank():
    gen = torch.Generator().manual_seed(0)
    n, w = 100_000, 24
    m = rand_words(n, w, gen, sparse=True)
    q = rand_words(16, w, gen)
    for pos in (99_999, 64_000, 31_337, 31_338):
        m[pos] = q[0]
    m[5] = q[1]
    m[6] = q[1]
    s, i = ops.best_match(q.cuda(), m.cuda(), 0.0)
    assert i[0].item() == 31_337 and s[0].item() == 1.0
    assert i[1].item() == 5
    check(q, m, thresholds=(0.0, 1.0))
    same = m[:1].expand(4096, w)
    assert ops.best_match(q.cuda(), same.cuda(), 0.0)[1].tolist() == [0] * 16


def test_cuda_non_contiguous_and_errors():
    gen = torch.Generator().manual_seed(1)
    big_q, big_m = rand_words(12, 50, gen), rand_words(90, 50, gen)
    check(big_q[::3, 1:26], big_m[5::2, 1:26])
    q = torch.zeros((2, 3), dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="device"):
        ops.best_match(q, q.cpu(), 0.5)
    with pytest.raises(TypeError):
        ops.overlap_counts(q.int(), q)
