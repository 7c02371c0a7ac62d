"""The subject check's partial pass with and without the cached prefix, side by side in one run.

Every query is read as ``PREFIX + text`` through the first ``subject_layer`` layers.  Compared here,
alternating rounds on the same texts: ``plain`` (``prefixed_batch`` + ``token_states``: the prefix
run again in every row, left padded) and ``cached`` (``PrefixedStates``: the prefix's keys and
values computed once, the texts right padded after it).  Also reported: the largest difference of
the texts' own token states between the two.  Texts: the generation benchmark's 8 edit prompts, as
a batch of 16 (each twice, as vLLM serves them in ``bench_vllm.py``).

    PYTHONPATH=. python experiments/subject_prefix_cache_speed.py
"""
from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time

import torch

from memoir import load_model
from memoir import subject_router as sr
from memoir.machine import machine_info

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from test_bench_generation import PROMPTS  # noqa: E402


def main(rounds: int = 15, layer: int = 4) -> None:
    torch.set_num_threads(1)
    model, tok = load_model("smollm2")
    layers = model.model.layers
    texts = [p for p, _, _ in PROMPTS] * 2
    cached = sr.PrefixedStates(model, layers, layer, tok)

    def plain():
        ids, attn, own = sr.prefixed_batch(tok, texts)
        return sr.token_states(model, layers, layer, ids, attn), own

    (a, a_own), (b, b_own) = plain(), cached(texts)
    times = {"plain": [], "cached": []}
    for _ in range(rounds):
        for name, fn in (("plain", plain), ("cached", lambda: cached(texts))):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    out = {"texts": len(texts), "subject_layer": layer, "rounds": rounds,
           "tokens_per_row": {"plain": a.shape[1], "cached": b.shape[1]},
           "max_abs_difference": float((a[a_own] - b[b_own]).abs().max()),
           "ms": {k: {"min": 1e3 * min(v), "median": 1e3 * statistics.median(v)} for k, v in times.items()},
           "machine": machine_info()}
    out["plain_over_cached_median"] = out["ms"]["plain"]["median"] / out["ms"]["cached"]["median"]
    dest = ROOT / "experiments/results/subject_prefix_cache_speed.json"
    dest.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}))


if __name__ == "__main__":
    main()
