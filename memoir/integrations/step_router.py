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

    def route_prompt(self, ids: torch.Tensor, acts: torch.Tensor) -> int:
        """The bank row (-1: none) ``generate`` would route a prompt of token ids ``[S]`` with layer
        inputs ``[S, D]`` to: the same eligibility (subject router) and TopHash overlap rule."""
        text = self.editor.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        eligible = self.editor.eligibility([text])
        route: Route = self.layer.route(acts[None], None, eligible)
        return int(route.rows[0])

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
        rows, prompt_lens = [], []
        for r in range(n_req):
            lo, hi, key = int(starts[r]), int(starts[r + 1]), int(keys[r])
            if int(context[r]) == 0:
                self._live[key] = (self.route_prompt(input_ids[lo:hi], a[lo:hi]), hi - lo)
            elif key not in self._live:
                raise RuntimeError(
                    "memoir: a request continues a prompt whose first step was not seen here; its route "
                    "would come from part of its prompt.  Serve with prefix caching and chunked prefill "
                    "off (vLLM: enable_prefix_caching=False, enable_chunked_prefill=False).")
            row, plen = self._live[key]
            rows.append(row)
            prompt_lens.append(plen)
        if n_req and bool((context == 0).any()) and bool((context > 0).any()):
            self.mixed_steps += 1
        t_real = int(starts[-1])
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
        return self.read(y, a, tok_rows.to(a.device), decoded.to(a.device))

    def read(self, y: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        """``y`` plus the memory read of each token ``[T]``: bank row ``rows`` (-1: none); ``decoded``
        the token's decode step (-1: a prompt token), the per-token form of ``MemoirLayer.routed``."""
        layer = self.layer
        if layer.private is None:
            return torch.ops.memoir.routed_residual(y[:, None], a[:, None], layer.memory, layer.bank.words, rows,
                                                    layer.top_k)[:, 0]
        p = layer.private
        index = p.index_for(layer.bank.ids, rows)
        in_decode = decoded >= 0
        if layer.stop_after_target and len(p):
            lens = p.lens.to(index.device)[index.clamp_min(0)]
            index = torch.where(in_decode & (lens - 1 <= decoded), torch.full_like(index, -1), index)
        out = torch.ops.memoir.private_residual(y[:, None], a[:, None], p.u, p.v, p.cols, index)[:, 0]
        if layer.block_gain != 1.0:
            out = torch.where(in_decode[:, None], y + (out - y) / layer.block_gain, out)
        return out
