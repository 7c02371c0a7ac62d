"""Triton kernels: fused TopHash and the sparse residual-memory matmul.

Without CUDA these run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before imports), so shapes stay tiny.  Oracles: memoir.tophash /
memoir.ops (TopHash, bit-exact) and residual_linear_reference (dense masks).

Float tolerance (flash-attention rule): the kernel's error against a float64 reference
is at most 2x the error of the same-precision PyTorch path, plus a tiny epsilon.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from memoir import kernels  # noqa: E402
from memoir.kernels import residual_linear, residual_linear_reference, tophash, tophash_select  # noqa: E402
from memoir.ops import pack_bits, unpack_bits  # noqa: E402
from memoir.tophash import make_permutation, masks_from_features, prompt_features  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"

pytestmark = pytest.mark.skipif(not kernels.available(), reason="Triton kernels cannot run here")


def _oracle_tophash(acts, span, bg, k, perm, scale=None):
    feat = prompt_features(acts, span, "mean_decentered", bg)
    if scale is not None:  # the layer's feature_scaling "std" (memoir.layer.MemoirLayer.features)
        feat = feat / scale
    cols, dense, packed = masks_from_features(feat, k, perm)
    return cols, dense, packed


def _check_tophash(acts, span, bg, k, perm, scale=None):
    cols, packed = tophash(acts, span, bg, k, perm, scale)
    rc, rdense, rpacked = _oracle_tophash(acts, span, bg, k, perm, scale)
    assert cols.dtype == torch.int64 and packed.dtype == torch.int64
    assert torch.equal(cols.cpu(), rc.cpu())
    assert torch.equal(packed.cpu(), rpacked.cpu())
    assert torch.equal(unpack_bits(packed, acts.shape[-1]).cpu(), rdense.cpu())
    assert bool((cols[:, 1:] > cols[:, :-1]).all())  # ascending, no duplicates


# ============================================================================ availability
def test_available_here():
    assert kernels.available() is True


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch, memoir.kernels as K\n"
        "assert K.available() is False\n"
        "a = torch.randn(2, 3, 70); w = torch.randn(5, 70); m = torch.randn(5, 70)\n"
        "c = torch.tensor([[1, 4], [0, 69]]); act = torch.tensor([True, False])\n"
        "y = K.residual_linear(a, w, None, m, c, act)\n"
        "r = K.residual_linear_reference(a, w, None, m, c, act)\n"
        "assert torch.allclose(y, r, atol=1e-5)\n"
        "perm = torch.randperm(70); s = torch.ones(2, 3, dtype=torch.bool)\n"
        "K.tophash(a, s, None, 7, perm)\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


# ============================================================================ TopHash
@pytest.mark.parametrize(
    "b,s,d,k",
    [(3, 5, 130, 17), (2, 4, 200, 1), (2, 3, 77, 77), (4, 6, 64, 20), (1, 1, 1, 1), (2, 2, 65, 64)],
)
def test_tophash_matches_oracle_integer_ties(b, s, d, k):
    """Integer-valued activations: many exact magnitude ties, sums are exact."""
    g = torch.Generator().manual_seed(d * 31 + k)
    acts = torch.randint(-3, 4, (b, s, d), generator=g).float().to(DEV)
    span = (torch.rand(b, s, generator=g) > 0.3).to(DEV)
    span[0, 0] = True
    bg = (torch.randint(-2, 3, (d,), generator=g).float() / 4).to(DEV)
    perm = make_permutation(d, seed=d).to(DEV)
    _check_tophash(acts, span, bg, k, perm)


@pytest.mark.parametrize("b,s,d,k", [(3, 5, 130, 17), (2, 3, 77, 77), (1, 1, 1, 1)])
def test_tophash_scaled_features_match_oracle(b, s, d, k):
    """Feature scaling: the division by the per-feature scale is correctly rounded, as torch's is,
    and a scale that reorders features (large values divided by large scales) changes the mask."""
    g = torch.Generator().manual_seed(d + k)
    acts = torch.randint(-3, 4, (b, s, d), generator=g).float().to(DEV)
    span = (torch.rand(b, s, generator=g) > 0.3).to(DEV)
    span[:, 0] = True
    bg = (torch.randint(-2, 3, (d,), generator=g).float() / 4).to(DEV)
    scale = (0.1 + 3 * torch.rand(d, generator=g)).to(DEV)  # not powers of two
    perm = make_permutation(d, seed=d).to(DEV)
    _check_tophash(acts, span, bg, k, perm, scale)
    if k < d:
        assert not torch.equal(tophash(acts, span, bg, k, perm, scale)[1], tophash(acts, span, bg, k, perm)[1])
    with pytest.raises(ValueError, match="scale"):
        tophash(acts, span, bg, k, perm, scale[:-1] if d > 1 else scale.repeat(2))


def test_tophash_empty_span_rows_and_no_background():
    g = torch.Generator().manual_seed(1)
    b, s, d, k = 3, 4, 100, 9
    acts = (torch.randint(-8, 9, (b, s, d), generator=g).float() / 8).to(DEV)
    span = torch.tensor([[True, True, False, False], [False] * 4, [True] * 4], device=DEV)
    perm = make_permutation(d, 3).to(DEV)
    _check_tophash(acts, span, None, k, perm)  # empty row: all-zero feature, all ties
    bg = (torch.randint(-8, 9, (d,), generator=g).float() / 16).to(DEV)
    _check_tophash(acts, span, bg, k, perm)  # empty row: feature = -background


def test_tophash_all_equal_magnitudes_and_signed_zero():
    d, k = 90, 13
    feat = torch.full((3, d), 2.0)
    feat[0, ::2] = -2.0  # equal magnitudes, mixed signs
    feat[1] = 0.0
    feat[1, 5::7] = -0.0
    feat[2, 40:] = -1.0
    perm = make_permutation(d, 5)
    cols, packed = tophash_select(feat.to(DEV), k, perm.to(DEV))
    rc, _, rp = masks_from_features(feat, k, perm)
    assert torch.equal(cols.cpu(), rc) and torch.equal(packed.cpu(), rp)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tophash_half_noncontiguous(dtype):
    g = torch.Generator().manual_seed(7)
    b, s, d, k = 2, 5, 150, 31
    base = (torch.randint(-16, 17, (b, d, 2 * s), generator=g).float() / 4).to(dtype).to(DEV)
    acts = base.transpose(1, 2)[:, ::2, :]  # [B, S, D], strides (.., 2, 2S)
    assert not acts.is_contiguous()
    span = torch.ones(b, s, dtype=torch.bool, device=DEV)
    span[1, 3:] = False
    bg = (torch.randint(-4, 5, (d,), generator=g).float() / 8).to(DEV)
    _check_tophash(acts, span, bg, k, make_permutation(d, 11).to(DEV))


def test_tophash_random_floats_selection_is_topk():
    """Non-dyadic data: summation order may differ in the last ulp, so check the kernel's
    selection is a valid top-k of the oracle features (and usually identical)."""
    g = torch.Generator().manual_seed(3)
    b, s, d, k = 3, 6, 190, 40
    acts = torch.randn(b, s, d, generator=g).to(DEV)
    span = (torch.rand(b, s, generator=g) > 0.2).to(DEV)
    span[:, 0] = True
    bg = (torch.randn(d, generator=g) * 0.1).to(DEV)
    perm = make_permutation(d, 2).to(DEV)
    cols, packed = tophash(acts, span, bg, k, perm)
    feat = prompt_features(acts, span, "mean_decentered", bg).abs()
    inv = torch.argsort(perm)
    sel = torch.zeros(b, d, dtype=torch.bool, device=DEV).scatter_(1, inv[cols], True)
    assert int(sel.sum()) == b * k
    lo = torch.where(sel, feat, torch.full_like(feat, float("inf"))).min(dim=1).values
    hi = torch.where(sel, torch.full_like(feat, -1.0), feat).max(dim=1).values
    assert bool((lo >= hi - 1e-6).all())
    assert torch.equal(packed, pack_bits(torch.zeros(b, d, dtype=torch.bool, device=DEV).scatter_(1, cols, True)))


def test_tophash_chunked_path(monkeypatch):
    """Rows longer than one block (the GPU path for D > 16384), forced with small blocks."""
    monkeypatch.setattr(sys.modules["memoir.kernels._tophash"], "_SINGLE_MAX", 64)
    monkeypatch.setattr(sys.modules["memoir.kernels._tophash"], "_CHUNK", 64)
    g = torch.Generator().manual_seed(5)
    for d, k in [(200, 37), (129, 129), (150, 1)]:
        acts = torch.randint(-2, 3, (2, 3, d), generator=g).float().to(DEV)
        span = torch.tensor([[True, False, True], [False, False, False]], device=DEV)
        bg = (torch.randint(-2, 3, (d,), generator=g).float() / 2).to(DEV)
        _check_tophash(acts, span, bg, k, make_permutation(d, d).to(DEV))


def test_tophash_rejects_bad_k():
    acts = torch.zeros(1, 2, 10, device=DEV)
    span = torch.ones(1, 2, dtype=torch.bool, device=DEV)
    with pytest.raises(ValueError):
        tophash(acts, span, None, 0, torch.arange(10, device=DEV))
    with pytest.raises(ValueError):
        tophash(acts, span, None, 11, torch.arange(10, device=DEV))


# ============================================================================ residual
def _make(b, s, d_in, d_out, k, dtype, *, active=None, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, s, d_in, generator=g)
    w0 = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    bia = torch.randn(d_out, generator=g) if bias else None
    mem = torch.randn(d_out, d_in, generator=g) / k**0.5
    cols = torch.stack([torch.randperm(d_in, generator=g)[:k].sort().values for _ in range(b)])
    if active is None:
        active = torch.rand(b, generator=g) > 0.3
    active = torch.as_tensor(active, dtype=torch.bool)
    cast = lambda t: None if t is None else t.to(dtype).to(DEV)  # noqa: E731
    return cast(a), cast(w0), cast(bia), cast(mem), cols.to(DEV), active.to(DEV)


def _assert_rule(out, args, eps_rel=1e-6):
    """Kernel error vs a float64 reference <= 2x the same-precision PyTorch error + eps."""
    a, w0, bias, mem, cols, act = args
    up = lambda t: None if t is None else t.double()  # noqa: E731
    ref = residual_linear_reference(up(a), up(w0), up(bias), up(mem), cols, act)
    same = residual_linear_reference(a, w0, bias, mem, cols, act)
    err = (out.double() - ref).abs().max().item()
    base = (same.double() - ref).abs().max().item()
    eps = eps_rel * max(1.0, ref.abs().max().item())
    assert out.dtype == a.dtype and out.shape == ref.shape
    assert err <= 2 * base + eps, f"kernel err {err:.3g} > 2 x torch err {base:.3g} + {eps:.1g}"


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["gemv", "gathered", "masked"])
def test_residual_variants_mixed_batch(variant, dtype):
    # odd sizes: D=150, d=40 are not multiples of any block; rows 1 and 3 have no edit
    args = _make(4, 3, 150, 40, 37, dtype, active=[True, False, True, False], seed=1)
    out = residual_linear(*args, variant=variant)
    _assert_rule(out, args)


@pytest.mark.parametrize("b,s", [(1, 1), (4, 1), (1, 6), (3, 5)])
def test_residual_auto_variant_shapes(b, s):
    args = _make(b, s, 130, 24, 29, torch.float32, seed=b * 10 + s)
    _assert_rule(residual_linear(*args), args)


@pytest.mark.parametrize("variant", ["gemv", "gathered", "masked"])
@pytest.mark.parametrize("k", [1, 96])
def test_residual_k_extremes(variant, k):
    """k = 1 and k = D (every column active); fp16, residual-only (w0 = 0, no bias)."""
    a, w0, _b, mem, cols, act = _make(2, 3, 96, 20, k, torch.float16, active=[True, True], seed=k, bias=False)
    w0 = torch.zeros_like(w0)
    args = (a, w0, None, mem, cols, act)
    _assert_rule(residual_linear(*args, variant=variant), args)


def test_residual_no_active_rows_is_plain_linear():
    a, w0, bias, mem, cols, act = _make(3, 2, 70, 16, 9, torch.float32, active=[False] * 3)
    for variant in ("gemv", "gathered", "masked"):
        out = residual_linear(a, w0, bias, mem, cols, act, variant=variant)
        assert torch.equal(out, torch.nn.functional.linear(a, w0, bias))


@pytest.mark.parametrize("variant", ["gemv", "gathered", "masked"])
def test_residual_noncontiguous_inputs(variant):
    """a sliced, w0 a transposed view (GPT-2 Conv1D), memory stored column-major, cols strided."""
    g = torch.Generator().manual_seed(9)
    b, s, d_in, d_out, k = 2, 3, 110, 36, 23
    a = torch.randn(b, 2 * s, d_in + 5, generator=g)[:, ::2, 3 : 3 + d_in].to(DEV)
    w0 = (torch.randn(d_in, d_out, generator=g) / 10).to(DEV).t()  # [d, D] view, strides (1, d)
    mem = (torch.randn(d_in, d_out, generator=g) / 5).to(DEV).t()
    cols_full = torch.stack([torch.randperm(d_in, generator=g)[: 2 * k].sort().values for _ in range(b)])
    cols = cols_full.to(DEV)[:, ::2]
    bias = torch.randn(d_out, generator=g).to(DEV)
    act = torch.tensor([True, True], device=DEV)
    assert not (a.is_contiguous() or w0.is_contiguous() or mem.is_contiguous() or cols.is_contiguous())
    args = (a, w0, bias, mem, cols, act)
    _assert_rule(residual_linear(*args, variant=variant), args)


def test_residual_torch_variant_matches_reference():
    args = _make(3, 4, 80, 12, 10, torch.float32, seed=4)
    _assert_rule(residual_linear(*args, variant="torch"), args)


def test_choose_variant():
    from memoir.kernels import choose_variant

    assert choose_variant(1, 1, 14336, 4096) == "gemv"
    assert choose_variant(4, 1, 14336, 4096) == "gemv"
    assert choose_variant(1, 2048, 14336, 4096) == "gathered"
    assert choose_variant(64, 1, 14336, 4096) == "masked"


# ============================================================================ gradients
def _grads(fn, args, variant=None):
    a, w0, bias, mem, cols, act = args
    leaves = [t.detach().clone().requires_grad_(True) for t in (a, w0, bias, mem)]
    out = fn(*leaves, cols, act) if variant is None else fn(*leaves, cols, act, variant=variant)
    g = torch.Generator().manual_seed(123)
    upstream = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    (out * upstream).sum().backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("variant", ["gemv", "gathered", "masked"])
def test_gradients_match_autograd_of_oracle(variant):
    args = _make(3, 2, 90, 20, 17, torch.float32, active=[True, False, True], seed=12)
    got = _grads(residual_linear, args, variant)
    up = [None if t is None else (t.double() if t.is_floating_point() else t) for t in args]
    want64 = _grads(residual_linear_reference, up)
    want32 = _grads(residual_linear_reference, args)
    for name, g_k, g_64, g_32 in zip(("a", "w0", "bias", "memory"), got, want64, want32):
        err = (g_k.double() - g_64).abs().max().item()
        base = (g_32.double() - g_64).abs().max().item()
        assert err <= 2 * base + 1e-6 * max(1.0, g_64.abs().max().item()), name
    # memory gradient lives only on active rows' columns
    a, w0, bias, mem, cols, act = args
    touched = torch.zeros(mem.shape[1], dtype=torch.bool, device=DEV)
    touched[cols[act].reshape(-1)] = True
    assert bool((got[3][:, ~touched] == 0).all())


def test_gradient_memory_only_fp16():
    """Edit-loop case: only memory requires grad; rows share columns (index_add)."""
    a, w0, bias, mem, cols, act = _make(3, 4, 70, 16, 20, torch.float16, active=[True, True, False], seed=5)
    cols[1] = cols[0]
    memk = mem.clone().requires_grad_(True)
    out = residual_linear(a, w0, bias, memk, cols, act)
    out.float().sum().backward()
    mem64 = mem.double().requires_grad_(True)
    residual_linear_reference(a.double(), w0.double(), bias.double(), mem64, cols, act).sum().backward()
    mem16 = mem.clone().requires_grad_(True)
    residual_linear_reference(a, w0, bias, mem16, cols, act).float().sum().backward()
    err = (memk.grad.double() - mem64.grad).abs().max().item()
    base = (mem16.grad.double() - mem64.grad).abs().max().item()
    assert memk.grad.dtype == torch.float16
    assert err <= 2 * base + 1e-3


# ============================================================================ GPU-only
@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["gemv", "gathered", "masked"])
def test_gpu_bf16_native_mma(variant):
    """bf16 with tensor-core tl.dot (the interpreter upcasts bf16 dots instead)."""
    args = _make(4, 33, 1000, 256, 300, torch.bfloat16, seed=2)
    if variant == "gemv":
        args = _make(2, 2, 1000, 256, 300, torch.bfloat16, seed=2)
    _assert_rule(residual_linear(*args, variant=variant), args)


@pytest.mark.gpu
def test_gpu_tophash_llama_width():
    g = torch.Generator().manual_seed(0)
    d, k = 14336, 4096
    acts = (torch.randint(-64, 65, (3, 9, d), generator=g).float() / 16).to("cuda", torch.bfloat16)
    span = torch.ones(3, 9, dtype=torch.bool, device="cuda")
    span[2] = False
    bg = (torch.randint(-8, 9, (d,), generator=g).float() / 32).cuda()
    _check_tophash(acts, span, bg, k, make_permutation(d, 1).cuda())
    # longer than one register block: the chunked path
    d2 = 20000
    acts2 = torch.randint(-3, 4, (2, 4, d2), generator=g).float().cuda()
    _check_tophash(acts2, torch.ones(2, 4, dtype=torch.bool, device="cuda"), None, 777, make_permutation(d2, 2).cuda())
