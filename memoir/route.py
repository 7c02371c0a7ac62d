"""Routing as data: which stored edit each sequence of a batch reads, and per-call layer state.

A :class:`Route` is decided once from each sequence's prompt (the prefill pass) and reused at
every decode step.  The memory layer takes it as an explicit input (``layer(a, route=...)``), as
peft takes ``adapter_names``; an inference stack passes its own per request.  The HF ``generate``
convenience path keeps the route, and the other per-call switches (a pending prefill, the mask an
edit trains, the memory switched off for one call), in a :class:`CallLocal`: a value per owner
held in a :mod:`contextvars` variable, so each thread and each asyncio task sees only its own
call and two concurrent ``generate`` calls cannot disturb each other.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from types import MappingProxyType

import torch

_EMPTY = MappingProxyType({})
# owner key -> that owner's values in this context.  Never mutated in place: a write sets a new
# mapping, so a context copied into a new asyncio task shares nothing writable with its parent.
_CALL_VALUES: contextvars.ContextVar = contextvars.ContextVar("memoir_call_values", default=_EMPTY)


class CallLocal:
    """Named values of one owner (e.g. one memory layer), private to the current thread / task.

    ``get`` reads, ``set`` writes for the rest of the current context (a plain ``model(...)``
    call in this thread), ``scope`` writes for a ``with`` block and restores on exit.
    """

    def __init__(self, **defaults):
        self._key = object()
        self._defaults = dict(defaults)

    def _values(self) -> dict:
        return _CALL_VALUES.get().get(self._key, self._defaults)

    def get(self, name: str):
        return self._values()[name]

    def set(self, **values) -> None:
        self._check(values)
        current = _CALL_VALUES.get()
        _CALL_VALUES.set(MappingProxyType({**current, self._key: {**self._values(), **values}}))

    @contextlib.contextmanager
    def scope(self, **values):
        """Fresh values (defaults + ``values``) for the block; the previous ones come back after."""
        self._check(values)
        current = _CALL_VALUES.get()
        token = _CALL_VALUES.set(MappingProxyType({**current, self._key: {**self._defaults, **values}}))
        try:
            yield self
        finally:
            _CALL_VALUES.reset(token)

    @contextlib.contextmanager
    def overriding(self, **values):
        """The current values with ``values`` changed for the block (the rest carries over)."""
        self._check(values)
        current = _CALL_VALUES.get()
        token = _CALL_VALUES.set(MappingProxyType({**current, self._key: {**self._values(), **values}}))
        try:
            yield self
        finally:
            _CALL_VALUES.reset(token)

    def _check(self, values: dict) -> None:
        unknown = set(values) - set(self._defaults)
        if unknown:
            raise KeyError(f"unknown call values {sorted(unknown)}; known: {sorted(self._defaults)}")

    def __deepcopy__(self, memo):  # a copied module gets its own, empty per-call state
        return CallLocal(**self._defaults)


@dataclass
class Route:
    """Per sequence: the bank row of the edit it reads (``-1``: none, the unedited model) and the
    overlap score that decided it.  ``rows`` and ``scores`` are ``[B]`` device tensors."""

    rows: torch.Tensor
    scores: torch.Tensor

    def __post_init__(self):
        if self.rows.dim() != 1 or self.rows.dtype != torch.int64:
            raise ValueError(f"Route.rows must be int64 [B], got {self.rows.dtype} {tuple(self.rows.shape)}")
        if self.scores.shape != self.rows.shape:
            raise ValueError(f"Route.scores {tuple(self.scores.shape)} != rows {tuple(self.rows.shape)}")

    def __len__(self) -> int:
        return self.rows.shape[0]

    @classmethod
    def unrouted(cls, batch: int, device=None) -> "Route":
        """No sequence reads the memory."""
        return cls(torch.full((batch,), -1, dtype=torch.int64, device=device),
                   torch.zeros(batch, dtype=torch.float32, device=device))

    @classmethod
    def to_row(cls, row: int, batch: int, device=None) -> "Route":
        """Every sequence reads bank row ``row`` (e.g. the edit being trained)."""
        return cls(torch.full((batch,), int(row), dtype=torch.int64, device=device),
                   torch.ones(batch, dtype=torch.float32, device=device))

    def to(self, device) -> "Route":
        return Route(self.rows.to(device), self.scores.to(device))
