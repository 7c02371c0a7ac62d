"""Cached-activation editing vs the reference loop (full_forward), side by side on SmolLM2.

Both editors start from the same model and apply the same public ZsRE edits with the same
config; the only difference is ``full_forward`` (every iteration runs the whole model and all
logits, as the reference code does) versus replaying the frozen layers below the edit and
computing only the target logits.  Reports seconds per edit, the ratio, and that both give
the same edit (steps, loss, memory).  Writes experiments/results/edit_speed.json.

    python experiments/bench_edit_speed.py --n 8 --preset smollm2 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import time

import torch

from memoir import MemoirConfig, MemoirEditor, load_model
from memoir.machine import machine_info

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZSRE = ROOT.parent / "shared" / "data" / "zsre" / "zsre_mend_eval_portability_gpt4.public.json"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--preset", default="smollm2")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default=str(ROOT / "experiments" / "results" / "edit_speed.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # zero-initialised memory produces denormals: very slow on CPU
    records = json.loads(ZSRE.read_text())[: args.n]
    model, tok = load_model("smollm2")
    cfg = MemoirConfig.preset(args.preset)
    editors = {
        "cached": MemoirEditor(copy.deepcopy(model), tok, cfg),
        "full_forward": MemoirEditor(copy.deepcopy(model), tok, MemoirConfig(**{**cfg.to_dict(), "full_forward": True})),
    }
    for e in editors.values():
        e.context_templates()
    times = {k: [] for k in editors}
    steps = {k: [] for k in editors}
    losses = {k: [] for k in editors}
    for r in records:  # alternate the two so machine noise hits both alike
        for name, editor in editors.items():
            t = time.perf_counter()
            res = editor.edit(r["src"], r["alt"])
            times[name].append(time.perf_counter() - t)
            steps[name].append(res.steps)
            losses[name].append(res.loss)
        print(f"{r['src'][:50]!r}: cached {times['cached'][-1]:.2f}s full {times['full_forward'][-1]:.2f}s "
              f"steps {steps['cached'][-1]}/{steps['full_forward'][-1]}", flush=True)
    mem = {k: e.layer.memory.detach() for k, e in editors.items()}
    diff = float((mem["cached"] - mem["full_forward"]).abs().max())
    scale = float(mem["full_forward"].abs().max())
    out = {
        "model": "SmolLM2-135M-Instruct",
        "preset": args.preset,
        "config": editors["cached"].config.to_dict(),
        "n_edits": len(records),
        "machine": machine_info(),
        "seconds_per_edit": {k: sum(v) / len(v) for k, v in times.items()},
        "speedup_cached_vs_full_forward": sum(times["full_forward"]) / sum(times["cached"]),
        "same_steps": steps["cached"] == steps["full_forward"],
        "steps": steps,
        "loss": losses,
        "max_abs_memory_difference": diff,
        "max_abs_memory": scale,
    }
    pathlib.Path(args.output).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("seconds_per_edit", "speedup_cached_vs_full_forward", "same_steps",
                                          "max_abs_memory_difference")}, indent=1))


if __name__ == "__main__":
    main()
