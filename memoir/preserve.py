"""Neighbour preservation: a new edit's update leaves the most exposed earlier edits' outputs unchanged.

Edit ``j`` reads the memory as ``Wm (M_j * a)``.  A new edit ``e`` changes only the columns ``S_e``
of its mask, so at a key ``a`` of edit ``j`` the change is ``dWm[:, S_e] (M_j * a)[S_e]``.  If every
gradient step on ``Wm[:, S_e]`` is projected onto the orthogonal complement of those vectors, the
change there is exactly zero: edit ``j``'s answer is kept, to machine precision, whatever ``e``
writes.  The keys of an edit are the edited layer's inputs at the positions whose logits produce
its target tokens (the bare prompt row), stored already multiplied by the edit's own mask.

Projecting against every earlier edit would use up the ``k`` free dimensions after a few dozen
edits, so only the ``m`` edits whose keys align most with the new edit's key inside ``S_e`` (the
ones its update would move most, e.g. other facts about the same subject) are protected.
"""
from __future__ import annotations

import torch


class KeyStore:
    """Keys of stored edits (``[P_j, D]`` each, zero outside the edit's mask), by edit id."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, edit_id: int, keys: torch.Tensor) -> None:
        self.keys[edit_id] = keys.detach().float().clone()

    def pop(self, edit_id: int) -> None:
        self.keys.pop(edit_id, None)

    def neighbours(self, key: torch.Tensor, cols: torch.Tensor, m: int, candidates=None) -> list[int]:
        """The ``m`` edit ids whose mean key is most aligned with ``key`` inside columns ``cols``.

        ``candidates`` (an iterable of edit ids) restricts the choice, e.g. to the edits whose masks
        overlap the new one enough to conflict with it; ``None`` = every stored edit.

        Score: ``|<key[S], mean_j[S]>| / (|key[S]| |mean_j|)``, the relative change of edit ``j``'s
        memory input that a step along ``key`` causes; edits with no shared column score 0 and are
        never picked.
        """
        ids = list(self.keys) if candidates is None else [i for i in candidates if i in self.keys]
        if m <= 0 or not ids:
            return []
        means = torch.stack([self.keys[i].mean(0) for i in ids]).to(key.device)  # [N, D]
        q = key.float()[cols]
        dots = means[:, cols] @ q
        scores = dots.abs() / (means.norm(dim=1) * q.norm() + 1e-12)
        order = torch.argsort(scores, descending=True, stable=True)[:m].tolist()
        return [ids[i] for i in order if float(scores[i]) > 0]

    def basis(self, edit_ids: list[int], cols: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor | None:
        """Orthonormal basis ``[len(cols), r]`` of the neighbours' keys restricted to ``cols``."""
        if not edit_ids:
            return None
        u = torch.cat([self.keys[i] for i in edit_ids])[:, cols.to(next(iter(self.keys.values())).device)]
        if u.abs().max() == 0:
            return None
        _, s, vh = torch.linalg.svd(u.double(), full_matrices=False)
        keep = s > rtol * s[0]
        return vh[keep].T.float().contiguous()

    def within_rank(self, edit_ids: list[int], cols: torch.Tensor, max_rank: int):
        """The longest prefix of ``edit_ids`` whose keys span at most ``max_rank`` dimensions, and its basis.

        Each protected direction is one the new edit cannot write along; long targets (dozens of
        keys per edit) would otherwise fill nearly all ``k`` columns and leave the new edit no room.
        Whole edits are dropped from the end (the least aligned first), so every edit that is kept
        is still preserved exactly.
        """
        for m in range(len(edit_ids), 0, -1):
            basis = self.basis(edit_ids[:m], cols)
            if basis is None or basis.shape[1] <= max_rank:
                return edit_ids[:m], basis
        return [], None

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, torch.Tensor]:
        ids = list(self.keys)
        if not ids:
            return {}
        return {
            "key_edit_ids": torch.tensor(ids, dtype=torch.int64),
            "key_counts": torch.tensor([self.keys[i].shape[0] for i in ids], dtype=torch.int64),
            "keys": torch.cat([self.keys[i] for i in ids]).contiguous().cpu(),
        }

    def load(self, state: dict[str, torch.Tensor], device=None) -> None:
        self.keys = {}
        if "keys" not in state:
            return
        chunks = torch.split(state["keys"].to(device) if device is not None else state["keys"],
                             state["key_counts"].tolist())
        self.keys = {int(i): k for i, k in zip(state["key_edit_ids"].tolist(), chunks)}


def project_out(grad_block: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``G - (G Q) Q^T``: the part of the rows of ``G`` orthogonal to the columns of ``Q``."""
    return grad_block - (grad_block @ basis) @ basis.T
