"""Prompt-pass routing shared by the editors that wrap one layer (MEMOIR, GRACE baseline).

A forward pre-hook on the whole model marks every pass with an empty KV cache as a prompt
(prefill) pass and tells the wrapped layer which positions form each row's prompt: the
attention mask, or an explicit span set with :meth:`PromptRouting.prompt_span` (the prompt part
of a teacher-forced ``prompt + target`` batch).  Decode steps reuse the prefill's decision.
The hook keeps no state of its own: the span override and the layer's routing are per call
(``memoir.route.CallLocal``), so concurrent calls in other threads are not affected.
"""
from __future__ import annotations

import contextlib
import inspect

import torch

from memoir.route import CallLocal


class PromptRouting:
    """Mixin; the host sets ``self.model`` and ``self.layer`` (with ``begin_prefill(span)``)."""

    def _install_routing(self) -> None:
        self._span = CallLocal(override=None)
        self._takes_positions = "position_ids" in inspect.signature(self.model.forward).parameters
        self._hook = self.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True)

    def _remove_routing(self) -> None:
        self._hook.remove()

    def _on_model_forward(self, module, args, kwargs):
        """For a prompt pass without explicit ``position_ids``, positions come from the attention
        mask (as ``generate`` does), so a left-padded row sees the positions of the unpadded
        prompt; models with absolute position embeddings (GPT-2) need this."""
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = 0 if cache is None else cache.get_seq_length()
        if past != 0:
            return None
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            attention_mask = args[1]
        if attention_mask is not None and attention_mask.dim() != 2:
            attention_mask = None
        span = self._span.get("override")
        if span is None and attention_mask is not None:
            span = attention_mask.bool()
        self.layer.begin_prefill(span)
        self._on_prefill(args, kwargs, attention_mask)
        if attention_mask is not None and self._takes_positions and kwargs.get("position_ids") is None \
                and len(args) <= 2:
            return args, dict(kwargs, position_ids=(attention_mask.long().cumsum(-1) - 1).clamp_min(0))
        return None

    def _on_prefill(self, args, kwargs, attention_mask) -> None:
        """Called on every prompt pass, after the layer was told to route (hosts may add evidence)."""

    @contextlib.contextmanager
    def prompt_span(self, span: torch.Tensor):
        """Route from these positions ([B, S] bool) instead of the attention mask."""
        with self._span.overriding(override=span.bool()):
            yield

    @contextlib.contextmanager
    def disabled(self):
        """The unedited model inside the block (the wrapped layer passes through)."""
        with self.layer.disabled():
            yield
