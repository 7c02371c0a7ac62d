"""MaskBank: the stored edit masks, bit-packed into int64 words, as module state.

``words`` ``[N, W]`` and ``edit_ids`` ``[N]`` are registered buffers of the memory layer: they
move with ``model.to(device)``, appear in ``model.state_dict()`` and are replaced (not resized in
place) when an edit is added, so a route or snapshot holding the old tensors stays valid.
"""
from __future__ import annotations

import torch

from memoir import ops
from memoir.state import GrowingBuffers


class MaskBank(GrowingBuffers):
    """Packed masks ``[N, W]`` plus the edit id of each row."""

    def __init__(self, num_bits: int, device=None):
        super().__init__()
        self.num_bits = int(num_bits)
        self.num_words = ops.num_words(self.num_bits)
        self.register_buffer("words", torch.zeros((0, self.num_words), dtype=torch.int64, device=device))
        self.register_buffer("ids", torch.zeros((0,), dtype=torch.int64, device=device))

    def __len__(self) -> int:
        return self.words.shape[0]

    def extra_repr(self) -> str:
        return f"edits={len(self)}, num_bits={self.num_bits}"

    @property
    def device(self):
        return self.words.device

    @property
    def edit_ids(self) -> list[int]:
        """The edit id of each row (a host copy)."""
        return self.ids.tolist()

    def index_of(self, packed: torch.Tensor) -> int | None:
        """Row holding exactly this packed mask, or None."""
        if len(self) == 0:
            return None
        same = (self.words == packed.to(self.device)).all(dim=1).nonzero()
        return int(same[0, 0]) if len(same) else None

    def add(self, packed: torch.Tensor, edit_id: int) -> int:
        """Append one packed mask ``[W]``; returns its row."""
        packed = packed.reshape(-1)
        if packed.numel() != self.num_words or packed.dtype != torch.int64:
            raise ValueError(f"expected {self.num_words} int64 words, got {packed.numel()} of {packed.dtype}")
        self.words = torch.cat([self.words, packed.to(self.device)[None]])
        self.ids = torch.cat([self.ids, torch.tensor([int(edit_id)], dtype=torch.int64, device=self.device)])
        return len(self) - 1

    def set_owner(self, row: int, edit_id: int) -> None:
        """Row ``row`` now belongs to edit ``edit_id`` (the same mask edited again)."""
        ids = self.ids.clone()
        ids[row] = int(edit_id)
        self.ids = ids

    def remove_row(self, row: int) -> None:
        keep = torch.ones(len(self), dtype=torch.bool, device=self.device)
        keep[row] = False
        self.words, self.ids = self.words[keep].clone(), self.ids[keep].clone()

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current tensors (never modified in place, so holding them is a snapshot)."""
        return self.words, self.ids

    def restore(self, snapshot: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.words, self.ids = snapshot

    def load(self, words: torch.Tensor, edit_ids) -> None:
        edit_ids = torch.as_tensor(list(edit_ids) if not isinstance(edit_ids, torch.Tensor) else edit_ids,
                                   dtype=torch.int64)
        if words.dim() != 2 or words.shape[1] != self.num_words or words.shape[0] != edit_ids.numel():
            raise ValueError(
                f"bank of shape {tuple(words.shape)} does not fit {edit_ids.numel()} edits of {self.num_words} words"
            )
        self.words = words.to(self.device, torch.int64).clone()
        self.ids = edit_ids.reshape(-1).to(self.device).clone()

    def best_match(self, queries: torch.Tensor, threshold: float):
        """``(scores [B], rows [B])`` with rows -1 below the threshold (no host sync)."""
        return ops.best_match(queries, self.words, threshold)

    def rows_to_dense(self, rows: torch.Tensor) -> torch.Tensor:
        """Dense float masks ``[B, D]`` for bank rows (row -1 -> all zeros), on device."""
        if len(self) == 0:
            return torch.zeros((rows.shape[0], self.num_bits), device=self.device)
        words = self.words[rows.clamp_min(0)]
        dense = ops.unpack_bits(words, self.num_bits).to(torch.float32)
        return dense * (rows >= 0).unsqueeze(1)
