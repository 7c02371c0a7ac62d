"""Serve edited models with vLLM: the memoir plugin and the engine settings it needs.

vLLM loads :func:`register` from the ``vllm.general_plugins`` entry point in every process it
starts; it registers memoir-wrapped architectures (``MemoirLlamaForCausalLM``,
:mod:`memoir.integrations.vllm_model`).  A saved edits folder is served with::

    from vllm import LLM
    from memoir.integrations.vllm import engine_args
    llm = LLM(**engine_args("my_edits"))            # the model the edits were made on (smollm2)
    llm.generate(["The capital of Japan is"], SamplingParams(temperature=0, max_tokens=8))

or over HTTP with ``memoir serve --edits my_edits``.  Each request is routed from its own prompt
at its first step, exactly as :meth:`MemoirEditor.generate` routes it, and keeps that route while
it decodes.  Two vLLM defaults would route a request from part of its prompt, so they are refused
(:func:`check_engine_settings`): prefix caching (a prompt's cached prefix skips the step that
routes it) and chunked prefill (a long prompt split over steps).  This module imports vLLM only
inside its functions: the main memoir environment can build commands without it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

from memoir.persist import CONFIG_FILE, read_meta

# vLLM architecture served -> memoir's wrapper of it (in memoir.integrations.vllm_model)
ARCHITECTURES = {"LlamaForCausalLM": "MemoirLlamaForCausalLM"}
MODEL_TYPES = {"llama": "LlamaForCausalLM"}
DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_KV_CACHE_BYTES = 1 << 30  # a fixed KV cache instead of vLLM's share of all (CPU) memory


def register() -> None:
    """vLLM general-plugin entry point: register the memoir architectures (idempotent: vLLM calls it
    in every process, possibly more than once)."""
    from vllm import ModelRegistry

    known = ModelRegistry.get_supported_archs()
    for wrapper in ARCHITECTURES.values():
        if wrapper not in known:
            ModelRegistry.register_model(wrapper, f"memoir.integrations.vllm_model:{wrapper}")


def check_engine_settings(vllm_config) -> None:
    """Refuse, with the setting to change, every engine setting under which a request could be routed
    from part of its prompt or the memory would be read wrongly."""
    problems = []
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append("prefix caching is on (a prompt sharing a cached prefix would skip the step that routes "
                        "it): pass enable_prefix_caching=False / --no-enable-prefix-caching")
    if vllm_config.scheduler_config.enable_chunked_prefill:
        problems.append("chunked prefill is on (a long prompt would be routed from its first chunk): pass "
                        "enable_chunked_prefill=False / --no-enable-chunked-prefill, with max_num_batched_tokens "
                        ">= max_model_len")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        problems.append("tensor / pipeline parallelism is not supported: serve on one device")
    if vllm_config.device_config.device_type != "cpu" and not vllm_config.model_config.enforce_eager:
        problems.append("on GPUs, CUDA graphs would replay the routing of the step they captured: pass "
                        "enforce_eager=True / --enforce-eager")
    if problems:
        raise ValueError("memoir cannot serve under these vLLM settings:\n- " + "\n- ".join(problems))


def saved_target(edits) -> dict:
    """The ``target`` record of a saved edits folder (what model, layer and dtype they were made on)."""
    if not (pathlib.Path(edits) / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{edits} is not a saved memoir memory (no {CONFIG_FILE})")
    return read_meta(pathlib.Path(edits))["target"]  # format and checksum checked


def model_folder(model: str = "smollm2") -> pathlib.Path:
    """A HuggingFace folder vLLM can load: a model alias (``smollm2``, dense safetensors cached on its
    first :func:`memoir.load_model`) or a local folder as given."""
    from memoir.models import MODEL_ALIASES, cache_dir, load_model

    if model in MODEL_ALIASES:
        folder = cache_dir() / "smollm2-135m-instruct"
        if not (folder / "config.json").exists():
            load_model(model)  # writes the cache
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"could not cache {model} as a HuggingFace folder under {folder}")
        return folder
    folder = pathlib.Path(model).expanduser()
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"vLLM serves a HuggingFace model folder (with config.json); got {model!r}")
    return folder


def architecture_for(folder: pathlib.Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    base = MODEL_TYPES.get(config.get("model_type"))
    if base is None:
        raise ValueError(f"memoir's vLLM plugin serves {sorted(MODEL_TYPES)} models; {folder} is "
                         f"{config.get('model_type')!r}")
    return ARCHITECTURES[base]


def engine_args(edits, model: str = "smollm2", max_model_len: int = DEFAULT_MAX_MODEL_LEN,
                kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES, **overrides) -> dict:
    """Keyword arguments of ``vllm.LLM`` (or ``AsyncEngineArgs``) serving ``model`` with the edits in
    folder ``edits``: the memoir architecture, the dtype the edits were made in, and the settings
    :func:`check_engine_settings` asks for.  ``overrides`` are passed on (e.g. ``enforce_eager``)."""
    edits = pathlib.Path(edits).resolve()
    target = saved_target(edits)
    folder = model_folder(model)
    args = {
        "model": str(folder),
        "hf_overrides": {"architectures": [architecture_for(folder)], "memoir_edits": str(edits)},
        "dtype": target["dtype"],
        "enable_prefix_caching": False,
        "enable_chunked_prefill": False,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": max_model_len,
        "kv_cache_memory_bytes": kv_cache_bytes,
    }
    args.update(overrides)
    return args


def server_command(python: str, edits, model: str = "smollm2", host: str = "127.0.0.1", port: int = 8000,
                   max_model_len: int = DEFAULT_MAX_MODEL_LEN, kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
                   extra: list[str] | None = None) -> list[str]:
    """The command line of vLLM's OpenAI-compatible server for :func:`engine_args` (``memoir serve``)."""
    args = engine_args(edits, model, max_model_len, kv_cache_bytes)
    name = model if "/" not in model else pathlib.Path(model).name  # what clients pass as "model"
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", args["model"], "--served-model-name", name,
            "--hf-overrides", json.dumps(args["hf_overrides"]), "--dtype", args["dtype"],
            "--no-enable-prefix-caching", "--no-enable-chunked-prefill",
            "--max-model-len", str(max_model_len), "--max-num-batched-tokens", str(max_model_len),
            "--kv-cache-memory-bytes", str(kv_cache_bytes),
            "--host", host, "--port", str(port), *(extra or [])]


def vllm_python(explicit: str | None = None) -> str:
    """The Python that runs vLLM: ``explicit``, else ``$MEMOIR_VLLM_PYTHON``, else this one when it has
    vLLM, else the venv scripts/setup_vllm.sh builds beside this checkout."""
    if explicit:
        return explicit
    if os.environ.get("MEMOIR_VLLM_PYTHON"):
        return os.environ["MEMOIR_VLLM_PYTHON"]
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    venv = pathlib.Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    if venv.exists():
        return str(venv)
    raise FileNotFoundError("vLLM is not installed for this Python: build its environment with "
                            "scripts/setup_vllm.sh, or name one with --python / MEMOIR_VLLM_PYTHON")
