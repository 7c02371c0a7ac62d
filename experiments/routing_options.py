"""Routing options on SmolLM2 without editing: prompt aggregation x fixed / automatic threshold.

For the public ZsRE file: the TopHash masks (smollm2 preset: layer 27, k 230, z-scored features)
of every edit prompt (the bank), rephrase and unrelated NQ ``loc`` prompt, for the aggregations
``mean_decentered`` (reference) and ``maxabs_decentered``.  For banks of the first N edits it reports
- top1_own: a rephrase's best match is its own edit (the generalisation ceiling of top-1 routing),
- gen_hit: top1_own and score >= tau; loc_fp: a loc prompt's best score >= tau (hurts locality),
at tau = 0.4 (the preset) and tau = "auto" (best background-text overlap with the bank + margin,
as ``MemoirEditor.calibrate_threshold`` computes it).  Writes experiments/results/routing_options.json.

    PYTHONPATH=. python experiments/routing_options.py [--n 732]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

from memoir import MemoirConfig, MemoirEditor, load_model
from memoir.batching import build_batch
from memoir.machine import machine_info
from memoir.ops import best_match
from memoir.replay import keep_logits
from memoir.tophash import masks_from_features, prompt_features

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZSRE = ROOT.parent / "shared" / "data" / "zsre" / "zsre_mend_eval_portability_gpt4.public.json"
AGGREGATIONS = ("mean_decentered", "maxabs_decentered")


@torch.no_grad()
def layer_inputs(editor, texts, batch_size=32):
    """Yield ``(acts [B, S, D], prompt_mask [B, S])``: the edited layer's input for ``texts``, memory off."""
    with editor.disabled(), editor.layer.capturing() as seen:
        for i in range(0, len(texts), batch_size):
            batch = build_batch(editor.tokenizer, texts[i : i + batch_size])
            seen.clear()
            editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                         **keep_logits(editor.model, 1))
            yield seen[0].reshape(*batch.input_ids.shape, -1), batch.prompt_mask


def masks(editor, texts, batch_size=32):
    """Packed masks per aggregation for ``texts`` (one frozen forward pass for all of them)."""
    layer = editor.layer
    out = {a: [] for a in AGGREGATIONS}
    for acts, span in layer_inputs(editor, texts, batch_size):
        for agg in AGGREGATIONS:
            feat = prompt_features(acts, span, agg, layer.background_mean) / layer.background_std
            out[agg].append(masks_from_features(feat, layer.top_k, layer.permutation)[2])
    return {a: torch.cat(v) for a, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=732)
    ap.add_argument("--margin", type=float, default=MemoirConfig().threshold_margin)
    ap.add_argument("--output", default=str(ROOT / "experiments" / "results" / "routing_options.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    records = json.loads(ZSRE.read_text())[: args.n]
    model, tok = load_model("smollm2")
    editor = MemoirEditor(model, tok, MemoirConfig.preset("smollm2"))
    t0 = time.time()
    bg = masks(editor, editor._background_texts)
    src = masks(editor, [r["src"] for r in records])
    reph = masks(editor, [r["rephrase"] for r in records])
    loc = masks(editor, [r["loc"] for r in records])
    results = []
    for agg in AGGREGATIONS:
        for n in sorted({min(x, len(records)) for x in (20, 100, 200, len(records))}):
            bank = src[agg][:n]
            r_scores, r_rows = best_match(reph[agg][:n], bank, 0.0)
            l_scores, _ = best_match(loc[agg][:n], bank, 0.0)
            b_scores, _ = best_match(bg[agg], bank, 0.0)
            own = r_rows == torch.arange(n)
            auto = min(1.0, float(b_scores.max()) + args.margin)
            row = {"aggregation": agg, "n": n, "top1_own": float(own.float().mean()),
                   "loc_score_p95": float(l_scores.quantile(0.95)), "loc_score_max": float(l_scores.max()),
                   "background_score_max": float(b_scores.max()), "auto_tau": auto, "by_tau": {}}
            for name, tau in (("0.4", 0.4), ("auto", auto)):
                row["by_tau"][name] = {"tau": tau, "gen_hit": float((own & (r_scores >= tau)).float().mean()),
                                       "loc_fp": float((l_scores >= tau).float().mean())}
            results.append(row)
            print(f"{agg:18s} N={n:4d} top1 {row['top1_own']:.3f} auto tau {auto:.3f} | "
                  + " | ".join(f"tau {k}: gen {v['gen_hit']:.3f} loc_fp {v['loc_fp']:.3f}" for k, v in row["by_tau"].items()),
                  flush=True)
    out = {"data": ZSRE.name, "n_records": len(records), "model": "SmolLM2-135M-Instruct",
           "config": "smollm2 preset (layer 27, k 230, feature_scaling std)", "margin": args.margin,
           "machine": machine_info(),
           "seconds": time.time() - t0, "results": results}
    pathlib.Path(args.output).write_text(json.dumps(out, indent=1))
    print("wrote", args.output)


if __name__ == "__main__":
    main()
