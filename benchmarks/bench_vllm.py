"""vLLM throughput with memoir's plugin against plain vLLM, same prompts, one run (run it with the
Python of scripts/setup_vllm.sh)::

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--rounds 5] [--output benchmarks/results/bench/vllm.json]

SmolLM2-135M-Instruct in float32 with the shipped preset's memory: the 8 prompts of the generation
benchmark edited (``edit_many``), so every request of the batch is routed and reads a block, the
plugin's worst case.  Both engines run with the plugin's settings (no prefix caching, no chunked prefill), in
vLLM's default compiled mode, one process each after the other.  Reported per engine: generated
tokens/s over ``--rounds`` timed rounds of the 8 prompts x ``--copies`` (every request decodes
``--new-tokens`` tokens, ``ignore_eos``), its best and median round, and the ratio memoir / plain.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def make_edits(folder: pathlib.Path) -> int:
    import torch

    from memoir import MemoirConfig, MemoirEditor, load_model
    from test_bench_generation import PROMPTS

    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    editor = MemoirEditor(model, tok, MemoirConfig.preset("smollm2"))
    editor.edit_many([{"prompt": p, "target": t, "subject": s} for p, t, s in PROMPTS], progress=False)
    routes = editor.retrieve([p for p, _, _ in PROMPTS])
    assert [r.edit_id for r in routes] == list(range(len(PROMPTS))), routes
    editor.save(folder)
    return len(editor.layer.bank)


def time_engine(kwargs: dict, prompts: list[str], new_tokens: int, rounds: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up (compiles the shapes it meets)
    seconds = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds.append(time.perf_counter() - t0)
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    tokens = len(prompts) * new_tokens
    return {"tokens_per_s_best": tokens / min(seconds), "tokens_per_s_median": tokens / statistics.median(seconds),
            "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--copies", type=int, default=2, help="each of the 8 prompts this many times per round")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--output", default=str(ROOT / "benchmarks/results/bench/vllm.json"))
    ap.add_argument("--cores", default="0", help="CPU cores vLLM's threads bind to (VLLM_CPU_OMP_THREADS_BIND; the "
                                                 "default, one core, matches the suite's one torch thread)")
    args = ap.parse_args()
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.cores
    import vllm

    from memoir.integrations import vllm_model
    from memoir.integrations.vllm import engine_args
    from memoir.machine import machine_info
    from test_bench_generation import PROMPTS

    prompts = [p for p, _, _ in PROMPTS] * args.copies
    with tempfile.TemporaryDirectory() as tmp:
        edits = pathlib.Path(tmp) / "edits"
        stored = make_edits(edits)
        memoir_kwargs = engine_args(edits, max_num_seqs=len(prompts), distributed_executor_backend="uni", seed=0)
        plain_kwargs = {k: v for k, v in memoir_kwargs.items() if k != "hf_overrides"}
        results = {"plain": time_engine(plain_kwargs, prompts, args.new_tokens, args.rounds)}
        results["memoir"] = time_engine(memoir_kwargs, prompts, args.new_tokens, args.rounds)
        router = next(iter(vllm_model._ROUTERS.values())).router
        rows = [row for row, _ in router._live.values()]
        routed_share = sum(r >= 0 for r in rows) / max(len(rows), 1)
    ratio = results["memoir"]["tokens_per_s_best"] / results["plain"]["tokens_per_s_best"]
    out = {"benchmark": "vllm generation, memoir plugin vs plain vLLM", "vllm": vllm.__version__,
           "cores": args.cores, "stored_edits": stored, "requests": len(prompts),
           "new_tokens": args.new_tokens, "rounds": args.rounds, "routed_share": routed_share,
           "ratio_memoir_vs_plain": ratio,
           "engines": results,
           "machine": machine_info()}
    pathlib.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"plain {results['plain']['tokens_per_s_best']:.1f} tok/s, memoir {results['memoir']['tokens_per_s_best']:.1f} "
          f"tok/s: ratio {ratio:.3f} (goal >= 0.95); wrote {args.output}")


if __name__ == "__main__":
    main()
