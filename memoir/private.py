"""Private edit blocks (``memory: private``): each edit keeps its own low-rank slice of the memory.

In the shared memory of MEMOIR every edit writes into the columns of its TopHash mask, and those
columns are shared with many other edits (k / D = 0.15 means each column of SmolLM2's memory
holds ~110 of 731 edits): later edits move what earlier ones wrote, which costs the earlier
edits' rephrasings first (CounterFact public, Gen 0.757 at N = 100 but 0.507 at N = 731, while
the router still sends 0.98 of paraphrases to their own edit).  With ``memory: private`` an edit
trains its columns on an empty scratch memory exactly as before, and the result, the block
``Wm[:, cols]`` ``[out, k]``, is stored for that edit alone as ``U [out, r] @ V [r, k]`` (a
truncated SVD; SGD from zero keeps the block inside the span of the edit's few dozen layer
inputs, so a small ``r`` holds nearly all of it).  A sequence routed to an edit reads only that
edit's block: no edit can overwrite another.

Memory cost per edit: ``r * (out + k)`` floats (SmolLM2, r = 16: 52 kB in float32; the blocks hold 99.99 % of their energy within rank ~14 on CounterFact edits).
"""
from __future__ import annotations

import torch

from memoir.state import GrowingBuffers


class PrivateBlocks(GrowingBuffers):
    """Per stored edit (buffers, rows in insertion order): ``ids [N]``, the edit's columns ``cols [N, k]``,
    its block's factors ``u [N, out, r]``, ``v [N, r, k]`` (rank below ``r`` zero-padded) and the number
    of its target's tokens ``lens [N]`` (how long the block is needed in a generation)."""

    def __init__(self, out_features: int, top_k: int, rank: int, device=None):
        super().__init__()
        self.rank = int(rank)
        self.register_buffer("ids", torch.zeros((0,), dtype=torch.int64, device=device))
        self.register_buffer("cols", torch.zeros((0, top_k), dtype=torch.int64, device=device))
        self.register_buffer("u", torch.zeros((0, out_features, self.rank), device=device))
        self.register_buffer("v", torch.zeros((0, self.rank, top_k), device=device))
        self.register_buffer("lens", torch.zeros((0,), dtype=torch.int64, device=device))

    def __len__(self) -> int:
        return self.ids.shape[0]

    def add(self, edit_id: int, cols: torch.Tensor, block: torch.Tensor, target_tokens: int = 1) -> float:
        """Store ``block`` ``[out, k]`` (the edit's trained columns ``cols``, for a target of
        ``target_tokens`` tokens) as rank-``r`` factors; returns the share of its energy (squared
        Frobenius norm) the factors keep."""
        u, s, vh = torch.linalg.svd(block.detach().float(), full_matrices=False)
        r = min(self.rank, s.shape[0])
        total = float((s ** 2).sum())
        kept = float((s[:r] ** 2).sum()) / total if total > 0 else 1.0
        dev, dtype = self.u.device, self.u.dtype
        uu = torch.zeros((1, self.u.shape[1], self.rank), dtype=dtype, device=dev)
        vv = torch.zeros((1, self.rank, self.v.shape[2]), dtype=dtype, device=dev)
        uu[0, :, :r] = (u[:, :r] * s[:r]).to(dev, dtype)
        vv[0, :r] = vh[:r].to(dev, dtype)
        self.ids = torch.cat([self.ids, torch.tensor([int(edit_id)], dtype=torch.int64, device=dev)])
        self.cols = torch.cat([self.cols, cols.reshape(1, -1).to(dev, torch.int64)])
        self.u, self.v = torch.cat([self.u, uu]), torch.cat([self.v, vv])
        self.lens = torch.cat([self.lens, torch.tensor([max(int(target_tokens), 1)], dtype=torch.int64, device=dev)])
        return kept

    def pop(self, edit_id: int) -> None:
        keep = self.ids != int(edit_id)
        self.ids, self.cols, self.u, self.v = self.ids[keep], self.cols[keep], self.u[keep], self.v[keep]
        self.lens = self.lens[keep]

    def snapshot(self):
        """The current tensors (replaced, never modified in place: holding them is a snapshot)."""
        return self.ids, self.cols, self.u, self.v, self.lens

    def restore(self, snapshot) -> None:
        self.ids, self.cols, self.u, self.v, self.lens = snapshot

    def block(self, edit_id: int) -> torch.Tensor:
        """The stored block of ``edit_id`` as ``[out, k]`` (``U @ V``)."""
        i = self.ids.tolist().index(int(edit_id))
        return self.u[i] @ self.v[i]

    def state(self) -> dict:
        return {"private_ids": self.ids.contiguous().cpu(), "private_cols": self.cols.contiguous().cpu(),
                "private_u": self.u.contiguous().cpu(), "private_v": self.v.contiguous().cpu(),
                "private_lens": self.lens.contiguous().cpu()}

    def load(self, state: dict, device) -> None:
        self.ids = state["private_ids"].to(device, torch.int64)
        self.cols = state["private_cols"].to(device, torch.int64)
        self.u = state["private_u"].to(device, self.u.dtype)
        self.v = state["private_v"].to(device, self.v.dtype)
        self.lens = state["private_lens"].to(device, torch.int64)

    def index_for(self, bank_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``[B]``: the block of each sequence's bank row (``-1``: unrouted or no block), on device."""
        rows = rows.to(bank_ids.device)
        if bank_ids.shape[0] == 0 or len(self) == 0:
            return torch.full_like(rows, -1)
        edit = bank_ids[rows.clamp_min(0)]
        match = edit[:, None] == self.ids.to(edit.device)[None, :]
        found = (rows >= 0) & match.any(dim=1)
        return torch.where(found, match.int().argmax(dim=1), torch.full_like(rows, -1))

    def still_needed(self, index: torch.Tensor, decoded) -> torch.Tensor:
        """``index`` with ``-1`` for the sequences whose block is no longer needed after ``decoded``
        decode steps (an int, or per sequence ``[B]``; a negative count, a prompt, keeps every block): the prompt
        pass predicts the target's first token and decode step ``j`` its ``j + 1``-th, so a block of
        an ``n``-token target is read for the prompt and ``n - 1`` steps."""
        if len(self) == 0:
            return index
        lens = self.lens.to(index.device)[index.clamp_min(0)]
        if isinstance(decoded, torch.Tensor):
            decoded = decoded.to(index.device)
        return torch.where(lens - 1 > decoded, index, torch.full_like(index, -1))


@torch.library.custom_op("memoir::private_residual", mutates_args=())
def private_residual(y: torch.Tensor, a: torch.Tensor, u: torch.Tensor, v: torch.Tensor, cols: torch.Tensor,
                     index: torch.Tensor) -> torch.Tensor:
    """``y + U_i (V_i a[cols_i])`` for each sequence's block ``i = index[b]`` (``y`` where ``-1``).

    ``a`` is ``[B, S, D]`` or OPT-style ``[B*S, D]`` (sequence-major); one opaque op, so a graph
    compiled on routed rows serves unrouted ones."""
    if u.shape[0] == 0:
        return y.clone()
    b = index.shape[0]
    a3 = a if a.dim() == 3 else a.reshape(b, -1, a.shape[-1])
    y3 = y if y.dim() == 3 else y.reshape(b, -1, y.shape[-1])
    i = index.to(a.device).clamp_min(0)
    x = a3.gather(2, cols[i][:, None, :].expand(-1, a3.shape[1], -1))  # [B, S, k]
    h = torch.einsum("bsk,brk->bsr", x, v[i].to(a.dtype))
    res = torch.einsum("bsr,bor->bso", h, u[i].to(a.dtype))
    out = torch.where((index.to(a.device) >= 0)[:, None, None], y3 + res.to(y.dtype), y3)
    return out.reshape(y.shape)


@private_residual.register_fake
def _(y, a, u, v, cols, index):
    return torch.empty_like(y)
