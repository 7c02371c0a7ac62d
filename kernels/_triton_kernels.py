"""The Triton kernels themselves.  Imported lazily (only when Triton is present).

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` runs, i.e. when this module is
first imported; the wrappers import it on first use.

Interpreter notes: no custom reduce/scan combiners are used (only ``tl.sum`` and
``tl.cumsum``), and bf16 ``tl.dot`` is avoided there (``DOT_F32``) because the
interpreter mis-computes it.
"""
from __future__ import annotations

import triton
import triton.language as tl


# ============================================================================ TopHash
@triton.jit
def tophash_feature_kernel(
    acts_ptr, span_ptr, bg_ptr, scale_ptr, feat_ptr,
    S, D,
    stride_ab, stride_as, stride_ad,
    stride_sb, stride_ss,
    HAS_BG: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """feat[b, :] = (mean over span rows of acts[b, s, :] (0 if empty) - background) / scale.

    Grid (B, cdiv(D, BLOCK_D)); [BLOCK_S, BLOCK_D] tiles, tokens outside the span are
    masked off (never read); the per-token-lane partial sums are reduced at the end.
    """
    b = tl.program_id(0)
    pd = tl.program_id(1)
    offs = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_S], dtype=tl.float32)
    row = acts_ptr + b.to(tl.int64) * stride_ab
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        smask = ss < S
        w = tl.load(span_ptr + b * stride_sb + ss * stride_ss, mask=smask, other=0)
        on = (w != 0) & smask
        x = tl.load(
            row + ss[:, None].to(tl.int64) * stride_as + offs[None, :] * stride_ad,
            mask=on[:, None] & dmask[None, :], other=0.0,
        )
        acc += x.to(tl.float32)
        cnt += on.to(tl.float32)
    total = tl.sum(acc, axis=0)
    n = tl.sum(cnt, axis=0)
    # Correctly rounded division, as torch does (plain `/` is approximate on GPU).
    feat = tl.math.div_rn(total, tl.zeros([BLOCK_D], dtype=tl.float32) + tl.maximum(n, 1.0))
    if HAS_BG:
        feat = feat - tl.load(bg_ptr + offs, mask=dmask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        feat = tl.math.div_rn(feat, tl.load(scale_ptr + offs, mask=dmask, other=1.0).to(tl.float32))
    tl.store(feat_ptr + b * D + offs, feat, mask=dmask)


@triton.jit
def _keys(feat_row, offs, dmask):
    # |x| as its IEEE bit pattern: for non-negative floats, integer order == float order.
    x = tl.load(feat_row + offs, mask=dmask, other=0.0)
    return tl.abs(x).to(tl.int32, bitcast=True)


@triton.jit
def tophash_select_kernel(
    feat_ptr, perm_ptr, dense_ptr, cols_ptr, packed_ptr,
    D, K, W,
    SINGLE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Exact top-k by |feat| (ties: lower index), permuted, packed and compacted.

    1. threshold search: bisection over the 31-bit pattern of |feat| finds T, the k-th
       largest key (largest t with #{key >= t} >= k);
    2. selection: key > T, plus the first (k - #{key > T}) indices with key == T, in
       index order (running exclusive cumsum);
    3. the selected features j set dense[b, perm[j]] = 1 (perm is a bijection: no races);
    4. after a block barrier, dense is read back in position order: 64-bit words are
       packed and the set positions compacted (cumsum) into ascending ``cols``.

    One program per row. ``SINGLE``: the whole row fits one block and stays in registers.
    ``dense`` must be zero on entry.
    """
    b = tl.program_id(0)
    feat_row = feat_ptr + b.to(tl.int64) * D
    dense_row = dense_ptr + b.to(tl.int64) * D
    ar = tl.arange(0, BLOCK)

    # ---- 1. threshold by bisection on the bit pattern
    if SINGLE:
        dmask0 = ar < D
        keys0 = _keys(feat_row, ar, dmask0)
    t = tl.full([], 0, dtype=tl.int32)
    for i in range(31):
        cand = t | (1 << (30 - i))
        if SINGLE:
            cnt = tl.sum(((keys0 >= cand) & dmask0).to(tl.int32), axis=0)
        else:
            cnt = tl.full([], 0, dtype=tl.int32)
            for start in range(0, D, BLOCK):
                offs = start + ar
                dm = offs < D
                key = _keys(feat_row, offs, dm)
                cnt += tl.sum(((key >= cand) & dm).to(tl.int32), axis=0)
        t = tl.where(cnt >= K, cand, t)

    # ---- 2+3. select (ties by index) and scatter the permuted bits
    if SINGLE:
        n_gt = tl.sum(((keys0 > t) & dmask0).to(tl.int32), axis=0)
    else:
        n_gt = tl.full([], 0, dtype=tl.int32)
        for start in range(0, D, BLOCK):
            offs = start + ar
            dm = offs < D
            key = _keys(feat_row, offs, dm)
            n_gt += tl.sum(((key > t) & dm).to(tl.int32), axis=0)
    need = K - n_gt  # >= 1 by construction of t
    eq_seen = tl.full([], 0, dtype=tl.int32)
    for start in range(0, D, BLOCK):
        offs = start + ar
        dm = offs < D
        if SINGLE:
            key = keys0
        else:
            key = _keys(feat_row, offs, dm)
        eq = ((key == t) & dm).to(tl.int32)
        rank = eq_seen + tl.cumsum(eq, axis=0) - eq
        sel = ((key > t) & dm) | ((eq != 0) & (rank < need))
        p = tl.load(perm_ptr + offs, mask=dm, other=0)
        tl.store(dense_row + p, tl.full([BLOCK], 1, dtype=tl.int8), mask=sel)
        eq_seen += tl.sum(eq, axis=0)

    tl.debug_barrier()  # the scattered bytes must be visible to every thread of the block

    # ---- 4. pack 64-bit words and compact the ascending column list
    shifts = (ar % 64).to(tl.int64)
    n_seen = tl.full([], 0, dtype=tl.int32)
    for start in range(0, W * 64, BLOCK):
        offs = start + ar
        dm = offs < D
        bit = tl.load(dense_row + offs, mask=dm, other=0).to(tl.int32)
        pos = n_seen + tl.cumsum(bit, axis=0) - bit
        tl.store(cols_ptr + b.to(tl.int64) * K + pos, offs.to(tl.int64), mask=(bit != 0) & (pos < K))
        # sum of distinct powers of two == OR; bit 63 lands on the sign bit as intended
        words = tl.sum(tl.reshape(bit.to(tl.int64) << shifts, (BLOCK // 64, 64)), axis=1)
        widx = start // 64 + tl.arange(0, BLOCK // 64)
        tl.store(packed_ptr + b.to(tl.int64) * W + widx, words, mask=widx < W)
        n_seen += tl.sum(bit, axis=0)


# ============================================================================ residual
@triton.jit
def residual_gemv_kernel(
    a_ptr, mem_ptr, cols_ptr, active_ptr, y_ptr,
    S, N, K,
    stride_ab, stride_as, stride_ad,
    stride_mn, stride_md,
    stride_cb, stride_ck,
    stride_yb, stride_ys, stride_yn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Decode path: y[b, s, n] += sum_j memory[n, cols[b, j]] * a[b, s, cols[b, j]].

    Grid (cdiv(N, BLOCK_N), B*S); one token row per program, gathered GEMV over the k
    columns; inactive rows read nothing and write nothing.
    """
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    b = m // S
    s = m % S
    act = tl.load(active_ptr + b)
    kend = tl.where(act != 0, K, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    a_row = a_ptr + b.to(tl.int64) * stride_ab + s.to(tl.int64) * stride_as
    c_row = cols_ptr + b.to(tl.int64) * stride_cb
    for k0 in range(0, kend, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        c = tl.load(c_row + kk * stride_ck, mask=kmask, other=0)
        x = tl.load(a_row + c * stride_ad, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(
            mem_ptr + offs_n[:, None] * stride_mn + c[None, :] * stride_md,
            mask=nmask[:, None] & kmask[None, :], other=0.0,
        ).to(tl.float32)
        acc += w * x[None, :]
    res = tl.sum(acc, axis=1)
    # (broadcast the scalar first: the interpreter rejects scalar-int1 & block masks)
    ymask = nmask & ((tl.zeros([BLOCK_N], dtype=tl.int32) + act.to(tl.int32)) != 0)
    y_ptrs = y_ptr + b.to(tl.int64) * stride_yb + s.to(tl.int64) * stride_ys + offs_n * stride_yn
    y = tl.load(y_ptrs, mask=ymask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + res).to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def residual_gathered_gemm_kernel(
    a_ptr, mem_ptr, cols_ptr, active_ptr, y_ptr,
    S, N, K,
    stride_ab, stride_as, stride_ad,
    stride_mn, stride_md,
    stride_cb, stride_ck,
    stride_yb, stride_ys, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Prefill path: per batch row b, Y[b] += A[b][:, cols[b]] @ memory[:, cols[b]].T.

    Grid (cdiv(S, BLOCK_M), cdiv(N, BLOCK_N), B).  A tile never crosses batch rows, so
    all its tokens share one column set: a plain GEMM over k gathered columns.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    act = tl.load(active_ptr + b)
    kend = tl.where(act != 0, K, 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < S
    nmask = offs_n < N
    a_base = a_ptr + b.to(tl.int64) * stride_ab
    c_row = cols_ptr + b.to(tl.int64) * stride_cb
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, kend, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        c = tl.load(c_row + kk * stride_ck, mask=kmask, other=0)
        x = tl.load(
            a_base + offs_m[:, None] * stride_as + c[None, :] * stride_ad,
            mask=mmask[:, None] & kmask[None, :], other=0.0,
        )
        w = tl.load(
            mem_ptr + c[:, None] * stride_md + offs_n[None, :] * stride_mn,
            mask=kmask[:, None] & nmask[None, :], other=0.0,
        )
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    act_blk = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32) + act.to(tl.int32)
    ymask = mmask[:, None] & nmask[None, :] & (act_blk != 0)
    y_ptrs = (y_ptr + b.to(tl.int64) * stride_yb
              + offs_m[:, None].to(tl.int64) * stride_ys + offs_n[None, :] * stride_yn)
    y = tl.load(y_ptrs, mask=ymask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def residual_masked_gemm_kernel(
    a_ptr, mem_ptr, mask_ptr, y_ptr,
    M, S, N, D,
    stride_ab, stride_as, stride_ad,
    stride_mn, stride_md,
    stride_yb, stride_ys, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Many short rows (batched decode): Y += (A * Mask[row's b]) @ memory.T over all D.

    Grid (cdiv(B*S, BLOCK_M), cdiv(N, BLOCK_N)).  Rows with different masks share one
    pass over the memory; ``mask`` is a dense int8 [B, D] (all zero for inactive rows).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    rb = (offs_m // S).to(tl.int64)
    rs = (offs_m % S).to(tl.int64)
    a_rows = a_ptr + rb * stride_ab + rs * stride_as
    mk_rows = mask_ptr + rb * D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < D
        lm = mmask[:, None] & kmask[None, :]
        x = tl.load(a_rows[:, None] + kk[None, :] * stride_ad, mask=lm, other=0.0)
        on = tl.load(mk_rows[:, None] + kk[None, :], mask=lm, other=0)
        x = tl.where(on != 0, x, tl.zeros_like(x))
        w = tl.load(
            mem_ptr + kk[:, None] * stride_md + offs_n[None, :] * stride_mn,
            mask=kmask[:, None] & nmask[None, :], other=0.0,
        )
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    ymask = mmask[:, None] & nmask[None, :]
    y_ptrs = y_ptr + (rb * stride_yb + rs * stride_ys)[:, None] + offs_n[None, :] * stride_yn
    y = tl.load(y_ptrs, mask=ymask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=ymask)
