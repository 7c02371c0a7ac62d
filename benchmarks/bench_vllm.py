"""vLLM throughput with memoir's plugin against plain vLLM, same prompts, one run (run it with the
Python of scripts/setup_vllm.sh)::

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--rounds 5] [--output benchmarks/results/bench/vllm.json]

SmolLM2-135M-Instruct in float32 with the shipped preset's memory: the 8 prompts of the generation
benchmark edited (``edit_many``), so every request of the batch is routed and reads a block, the
plugin's worst case.  Both engines run with the plugin's settings (no prefix caching, no chunked prefill), in
vLLM's default compiled mode, side by side in one process, their timed rounds alternating.
Reported per engine: generated tokens/s over ``--rounds`` rounds of the 8 prompts x ``--copies``
(every request decodes ``--new-tokens`` tokens, ``ignore_eos``), its best and median round, and the
ratio memoir / plain of the best rounds and of the medians, and the share of the memoir engine's
time spent inside the plugin's op (routing and the memory read, timed within the same steps: the
figure least sensitive to other load on the machine).
"""
from __future__ import annotations

import argparse
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


def start_engine(kwargs: dict, prompts: list[str], params):
    from vllm import LLM

    llm = LLM(**kwargs)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up (compiles the shapes it meets)
    return llm


def timed_round(llm, prompts: list[str], params, new_tokens: int) -> float:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return seconds


def summary(seconds: list[float], tokens: int) -> dict:
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
    from vllm import SamplingParams

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
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, min_tokens=args.new_tokens,
                                ignore_eos=True)
        engines = {"plain": start_engine(plain_kwargs, prompts, params),
                   "memoir": start_engine(memoir_kwargs, prompts, params)}
        # Rounds alternate between the two engines, so a change in the machine's load hits both alike.
        seconds = {name: [] for name in engines}
        served = next(iter(vllm_model._ROUTERS.values()))
        served.op_seconds = 0.0
        for _ in range(args.rounds):
            for name, llm in engines.items():
                seconds[name].append(timed_round(llm, prompts, params, args.new_tokens))
        results = {name: summary(s, len(prompts) * args.new_tokens) for name, s in seconds.items()}
        # The op's own host time within the memoir engine's rounds: the plugin's cost measured inside
        # the same steps, so it does not depend on what else the machine runs.
        op_share = served.op_seconds / sum(seconds["memoir"])
        router = served.router
        rows = [row for row, _ in router._live.values()]
        routed_share = sum(r >= 0 for r in rows) / max(len(rows), 1)
    ratio = results["memoir"]["tokens_per_s_best"] / results["plain"]["tokens_per_s_best"]
    out = {"benchmark": "vllm generation, memoir plugin vs plain vLLM", "vllm": vllm.__version__,
           "cores": args.cores, "stored_edits": stored, "requests": len(prompts),
           "new_tokens": args.new_tokens, "rounds": args.rounds, "routed_share": routed_share,
           "ratio_memoir_vs_plain": ratio,
           "ratio_of_medians": results["memoir"]["tokens_per_s_median"] / results["plain"]["tokens_per_s_median"],
           "op_share_of_memoir_time": op_share,
           "engines": results,
           "machine": machine_info()}
    pathlib.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.output).write_text(json.dumps(out, indent=1))
    print(f"plain {results['plain']['tokens_per_s_best']:.1f} tok/s, memoir {results['memoir']['tokens_per_s_best']:.1f} "
          f"tok/s: ratio {ratio:.3f} (goal >= 0.95); the plugin's op took {100 * op_share:.1f} % of the memoir "
          f"engine's time; wrote {args.output}")


if __name__ == "__main__":
    main()
