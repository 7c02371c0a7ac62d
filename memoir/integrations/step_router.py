"""Routing for inference stacks that batch requests as one flat token sequence (vLLM's layout).

A serving engine runs many requests in one forward: their tokens are concatenated (``[T, D]``),
some requests in their first step (the whole prompt), others decoding one token.  Each request
must read the memory exactly as :meth:`MemoirEditor.generate` would read it for that prompt alone:
routed once, from its own prompt tokens, at its first step (the same subject check and TopHash
overlap as ``generate``'s prompt pass), and that decision kept for every decode step, with the
decode-step rules of private blocks (``stop_after_target``, ``block_gain``) counted per request.

:class:`StepRouter` holds that per-request state between steps.  The engine tells it, per step,
where each request's tokens are (``starts``, the offsets of the requests' tokens; ``context``, how
many of each request's tokens were processed in earlier steps) and a key that names the request
while it lives (vLLM: its first KV-cache block).  A request whose first step it never saw (its
prompt split over steps by chunked prefill, or partly served from a prefix cache) is refused with
an error instead of being routed from part of its prompt.
"""
from __future__ import annotations

import torch

from memoir.route import Route


class StepRouter:
    """Routes the requests of flat multi-request steps for ``editor`` (read-only: no edits while serving)."""

    def __init__(self, editor):
        self.editor = editor
        self.layer = editor.layer
        self._live: dict[int, tuple[int, int]] = {}  # request key -> (bank row, prompt length)
        self.mixed_steps = 0  # steps that held both a request's first step and another's decode step

    def __len__(self) -> int:
        return len(self._live)

    def route_prompts(self, ids: list[torch.Tensor], acts: list[torch.Tensor]) -> list[int]:
        """The bank row (-1: none) ``generate`` would route each prompt of token ids ``[S]`` with layer
        inputs ``[S, D]`` to: the same eligibility (subject router, one partial pass for all) and
        TopHash overlap rule."""
        texts = self.editor.tokenizer.batch_decode([i.tolist() for i in ids], skip_special_tokens=True)
        eligible = self.editor.eligibility(texts)
        rows = []
        for j, a in enumerate(acts):
            route: Route = self.layer.route(a[None], None, None if eligible is None else eligible[j:j + 1])
            rows.append(int(route.rows[0]))
        return rows

    @torch.no_grad()
    def residual(self, y: torch.Tensor, a: torch.Tensor, input_ids: torch.Tensor, starts: torch.Tensor,
                 context: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``y`` (the edited projection's output ``[T, O]``) plus each token's memory read.

        ``a`` ``[T, D]``: the projection's input; ``input_ids`` ``[T]``; per request ``r`` of the step,
        its tokens are ``starts[r]:starts[r + 1]`` (``starts`` ``[R + 1]``), ``context[r]`` tokens of it
        were processed before this step (0: its first step, the whole prompt) and ``keys[r]`` names it.
        Tokens after ``starts[R]`` (padding) read nothing.
        """
        if len(self.layer.bank) == 0 or not self.layer.enabled:
            return y.clone()
        starts, context, keys = (t.to("cpu", torch.int64) for t in (starts, context, keys))
        n_req = starts.numel() - 1
        # Python ints once: per-element tensor reads cost ~1 us each, every decode step.
        ctx, key_list, start_list = context.tolist()[:n_req], keys.tolist()[:n_req], starts.tolist()
        first = [r for r in range(n_req) if ctx[r] == 0]
        unknown = [r for r in range(n_req) if ctx[r] > 0 and key_list[r] not in self._live]
        if unknown:
            raise RuntimeError(
                "memoir: a request continues a prompt whose first step was not seen here; its route "
                "would come from part of its prompt.  Serve with prefix caching and chunked prefill "
                "off (vLLM: enable_prefix_caching=False, enable_chunked_prefill=False).")
        if first:
            spans = [(start_list[r], start_list[r + 1]) for r in first]
            routed = self.route_prompts([input_ids[lo:hi] for lo, hi in spans], [a[lo:hi] for lo, hi in spans])
            for r, (lo, hi), row in zip(first, spans, routed):
                self._live[key_list[r]] = (row, hi - lo)
        rows = [self._live[k][0] for k in key_list]
        prompt_lens = [self._live[k][1] for k in key_list]
        if first and len(first) < n_req:
            self.mixed_steps += 1
        t_real = start_list[-1]
        counts = starts[1:] - starts[:-1]
        req = torch.repeat_interleave(torch.arange(n_req), counts)
        pos = context[req] + torch.arange(t_real) - starts[:-1][req]
        tok_rows = torch.full((a.shape[0],), -1, dtype=torch.int64)
        decoded = torch.full((a.shape[0],), -1, dtype=torch.int64)
        if n_req:
            tok_rows[:t_real] = torch.tensor(rows, dtype=torch.int64)[req]
            # decode step j of a request (j = 0 for the first generated token fed back) reads as
            # generate's j-th decode step; prompt tokens (pos < prompt length) read as its prompt pass.
            decoded[:t_real] = pos - torch.tensor(prompt_lens, dtype=torch.int64)[req]
        # One token per "sequence" of the layer's read: its own route and decode step.
        return self.layer.read(y[:, None], a[:, None], tok_rows.to(a.device), decoded.to(a.device))[:, 0]
