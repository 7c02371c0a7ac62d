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

from memoir.state import GrowingBuffers


class KeyStore(GrowingBuffers):
    """Keys of stored edits by edit id, kept sparse: only the columns of the edit's own mask.

    A key is the edited layer's input times the edit's mask, so it is zero outside the mask's
    ``k`` columns; storing ``(columns, values)`` instead of ``[P_j, D]`` rows is ``D / k`` times
    smaller (6.7x for SmolLM2: ~110 MB -> ~17 MB for 600 hallucination edits).
    """

    def __init__(self, dim: int | None = None):
        super().__init__()
        # Per stored edit two buffers, ``cols_<id>`` (columns [c] int64) and ``values_<id>``
        # ([P, c] float32), in insertion order; ``key_dim`` is D (-1 until known).
        self.register_buffer("key_dim", torch.tensor([-1 if dim is None else int(dim)], dtype=torch.int64))

    @property
    def dim(self) -> int | None:
        """D, the width of a dense key (None until the first key is stored)."""
        d = int(self.key_dim[0])
        return None if d < 0 else d

    def _entry(self, edit_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._buffers[f"cols_{edit_id}"], self._buffers[f"values_{edit_id}"]

    def _entries_items(self):
        return ((i, self._entry(i)) for i in self.ids())

    def __len__(self) -> int:
        return len(self.ids())

    def __contains__(self, edit_id: int) -> bool:
        return f"cols_{edit_id}" in self._buffers

    def ids(self) -> list[int]:
        return [int(name[5:]) for name in self._buffers if name.startswith("cols_")]

    def _optional_buffer(self, name: str) -> bool:
        return name.startswith(("cols_", "values_"))

    def add(self, edit_id: int, keys: torch.Tensor) -> None:
        """Store ``keys`` ``[P, D]`` (dense, zero outside the edit's mask) for ``edit_id``."""
        if keys.dim() != 2:
            raise ValueError(f"keys must be [positions, features], got shape {tuple(keys.shape)}")
        if self.dim is not None and keys.shape[1] != self.dim:
            raise ValueError(f"keys have {keys.shape[1]} features, the store holds {self.dim}")
        keys = keys.detach().float()
        cols = keys.abs().sum(0).nonzero().flatten()
        self.key_dim = torch.tensor([keys.shape[1]], dtype=torch.int64, device=self.key_dim.device)
        self.register_buffer(f"cols_{int(edit_id)}", cols.to(self.key_dim.device))
        self.register_buffer(f"values_{int(edit_id)}", keys[:, cols].clone().to(self.key_dim.device))

    def dense(self, edit_id: int) -> torch.Tensor:
        """The keys of ``edit_id`` as ``[P, D]`` rows (zero outside the edit's mask)."""
        cols, values = self._entry(edit_id)
        out = values.new_zeros(values.shape[0], self.dim)
        out[:, cols] = values
        return out

    def _column_map(self, cols: torch.Tensor) -> torch.Tensor:
        """``[D]``: the position of each feature in ``cols``, -1 for features outside it."""
        device = self.key_dim.device
        where = torch.full((self.dim,), -1, dtype=torch.long, device=device)
        where[cols.to(device)] = torch.arange(cols.numel(), device=device)
        return where

    def _restricted(self, edit_id: int, where: torch.Tensor, k: int) -> torch.Tensor:
        """The keys of ``edit_id`` restricted to the ``k`` columns mapped by ``where``: ``[P, k]``."""
        j_cols, values = self._entry(edit_id)
        at = where[j_cols]
        shared = at >= 0
        out = values.new_zeros(values.shape[0], k)
        out[:, at[shared]] = values[:, shared]
        return out

    def pop(self, edit_id: int) -> None:
        self._buffers.pop(f"cols_{edit_id}", None)
        self._buffers.pop(f"values_{edit_id}", None)

    def snapshot(self) -> dict:
        """The current buffers, for ``restore`` after a failed edit (entries are never modified)."""
        return dict(self._buffers)

    def restore(self, snapshot: dict) -> None:
        self._buffers.clear()
        self._buffers.update(snapshot)

    def neighbours(self, key: torch.Tensor, cols: torch.Tensor, m: int, candidates=None) -> list[int]:
        """The ``m`` edit ids whose mean key is most aligned with ``key`` inside columns ``cols``.

        ``key`` is dense (``[D]``).  ``candidates`` (an iterable of edit ids) restricts the choice,
        e.g. to the edits whose masks overlap the new one enough to conflict with it; ``None`` =
        every stored edit.

        Score: ``|<key[S], mean_j[S]>| / (|key[S]| |mean_j|)``, the relative change of edit ``j``'s
        memory input that a step along ``key`` causes; edits with no shared column score 0 and are
        never picked.
        """
        ids = self.ids() if candidates is None else [i for i in candidates if i in self]
        if m <= 0 or not ids:
            return []
        where = self._column_map(cols)
        q = key.float()[cols].to(where.device)
        dots = torch.stack([self._restricted(i, where, q.numel()).mean(0) @ q for i in ids])
        norms = torch.stack([self._entry(i)[1].mean(0).norm() for i in ids])
        scores = dots.abs() / (norms * q.norm() + 1e-12)
        order = torch.argsort(scores, descending=True, stable=True)[:m].tolist()
        return [ids[i] for i in order if float(scores[i]) > 0]

    def basis(self, edit_ids: list[int], cols: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor | None:
        """Orthonormal basis ``[len(cols), r]`` of the neighbours' keys restricted to ``cols``."""
        if not edit_ids:
            return None
        where = self._column_map(cols)
        u = torch.cat([self._restricted(i, where, cols.numel()) for i in edit_ids])
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

    def principal_directions(self, cols: torch.Tensor, energy: float, max_rank: int,
                             exclude: torch.Tensor | None = None) -> torch.Tensor | None:
        """Directions inside ``cols`` that carry most of the stored edits' key energy there.

        Every stored edit contributes its keys restricted to ``cols``, scaled so that its whole key
        has unit energy: an edit weighs by the share of its memory input that a write to ``cols``
        would change.  Returns the top eigenvectors ``[len(cols), r]`` of their covariance, with the
        smallest ``r <= max_rank`` reaching ``energy`` of its trace, or None.  ``exclude`` (an
        orthonormal ``[len(cols), q]`` basis, e.g. the exactly preserved neighbours) is projected
        out first, so the result is orthogonal to it and extends it.
        """
        if max_rank <= 0 or len(self) == 0 or energy <= 0:
            return None
        k = cols.numel()
        where = self._column_map(cols)
        device = where.device
        rows = []
        for _, (j_cols, values) in self._entries_items():
            at = where[j_cols]
            shared = at >= 0
            total = values.double().pow(2).sum()
            if total > 0 and bool(shared.any()):  # an edit sharing no column adds nothing
                u = values.new_zeros(values.shape[0], k, dtype=torch.float64)
                u[:, at[shared]] = values[:, shared].double() / total.sqrt()
                rows.append(u)
        if not rows:
            return None
        stacked = torch.cat(rows)
        cov = stacked.T @ stacked  # one product instead of one per stored edit
        if exclude is not None:
            p = torch.eye(k, dtype=torch.float64, device=device) - exclude.double() @ exclude.double().T
            cov = p @ cov @ p
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        trace = evals.sum()
        if trace <= 0:
            return None
        reached = (evals.cumsum(0) / trace >= energy).nonzero()
        r = int(reached[0]) + 1 if reached.numel() else k
        r = min(r, max_rank, int((evals > 1e-12 * evals[0]).sum()))
        return evecs[:, :r].float().contiguous() if r > 0 else None

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, torch.Tensor]:
        ids = self.ids()
        if not ids:
            return {}
        cols = [self._entry(i)[0] for i in ids]
        values = [self._entry(i)[1] for i in ids]
        return {
            "key_edit_ids": torch.tensor(ids, dtype=torch.int64),
            "key_counts": torch.tensor([v.shape[0] for v in values], dtype=torch.int64),
            "key_col_counts": torch.tensor([c.numel() for c in cols], dtype=torch.int64),
            "key_dim": torch.tensor([self.dim], dtype=torch.int64),
            "key_cols": torch.cat(cols).to(torch.int32).contiguous().cpu(),
            "key_values": torch.cat([v.flatten() for v in values]).contiguous().cpu(),
        }

    def load(self, state: dict[str, torch.Tensor], device=None) -> None:
        """Restore from ``state()``."""
        for i in self.ids():
            self.pop(i)
        self.key_dim = torch.tensor([-1], dtype=torch.int64, device=self.key_dim.device if device is None else device)
        if "key_edit_ids" not in state:
            return
        ids = state["key_edit_ids"].tolist()
        counts = state["key_counts"].tolist()
        self.key_dim = torch.tensor([int(state["key_dim"][0])], dtype=torch.int64, device=self.key_dim.device)
        col_counts = state["key_col_counts"].tolist()
        all_cols = torch.split(state["key_cols"].long(), col_counts)
        all_values = torch.split(state["key_values"], [p * c for p, c in zip(counts, col_counts)])
        for i, p, c, cols, flat in zip(ids, counts, col_counts, all_cols, all_values):
            if device is not None:
                cols, flat = cols.to(device), flat.to(device)
            self.register_buffer(f"cols_{int(i)}", cols.to(self.key_dim.device))
            self.register_buffer(f"values_{int(i)}", flat.reshape(p, c).to(self.key_dim.device))


def project_out(grad_block: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``G - (G Q) Q^T``: the part of the rows of ``G`` orthogonal to the columns of ``Q``."""
    return grad_block - (grad_block @ basis) @ basis.T
