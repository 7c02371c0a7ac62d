"""Mask-bank retrieval ops: native kernels vs the pure-PyTorch oracle, and the oracle vs numpy."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from memoir import backends, ops

needs_ext = pytest.mark.needs_ext  # skipped without memoir._C, failed then under MEMOIR_REQUIRE_EXT=1

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


# ----------------------------------------------------------------------------- helpers
def rand_words(rows, w, gen, density=None):
    """Random packed masks; density=None gives uniform words (about half the bits set)."""
    if density is None:
        return torch.randint(INT64_MIN, INT64_MAX, (rows, w), dtype=torch.int64, generator=gen)
    bits = torch.rand((rows, w * 64), generator=gen) < density
    return ops.pack_bits(bits)


def np_bits(words: torch.Tensor) -> np.ndarray:
    """Independent unpack: numpy's unpackbits on the little-endian byte view."""
    a = np.ascontiguousarray(words.numpy()).view(np.uint8)
    return np.unpackbits(a, axis=-1, bitorder="little").astype(bool).reshape(words.shape[0], -1)


def np_oracle(queries, bank):
    qb, mb = np_bits(queries).astype(np.int64), np_bits(bank).astype(np.int64)
    inter = qb @ mb.T
    qpop, mpop = qb.sum(1)[:, None], mb.sum(1)[None, :]
    return inter, qpop, mpop


def assert_native_matches(queries, bank, thresholds=(0.0, 0.3, 0.5, 1.0)):
    qc, bc = queries.contiguous(), bank.contiguous()
    ref = ops.overlap_counts_reference(qc, bc)
    got = ops.overlap_counts(queries, bank)
    assert got.dtype == torch.int32 and got.shape == (queries.shape[0], bank.shape[0])
    assert torch.equal(got, ref)
    qpop = ops.popcounts_reference(qc)[:, None]
    mpop = ops.popcounts_reference(bc)[None, :]
    assert torch.equal(ops.overlap_counts(queries, bank, "hamming"), qpop + mpop - 2 * ref)
    union = (qpop + mpop - ref).to(torch.float32)
    jac = torch.where(union > 0, ref.float() / union.clamp_min(1), torch.zeros_like(union))
    assert torch.equal(ops.overlap_counts(queries, bank, "jaccard"), jac)
    for thr in thresholds:
        s_ref, i_ref = ops.best_match_reference(qc, bc, thr)
        s, i = ops.best_match(queries, bank, thr)
        assert s.dtype == torch.float32 and i.dtype == torch.int64
        assert torch.equal(s, s_ref), (thr, s, s_ref)
        assert torch.equal(i, i_ref), (thr, i, i_ref)


# ----------------------------------------------------------------------------- the oracle itself
@pytest.mark.parametrize("d", [1, 63, 64, 65, 200, 1536])
def test_pack_matches_numpy_and_roundtrips(d):
    gen = torch.Generator().manual_seed(d)
    bits = torch.rand((5, d), generator=gen) < 0.5
    packed = ops.pack_bits(bits)
    assert packed.dtype == torch.int64 and packed.shape == (5, ops.num_words(d))
    padded = np.zeros((5, ops.num_words(d) * 64), dtype=bool)
    padded[:, :d] = bits.numpy()
    expect = np.packbits(padded, axis=-1, bitorder="little").view(np.uint64).view(np.int64)
    assert np.array_equal(packed.numpy(), expect)
    assert torch.equal(ops.unpack_bits(packed, d), bits)


def test_popcount64_matches_numpy():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randint(INT64_MIN, INT64_MAX, (1000,), dtype=torch.int64, generator=gen),
        torch.tensor([0, -1, 1, INT64_MIN, INT64_MAX, -2], dtype=torch.int64),
    ])
    expect = np.bitwise_count(x.numpy().view(np.uint64)).astype(np.int64)
    assert np.array_equal(ops.popcount64(x).numpy(), expect)


@pytest.mark.parametrize("b,n,w,density", [(3, 17, 1, None), (4, 9, 3, 0.1), (2, 5, 24, 0.9), (5, 6, 7, 0.02)])
def test_reference_matches_numpy(b, n, w, density):
    gen = torch.Generator().manual_seed(b * 100 + n)
    q, m = rand_words(b, w, gen, density), rand_words(n, w, gen, density)
    q[0] = 0  # an empty query
    inter, qpop, mpop = np_oracle(q, m)
    assert np.array_equal(ops.overlap_counts_reference(q, m).numpy(), inter)
    assert np.array_equal(ops.popcounts_reference(q).numpy(), qpop[:, 0])
    union = qpop + mpop - inter
    jac = np.where(union > 0, inter.astype(np.float32) / np.maximum(union, 1).astype(np.float32), 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMOIR_KERNELS", "reference")
        backends.reload()
        assert np.array_equal(ops.overlap_counts(q, m, "hamming").numpy(), qpop + mpop - 2 * inter)
        np.testing.assert_array_equal(ops.overlap_counts(q, m, "jaccard").numpy(), jac.astype(np.float32))
        s, i = ops.best_match(q, m, 0.25)
    ratio = inter.astype(np.float32) / np.maximum(qpop, 1).astype(np.float32)
    best = inter.argmax(1)  # first maximum: lowest index on ties
    np.testing.assert_array_equal(s.numpy(), ratio[np.arange(b), best])
    np.testing.assert_array_equal(i.numpy(), np.where(ratio[np.arange(b), best] >= np.float32(0.25), best, -1))


# ----------------------------------------------------------------------------- native vs oracle
@pytest.mark.parametrize(
    "b,n,w",
    [
        (1, 0, 24),  # empty bank
        (0, 5, 3),  # no queries
        (1, 1, 1),
        (2, 1, 3),
        (3, 2, 24),
        (5, 7, 225),
        (7, 33, 1),
        (9, 101, 3),
        (16, 257, 24),
        (64, 129, 5),
        (33, 64, 13),
        (2, 3000, 17),
        (1, 777, 225),
        (1, 5000, 3),
        (4, 10, 0),  # zero-width masks
    ],
)
@needs_ext
def test_native_matches_reference(b, n, w):
    gen = torch.Generator().manual_seed(b * 1000 + n * 7 + w)
    assert_native_matches(rand_words(b, w, gen, 0.3), rand_words(n, w, gen, 0.3))
    assert_native_matches(rand_words(b, w, gen), rand_words(n, w, gen))


def test_empty_bank_returns_no_match():
    q = torch.full((3, 4), -1, dtype=torch.int64)
    s, i = ops.best_match(q, torch.empty((0, 4), dtype=torch.int64), 0.0)
    assert torch.equal(s, torch.zeros(3)) and torch.equal(i, torch.full((3,), -1))
    assert ops.overlap_counts(q, torch.empty((0, 4), dtype=torch.int64)).shape == (3, 0)


def test_all_zero_and_all_one_masks():
    w = 24
    zeros, ones = torch.zeros((2, w), dtype=torch.int64), torch.full((2, w), -1, dtype=torch.int64)
    bank = torch.cat([zeros, ones, zeros])
    queries = torch.cat([zeros[:1], ones[:1]])
    assert_native_matches(queries, bank)
    s, i = ops.best_match(queries, bank, 0.0)
    assert s.tolist() == [0.0, 1.0] and i.tolist() == [0, 2]  # empty query: score 0, row 0
    s, i = ops.best_match(queries, bank, 0.1)
    assert i.tolist() == [-1, 2]
    jac = ops.overlap_counts(queries, bank, "jaccard")
    assert jac[0].tolist() == [0.0] * 6  # both empty (union 0) -> 0, and 0 / D -> 0
    assert jac[1].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert ops.overlap_counts(queries, bank, "hamming")[1].tolist() == [64 * w] * 2 + [0, 0] + [64 * w] * 2


def test_jaccard_with_different_popcounts():
    # q has 4 bits; bank rows have 2, 4, 8 bits with overlaps 2, 4, 4.
    q = ops.pack_bits(torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0] + [0] * 120], dtype=torch.bool))
    rows = [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]]
    bank = ops.pack_bits(torch.tensor([r + [0] * 120 for r in rows], dtype=torch.bool))
    jac = ops.overlap_counts(q, bank, "jaccard")
    assert jac[0].tolist() == [0.5, 1.0, 0.5]
    assert ops.overlap_counts(q, bank, "hamming")[0].tolist() == [2, 0, 4]
    s, i = ops.best_match(q, bank, 1.0)  # rows 1 and 2 both cover q: lowest index wins
    assert s.tolist() == [1.0] and i.tolist() == [1]


def test_ties_go_to_lowest_index_across_threads():
    gen = torch.Generator().manual_seed(1)
    n, w = 20_000, 3
    bank = rand_words(n, w, gen, 0.05)
    q = rand_words(4, w, gen, 0.5)
    for pos in (19_999, 12_000, 7_001, 5_000):  # duplicates of q spread over chunks
        bank[pos] = q[0]
    bank[15_000] = q[1]
    bank[15_001] = q[1]
    s, i = ops.best_match(q, bank, 0.0)
    assert i[0].item() == 5_000 and s[0].item() == 1.0
    assert i[1].item() == 15_000
    assert_native_matches(q, bank, thresholds=(0.0, 1.0))
    # All rows identical: every query must get row 0.
    same = bank[:1].expand(n, w).contiguous()
    assert ops.best_match(q, same, 0.0)[1].tolist() == [0, 0, 0, 0]


@needs_ext
def test_big_bank_single_case():
    gen = torch.Generator().manual_seed(2)
    n, w, b = 100_000, 24, 8
    bank = rand_words(n, w, gen)
    q = rand_words(b, w, gen)
    bank[77_777] = q[3]
    s, i = ops.best_match(q, bank, 0.9)
    s_ref, i_ref = ops.best_match_reference(q, bank, 0.9)
    assert torch.equal(s, s_ref) and torch.equal(i, i_ref)
    assert i[3].item() == 77_777
    assert torch.equal(ops.overlap_counts(q[:2], bank), ops.overlap_counts_reference(q[:2], bank))


@needs_ext
def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(3)
    big_q = rand_words(12, 50, gen, 0.3)
    big_b = rand_words(90, 50, gen, 0.3)
    q = big_q[::3, 1:26]  # strided rows and an offset column slice
    bank = big_b[5::2, 1:26]
    assert not q.is_contiguous() and not bank.is_contiguous()
    assert_native_matches(q, bank)
    qt = rand_words(25, 6, gen).t()  # transposed: [6, 25], column-major
    bt = rand_words(25, 40, gen).t()
    assert not qt.is_contiguous()
    assert_native_matches(qt, bt)
    expanded = big_q[:1, :25].expand(4, 25)  # stride-0 rows
    assert_native_matches(expanded, bank)


def test_threshold_edges():
    # q has 4 set bits; row 0 overlaps 2 (score exactly 0.5), row 1 overlaps 1.
    q = ops.pack_bits(torch.tensor([[1, 1, 1, 1] + [0] * 60], dtype=torch.bool))
    bank = ops.pack_bits(torch.tensor([[1, 1, 0, 0] + [0] * 60, [1, 0, 0, 0] + [0] * 60], dtype=torch.bool))
    for thr, expect in ((0.5, 0), (0.25, 0), (np.nextafter(np.float32(0.5), np.float32(1)), -1), (0.0, 0)):
        s, i = ops.best_match(q, bank, float(thr))
        assert s.item() == 0.5 and i.item() == expect, thr
    # 1/3 is not exact in float32: the float32 score must match a threshold of the same value.
    q3 = ops.pack_bits(torch.tensor([[1, 1, 1] + [0] * 61], dtype=torch.bool))
    s, i = ops.best_match(q3, bank[1:], 1 / 3)
    assert i.item() == 0 and s.item() == np.float32(1) / np.float32(3)
    assert ops.best_match(q3, bank[1:], float(np.float32(1 / 3)))[1].item() == 0
    assert ops.best_match(q3, bank[1:], 0.34)[1].item() == -1
    assert_native_matches(q3, bank, thresholds=(1 / 3, 0.5, 2 / 3))


@needs_ext
def test_native_popcounts():
    gen = torch.Generator().manual_seed(4)
    for n, w in ((0, 3), (1, 1), (100, 225), (7, 0)):
        m = rand_words(n, w, gen)
        assert torch.equal(ops.popcounts(m), ops.popcounts_reference(m))


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    q = torch.zeros((2, 3), dtype=torch.int64)
    with pytest.raises(TypeError, match="int64"):
        ops.best_match(q.to(torch.int32), q, 0.5)
    with pytest.raises(TypeError, match="int64"):
        ops.overlap_counts(q, q.float())
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.best_match(q.numpy(), q, 0.5)
    with pytest.raises(ValueError, match="word counts"):
        ops.overlap_counts(q, torch.zeros((2, 4), dtype=torch.int64))
    with pytest.raises(ValueError, match="2-D"):
        ops.best_match(torch.zeros(3, dtype=torch.int64), q, 0.5)
    with pytest.raises(ValueError, match="2-D"):
        ops.overlap_counts(q, torch.zeros((1, 2, 3), dtype=torch.int64))
    with pytest.raises(ValueError, match="device"):
        ops.best_match(q, torch.zeros((2, 3), dtype=torch.int64, device="meta"), 0.5)
    with pytest.raises(ValueError, match="metric"):
        ops.overlap_counts(q, q, metric="cosine")
    with pytest.raises(TypeError):
        ops.popcounts(q.to(torch.int16))


@needs_ext
def test_native_ops_reject_bad_input_without_crashing():
    q = torch.zeros((2, 3), dtype=torch.int64)
    with pytest.raises(TypeError):
        torch.ops.memoir.overlap_counts(q.to(torch.int32), q)
    with pytest.raises(ValueError):
        torch.ops.memoir.best_match(q, torch.zeros((2, 4), dtype=torch.int64), 0.5)
    with pytest.raises(ValueError):
        torch.ops.memoir.best_match(torch.zeros(3, dtype=torch.int64), q, 0.5)
    with pytest.raises(ValueError):
        torch.ops.memoir.popcounts(torch.zeros(3, dtype=torch.int64))


# ----------------------------------------------------------------------------- dispatch / registration
@needs_ext
def test_backend_reports_cpp_and_reference_mode(monkeypatch):
    monkeypatch.delenv("MEMOIR_KERNELS", raising=False)
    backends.reload()
    assert ops.kernel_mode() == "auto"
    assert ops.backend()["cpu"] == "cpp"
    assert ops.cpu_isa() in ("avx512_vpopcntdq", "popcnt", "generic")
    from memoir import _C

    assert ops.backend()["cuda"] == ("cuda" if _C.has_cuda() else "torch")
    monkeypatch.setenv("MEMOIR_KERNELS", "reference")
    backends.reload()
    assert ops.backend() == {"cpu": "torch", "cuda": "torch"}
    gen = torch.Generator().manual_seed(5)
    q, m = rand_words(3, 4, gen), rand_words(9, 4, gen)
    assert torch.equal(ops.overlap_counts(q, m), ops.overlap_counts_reference(q, m))
    monkeypatch.setenv("MEMOIR_KERNELS", "fast")
    with pytest.raises(ValueError, match="MEMOIR_KERNELS"):
        backends.reload()


def test_backend_without_extension_falls_back(monkeypatch):
    monkeypatch.setattr(ops, "_NATIVE_STATE", False)
    assert ops.backend() == {"cpu": "torch", "cuda": "torch"}
    gen = torch.Generator().manual_seed(6)
    q, m = rand_words(2, 3, gen), rand_words(5, 3, gen)
    assert torch.equal(ops.best_match(q, m, 0.2)[1], ops.best_match_reference(q, m, 0.2)[1])


@needs_ext
def test_opcheck_and_compile():
    gen = torch.Generator().manual_seed(7)
    q, m = rand_words(3, 5, gen), rand_words(11, 5, gen)
    ops.backend()  # loads the extension and registers the fake kernels
    torch.library.opcheck(torch.ops.memoir.overlap_counts.default, (q, m))
    torch.library.opcheck(torch.ops.memoir.best_match.default, (q, m, 0.25))
    torch.library.opcheck(torch.ops.memoir.popcounts.default, (m,))

    def f(a, b):
        s, i = torch.ops.memoir.best_match(a, b, 0.25)
        return s * 2, i + 1, torch.ops.memoir.overlap_counts(a, b).sum(1)

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, m)
    expect = f(q, m)
    for a, b in zip(got, expect):
        assert torch.equal(a, b)


@needs_ext
@pytest.mark.parametrize("isa", ["generic", "popcnt"])
def test_lower_isa_paths_match(isa):
    """The popcount kernel is picked once per process; check the lower tiers in a subprocess."""
    code = (
        "import torch\n"
        "from memoir import ops, _C\n"
        f"assert _C.cpu_isa() == {isa!r}, _C.cpu_isa()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for b, n, w in ((1, 1, 1), (1, 99, 7), (5, 37, 3), (16, 300, 24), (3, 20, 225)):\n"
        "    q = torch.randint(-2**63, 2**63 - 1, (b, w), dtype=torch.int64, generator=g)\n"
        "    m = torch.randint(-2**63, 2**63 - 1, (n, w), dtype=torch.int64, generator=g)\n"
        "    m[n // 2] = q[0]\n"
        "    assert torch.equal(ops.overlap_counts(q, m), ops.overlap_counts_reference(q, m))\n"
        "    for a, r in zip(ops.best_match(q, m, 0.6), ops.best_match_reference(q, m, 0.6)):\n"
        "        assert torch.equal(a, r)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, MEMOIR_CPU_ISA=isa, MEMOIR_KERNELS="auto", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok" in out.stdout
