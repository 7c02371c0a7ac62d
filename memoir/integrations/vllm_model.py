"""vLLM model classes that serve a saved memoir memory (imported by vLLM, through the plugin).

``MemoirLlamaForCausalLM`` is vLLM's ``LlamaForCausalLM`` with the memory beside the edited FFN
output projection: that projection's output goes through ``torch.ops.memoir.vllm_residual``, an
opaque registered op that reads the step's request layout from vLLM's forward context and routes
each request with a :class:`~memoir.integrations.step_router.StepRouter`.  Being opaque, the op
keeps its host-side routing under vLLM's ``torch.compile``: nothing about a route is baked into
the compiled graph.

The memory comes from the folder named by the model config's ``memoir_edits`` field (set with
``hf_overrides``; :func:`memoir.integrations.vllm.engine_args` builds them).  Routing runs the
saved editor on a HuggingFace copy of the model's first layers (the subject router's partial
pass), loaded from the same checkpoint.
"""
from __future__ import annotations

import pathlib
import re
import time

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.linear import RowParallelLinear
from vllm.model_executor.models.llama import LlamaForCausalLM

from memoir.integrations.step_router import StepRouter
from memoir.integrations.vllm import check_engine_settings

_ROUTERS: dict[int, "_ServedMemory"] = {}


@torch.library.custom_op("memoir::vllm_residual", mutates_args=())
def vllm_residual(y: torch.Tensor, a: torch.Tensor, handle: int) -> torch.Tensor:
    """``y`` plus the memory read of each token of the current vLLM step (see the module doc)."""
    return _ROUTERS[handle].residual(y, a)


@vllm_residual.register_fake
def _(y, a, handle):
    return torch.empty_like(y)


class _MemoirRowParallelLinear(RowParallelLinear):
    """The edited projection: vLLM's own linear (weights, loading, repacking unchanged) + the memory."""

    memoir_handle: int

    def forward(self, x):
        y, bias = super().forward(x)
        return torch.ops.memoir.vllm_residual(y, x, self.memoir_handle), bias


class _ServedMemory:
    """One served memory: the saved editor on a truncated HF copy, and the step's token ids."""

    def __init__(self, edits: pathlib.Path, model_path: str, dtype: torch.dtype):
        from memoir import MemoirEditor, load_model

        model, tokenizer = load_model(model_path, dtype=dtype)
        self.editor = MemoirEditor.load(model, tokenizer, edits)
        self._keep_first_layers()
        self.router = StepRouter(self.editor)
        self.input_ids: torch.Tensor | None = None
        self.op_seconds = 0.0  # host time spent in the op (routing + the memory read): the plugin's cost

    def _keep_first_layers(self) -> None:
        """Drop the HF layers the router never runs (it reads states at ``subject_layer`` only)."""
        editor = self.editor
        keep = editor.config.subject_layer if editor.layer.subject is not None else 0
        layers = editor.target.layers
        for i in range(keep, len(layers)):
            layers[i] = torch.nn.Identity()  # frees the weights: the router's pass stops before them

    def residual(self, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self._residual(y, a)
        finally:
            self.op_seconds += time.perf_counter() - start

    def _residual(self, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if not is_forward_context_available() or self.input_ids is None:
            return y.clone()
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):
            metadata = metadata[0] if metadata else None
        if isinstance(metadata, dict):
            metadata = next(iter(metadata.values()), None)
        if metadata is None:  # a profiling / warm-up run: no requests
            return y.clone()
        starts = metadata.query_start_loc
        n_req = starts.numel() - 1
        seq_lens = metadata.seq_lens[:n_req]
        counts = starts[1:] - starts[:-1]
        context = seq_lens - counts
        keys = metadata.block_table[:n_req, 0]
        return self.router.residual(y, a, self.input_ids.to("cpu"), starts, context, keys)


def _edits_folder(config) -> pathlib.Path:
    edits = getattr(config, "memoir_edits", None)
    if not edits:
        raise ValueError("memoir: the model config has no 'memoir_edits' (the saved edits folder); start vLLM with "
                         "hf_overrides={'architectures': [...], 'memoir_edits': DIR} "
                         "(memoir.integrations.vllm.engine_args builds them)")
    return pathlib.Path(edits)


class MemoirLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama (SmolLM2, Llama 2/3, and other ``LlamaForCausalLM`` checkpoints) + a memoir memory."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        check_engine_settings(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        model_config = vllm_config.model_config
        self._memoir = _ServedMemory(_edits_folder(model_config.hf_config), model_config.model, model_config.dtype)
        handle = id(self._memoir)
        _ROUTERS[handle] = self._memoir
        down = self._target()
        down.__class__ = _MemoirRowParallelLinear
        down.memoir_handle = handle

    def _target(self) -> RowParallelLinear:
        name = self._memoir.editor.target.qualified_name
        match = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.down_proj", name)
        if match is None:
            raise ValueError(f"memoir: these edits target {name}; this model serves model.layers.N.mlp.down_proj")
        return self.model.layers[int(match.group(1))].mlp.down_proj

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        # Outside the compiled region: the step's token ids, read by the op in the edited layer.
        self._memoir.input_ids = input_ids
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        # Before vLLM repacks the weights (process_weights_after_loading empties them on CPU): the
        # edits must have been made on exactly these weights.
        from memoir.persist import weight_fingerprint

        served = weight_fingerprint(self._target().weight.detach())
        made = weight_fingerprint(self._memoir.editor.layer.base.weight.detach())
        if served != made:
            raise ValueError("memoir: the served checkpoint's edited projection differs from the one the edits were "
                             "made on (weight fingerprint); serve the model the edits were saved with, in the same dtype")
        return loaded
