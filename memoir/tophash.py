"""TopHash: prompt activations -> de-centred prompt feature -> top-k -> permutation -> mask.

Pure-PyTorch reference (the specification that kernels are tested against).

Tie rule: among features of equal magnitude the lower feature index wins, so the
selection is deterministic on every device (``torch.topk`` does not promise this).
"""
from __future__ import annotations

import torch

from memoir.ops import pack_bits

AGGREGATIONS = ("mean_decentered", "mean", "last", "maxabs_decentered")


def prompt_features(
    acts: torch.Tensor,
    span: torch.Tensor,
    aggregation: str = "mean_decentered",
    background: torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregate activations [B, S, D] over each row's prompt span [B, S] (bool) -> [B, D].

    ``mean``: masked mean over the span; ``mean_decentered``: that minus the background mean;
    ``last``: the activation at the last position of the span; ``maxabs_decentered``: per feature
    the largest |activation - background mean| over the span (a feature that spikes on one token,
    e.g. of the subject, counts fully instead of being averaged with the question's wording).
    Rows with an empty span get a zero feature.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    span = span.to(acts.device)
    if aggregation == "last":
        s = acts.shape[1]
        pos = torch.arange(s, device=acts.device).expand_as(span)
        last = torch.where(span.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values.clamp_min(0)
        feat = acts[torch.arange(acts.shape[0], device=acts.device), last]
        return feat.float() * span.any(dim=1, keepdim=True)
    if aggregation == "maxabs_decentered":
        dev = acts.float()
        if background is not None:
            dev = dev - background.to(acts.device, torch.float32)
        return dev.abs().masked_fill(~span.bool()[..., None], 0.0).amax(dim=1)
    w = span.to(torch.float32)
    total = torch.einsum("bs,bsd->bd", w, acts.float())
    feat = total / w.sum(dim=1, keepdim=True).clamp_min(1.0)
    if aggregation == "mean_decentered" and background is not None:
        feat = feat - background.to(feat.device, torch.float32)
    return feat


def topk_indices(feat: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of the k largest |feat| per row, ties to the lower index."""
    if not 1 <= k <= feat.shape[-1]:
        raise ValueError(f"k must be in [1, {feat.shape[-1]}], got {k}")
    order = torch.sort(feat.abs(), dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def masks_from_features(feat: torch.Tensor, k: int, permutation: torch.Tensor):
    """TopHash masks for features [B, D].

    Returns ``(columns int64[B, k] sorted ascending, dense bool[B, D], packed int64[B, W])``.
    The columns are the permuted positions pi(T): the memory columns the edit owns.
    """
    top = topk_indices(feat, k)
    cols = permutation.to(feat.device)[top].sort(dim=-1).values
    dense = torch.zeros(feat.shape, dtype=torch.bool, device=feat.device)
    dense.scatter_(1, cols, True)
    return cols, dense, pack_bits(dense)


def make_permutation(dim: int, seed: int) -> torch.Tensor:
    """The fixed random permutation pi of {0..D-1}, from a private generator (no global seeding)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(dim, generator=g)
