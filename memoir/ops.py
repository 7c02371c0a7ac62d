"""Mask-bank retrieval ops: packed-bit overlap between query masks and stored edit masks.

Layout (a contract shared with the C++/CUDA kernels): a mask of D bits is packed
little-endian into W = ceil(D / 64) 64-bit words held in an int64 tensor; bit i of the
mask is bit (i % 64) of word (i // 64).  This is what
``numpy.packbits(bits, bitorder="little").view(numpy.uint64)`` gives.

Every op has a pure-PyTorch kernel here that always works and is the test oracle.
Native kernels (``memoir._C``) are used when the extension is built, unless
``MEMOIR_KERNELS=reference`` (the choice is made in ``memoir.backends``).
"""
from __future__ import annotations

import logging

import torch

from memoir import backends
from memoir.backends import KERNEL_MODES, kernel_mode  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

METRICS = ("overlap", "hamming", "jaccard")


# ----------------------------------------------------------------------------- packing
def num_words(num_bits: int) -> int:
    return (num_bits + 63) // 64


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool/0-1 tensor [..., D] into int64 words [..., ceil(D/64)]."""
    d = mask.shape[-1]
    w = num_words(d)
    bits = mask.to(torch.bool)
    if w * 64 != d:
        bits = torch.nn.functional.pad(bits, (0, w * 64 - d))
    bits = bits.reshape(*bits.shape[:-1], w, 64).to(torch.int64)
    shifts = torch.arange(64, device=mask.device, dtype=torch.int64)
    # Sum of distinct powers of two == bitwise OR; bit 63 wraps to the sign bit as intended.
    return (bits << shifts).sum(dim=-1)


def unpack_bits(words: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int64 words [..., W] -> bool [..., num_bits]."""
    shifts = torch.arange(64, device=words.device, dtype=torch.int64)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], words.shape[-1] * 64)[..., :num_bits].to(torch.bool)


def popcount64(x: torch.Tensor) -> torch.Tensor:
    """Per-element popcount of int64 words (SWAR; exact for negative values too)."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    # Byte sums without a wrapping multiply: fold by shifts, keep the low 7 bits.
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


# ----------------------------------------------------------------------------- checks
def _check_pair(queries: torch.Tensor, bank: torch.Tensor) -> None:
    for name, t in (("queries", queries), ("bank", bank)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must hold packed masks as int64 words, got dtype {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, words], got shape {tuple(t.shape)}")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"word counts differ: queries have {queries.shape[1]} words per mask, bank has {bank.shape[1]}"
        )
    if queries.device != bank.device:
        raise ValueError(f"queries on {queries.device} but bank on {bank.device}: move them to one device")


# ----------------------------------------------------------------------------- reference kernels
def _chunk_rows(n: int, b: int, w: int) -> int:
    # Keep the [B, chunk, W] intermediate around 16M elements.
    return max(1, (1 << 24) // max(1, b * w))


def overlap_counts_reference(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    b, n = queries.shape[0], bank.shape[0]
    out = torch.empty((b, n), dtype=torch.int32, device=queries.device)
    step = _chunk_rows(n, b, bank.shape[1])
    for s in range(0, n, step):
        inter = queries[:, None, :] & bank[None, s : s + step, :]
        out[:, s : s + step] = popcount64(inter).sum(dim=-1).to(torch.int32)
    return out


def popcounts_reference(masks: torch.Tensor) -> torch.Tensor:
    return popcount64(masks).sum(dim=-1).to(torch.int32)


def best_match_reference(queries: torch.Tensor, bank: torch.Tensor, threshold: float):
    b = queries.shape[0]
    if bank.shape[0] == 0:
        return (
            torch.zeros(b, dtype=torch.float32, device=queries.device),
            torch.full((b,), -1, dtype=torch.int64, device=queries.device),
        )
    counts = overlap_counts_reference(queries, bank)
    qpop = popcounts_reference(queries).clamp_min(1).to(torch.float32)
    # argmax over integer counts returns the first (lowest) index on ties: deterministic.
    best_count, index = counts.max(dim=1)
    scores = best_count.to(torch.float32) / qpop
    index = torch.where(scores >= threshold, index, torch.full_like(index, -1))
    return scores, index


# ----------------------------------------------------------------------------- dispatch
# Native ops (``torch.ops.memoir.*``) are defined in C++ (csrc/memoir_ops.cpp):
#   overlap_counts(Tensor queries, Tensor bank) -> Tensor            int32 [B, N]
#   best_match(Tensor queries, Tensor bank, float threshold) -> (Tensor, Tensor)
#   popcounts(Tensor masks) -> Tensor                                int32 [N]
# with CPU kernels always and CUDA kernels when built with CUDA.  Their fake (meta) kernels
# for torch.compile are registered below, once the library is loaded.
_NATIVE_STATE = None


def _overlap_counts_fake(queries, bank):
    _check_pair(queries, bank)
    return queries.new_empty((queries.shape[0], bank.shape[0]), dtype=torch.int32)


def _best_match_fake(queries, bank, threshold):
    _check_pair(queries, bank)
    b = queries.shape[0]
    return queries.new_empty((b,), dtype=torch.float32), queries.new_empty((b,), dtype=torch.int64)


def _popcounts_fake(masks):
    return masks.new_empty((masks.shape[0],), dtype=torch.int32)


def _register_fakes() -> None:
    for name, fn in (
        ("memoir::overlap_counts", _overlap_counts_fake),
        ("memoir::best_match", _best_match_fake),
        ("memoir::popcounts", _popcounts_fake),
    ):
        try:
            torch.library.register_fake(name, fn)
        except RuntimeError as exc:  # e.g. this module was reloaded: the first registration stands
            if "already" not in str(exc):
                raise


def _native():
    """The built extension, or None.  Imported lazily; failure is logged once."""
    global _NATIVE_STATE
    if _NATIVE_STATE is None:
        try:
            from memoir import _C  # noqa: F401  (loading it registers torch.ops.memoir.*)

            _register_fakes()
            _NATIVE_STATE = _C
            log.debug("memoir._C loaded: cpu=%s (%s), cuda=%s", _C.has_cpu(), _C.cpu_isa(), _C.has_cuda())
        except Exception as exc:  # pragma: no cover - depends on the build
            log.info("memoir._C native extension not available (%s); using PyTorch kernels", exc)
            _NATIVE_STATE = False
    return _NATIVE_STATE or None


def backend() -> dict:
    """Which implementation serves CPU and CUDA tensors: 'cpp', 'cuda' or 'torch'."""
    return backends.retrieval()


def cpu_isa() -> str:
    """The CPU popcount kernel the extension picked ('avx512_vpopcntdq', 'popcnt', 'generic'), or 'torch'."""
    native = _native() if backends.kernel_mode() != "reference" else None
    return native.cpu_isa() if native is not None else "torch"


def _use_native(t: torch.Tensor) -> bool:
    return backends.native_retrieval(t)


def popcounts(masks: torch.Tensor) -> torch.Tensor:
    """Set bits per packed mask: int64 [N, W] -> int32 [N]."""
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor, got {type(masks).__name__}")
    if masks.dtype != torch.int64:
        raise TypeError(f"masks must hold packed masks as int64 words, got dtype {masks.dtype}")
    if masks.dim() != 2:
        raise ValueError(f"masks must be 2-D [rows, words], got shape {tuple(masks.shape)}")
    if _use_native(masks):
        return torch.ops.memoir.popcounts(masks.contiguous())
    return popcounts_reference(masks)


def overlap_counts(queries: torch.Tensor, bank: torch.Tensor, metric: str = "overlap") -> torch.Tensor:
    """Pairwise similarity between packed query masks [B, W] and a packed bank [N, W].

    ``overlap``: int32 |q AND m|; ``hamming``: int32 |q XOR m|;
    ``jaccard``: float32 |q AND m| / |q OR m| (0 where both masks are empty).
    """
    _check_pair(queries, bank)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    queries, bank = queries.contiguous(), bank.contiguous()
    native = _use_native(queries)
    if native:
        inter = torch.ops.memoir.overlap_counts(queries, bank)
    else:
        inter = overlap_counts_reference(queries, bank)
    if metric == "overlap":
        return inter
    pop = torch.ops.memoir.popcounts if native else popcounts_reference
    qpop = pop(queries)[:, None]
    mpop = pop(bank)[None, :]
    if metric == "hamming":
        return qpop + mpop - 2 * inter
    union = (qpop + mpop - inter).to(torch.float32)
    return torch.where(union > 0, inter.to(torch.float32) / union.clamp_min(1), torch.zeros_like(union))


def best_match(queries: torch.Tensor, bank: torch.Tensor, threshold: float):
    """Best stored mask per query by overlap ratio |q AND m| / popcount(q).

    Returns ``(scores float32[B], index int64[B])``; index is -1 where the best score is
    below ``threshold`` (or the bank is empty).  Ties go to the lowest index.
    """
    _check_pair(queries, bank)
    threshold = float(threshold)
    queries, bank = queries.contiguous(), bank.contiguous()
    if _use_native(queries):
        return torch.ops.memoir.best_match(queries, bank, threshold)
    return best_match_reference(queries, bank, threshold)
