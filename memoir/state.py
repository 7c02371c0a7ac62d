"""Module state that must keep its precision: float32 buffers that ``model.to(dtype)`` leaves alone.

The mask bank, edit ids, preservation keys and background statistics are registered buffers, so
``model.to(device)`` carries them and ``model.state_dict()`` holds them.  A dtype cast
(``model.to(torch.bfloat16)``, ``model.half()``) would also round the float32 statistics and
keys, which decide the masks and the protected directions, and a cast back could not undo it:
modules of this kind keep those buffers in float32 and only follow the device.
"""
from __future__ import annotations

import torch
from torch import nn


class Float32Buffers(nn.Module):
    """A module whose float32 buffers stay float32 under dtype casts (devices still move)."""

    def _apply(self, fn, recurse=True):
        kept = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after is not None and after.dtype != torch.float32:
                self._buffers[name] = before.to(after.device)
        return self


class GrowingBuffers(Float32Buffers):
    """Buffers whose shapes change (they grow with the edits): ``load_state_dict`` takes the
    saved shapes instead of refusing a size mismatch, and registers entries it has not seen."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        device = next((b.device for b in self._buffers.values() if b is not None), None)
        for key, value in state_dict.items():
            name = key[len(prefix):]
            if key.startswith(prefix) and "." not in name:
                value = value.detach().clone()
                self._buffers[name] = value if device is None else value.to(device)
        for name in list(self._buffers):
            if prefix + name not in state_dict and self._optional_buffer(name):
                del self._buffers[name]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _optional_buffer(self, name: str) -> bool:
        """A buffer that may be absent from a state dict (e.g. one edit's keys)."""
        return False
