"""MaskBank: the stored edit masks, bit-packed into int64 words, on the memory's device."""
from __future__ import annotations

import torch

from memoir import ops


class MaskBank:
    """Packed masks ``[N, W]`` plus the edit id of each row.

    Rows live in a growing buffer (capacity doubles) so adding an edit is amortised O(W).
    """

    def __init__(self, num_bits: int, device=None):
        self.num_bits = int(num_bits)
        self.num_words = ops.num_words(self.num_bits)
        self._words = torch.zeros((0, self.num_words), dtype=torch.int64, device=device)
        self._count = 0
        self.edit_ids: list[int] = []

    def __len__(self) -> int:
        return self._count

    @property
    def device(self):
        return self._words.device

    @property
    def words(self) -> torch.Tensor:
        """The packed bank ``[N, W]`` (a view; do not modify)."""
        return self._words[: self._count]

    def to(self, device) -> "MaskBank":
        self._words = self._words.to(device)
        return self

    def index_of(self, packed: torch.Tensor) -> int | None:
        """Row holding exactly this packed mask, or None."""
        if self._count == 0:
            return None
        same = (self.words == packed.to(self.device)).all(dim=1).nonzero()
        return int(same[0, 0]) if len(same) else None

    def add(self, packed: torch.Tensor, edit_id: int) -> int:
        """Append one packed mask ``[W]``; returns its row."""
        packed = packed.reshape(-1)
        if packed.numel() != self.num_words or packed.dtype != torch.int64:
            raise ValueError(f"expected {self.num_words} int64 words, got {packed.numel()} of {packed.dtype}")
        if self._count == self._words.shape[0]:
            grown = torch.zeros((max(8, 2 * self._count), self.num_words), dtype=torch.int64, device=self.device)
            grown[: self._count] = self._words[: self._count]
            self._words = grown
        self._words[self._count] = packed.to(self.device)
        self._count += 1
        self.edit_ids.append(int(edit_id))
        return self._count - 1

    def remove_row(self, row: int) -> None:
        keep = torch.ones(self._count, dtype=torch.bool, device=self.device)
        keep[row] = False
        self._words = self.words[keep].clone()
        self._count -= 1
        del self.edit_ids[row]

    def load(self, words: torch.Tensor, edit_ids: list[int]) -> None:
        if words.dim() != 2 or words.shape[1] != self.num_words or words.shape[0] != len(edit_ids):
            raise ValueError(
                f"bank of shape {tuple(words.shape)} does not fit {len(edit_ids)} edits of {self.num_words} words"
            )
        self._words = words.to(self.device, torch.int64).clone()
        self._count = words.shape[0]
        self.edit_ids = [int(e) for e in edit_ids]

    def best_match(self, queries: torch.Tensor, threshold: float):
        """``(scores [B], rows [B])`` with rows -1 below the threshold (no host sync)."""
        return ops.best_match(queries, self.words, threshold)

    def rows_to_dense(self, rows: torch.Tensor) -> torch.Tensor:
        """Dense float masks ``[B, D]`` for bank rows (row -1 -> all zeros), on device."""
        if self._count == 0:
            return torch.zeros((rows.shape[0], self.num_bits), device=self.device)
        words = self.words[rows.clamp_min(0)]
        dense = ops.unpack_bits(words, self.num_bits).to(torch.float32)
        return dense * (rows >= 0).unsqueeze(1)
