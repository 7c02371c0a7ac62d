"""Shortcuts for optimisation loops whose trainable tensors all sit at or above one layer.

Layers below the edited one are frozen and see the same input every iteration, so their output
is computed once and replayed; only the logits the loss reads are computed.  MEMOIR's editor and
the FT-L / GRACE baselines share these, so their timings compare like with like.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

from torch import nn


class _Replay(nn.Module):
    """Stands in for a frozen decoder layer below the edit: returns a cached output.

    Unknown attributes (e.g. ``attention_type`` read by the model's layer loop) come from
    the original layer, which is not registered as a child.
    """

    def __init__(self, original: nn.Module, output):
        super().__init__()
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_output", output)

    def forward(self, *args, **kwargs):
        return self._output

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


@contextlib.contextmanager
def capture_below(target, enabled: bool = True):
    """Yield a list that receives the output of the layer just below ``target`` on the next pass.

    Stays empty when disabled or when the target is the first layer (nothing to replay).
    """
    seen: list = []
    if not enabled or target.layer_index == 0:
        yield seen
        return
    hook = target.layers[target.layer_index - 1].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        yield seen
    finally:
        hook.remove()


@contextlib.contextmanager
def replaying_below(target, output):
    """Replace the frozen layers below ``target`` by stand-ins returning ``output`` (None: no-op)."""
    if output is None:
        yield
        return
    layers = target.layers
    originals = [layers[i] for i in range(target.layer_index)]
    try:
        for i, layer in enumerate(originals):
            layers[i] = _Replay(layer, output)
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


@functools.lru_cache(maxsize=None)
def _takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def keep_logits(model: nn.Module, n: int) -> dict:
    """``logits_to_keep=n`` for models whose forward takes it (transformers >= 4.50), else nothing."""
    return {"logits_to_keep": n} if _takes_logits_to_keep(type(model)) else {}


@contextlib.contextmanager
def contiguous_head(model: nn.Module):
    """Hand the output head a contiguous input.

    ``logits_to_keep`` gives the head a strided slice, which matmul runs as a slow batched GEMM
    on CPU (measured: most of an edit's time); a contiguous copy avoids it.
    """
    head = model.get_output_embeddings()
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda m, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()
