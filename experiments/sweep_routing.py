"""Routing sweep on SmolLM2: how well TopHash masks separate prompts, per layer / k / feature option.

No editing happens here: for the first N public ZsRE records it computes the TopHash mask of each
edit prompt (the bank), of its rephrase and of its unrelated NQ `loc` prompt, then measures
- gen_hit(tau): the rephrase's best match is its own edit and scores >= tau (generalisation bound),
- loc_fp(tau): the loc prompt's best score >= tau (a false positive hurts locality),
- the median overlap of unrelated pairs of edit prompts (minimal-overwrite: lower is better).
Writes experiments/results/sweep_routing.json.  Only the public ZsRE file is used.

    PYTHONPATH=. python experiments/sweep_routing.py --n 200
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

from memoir import load_model, locate_target
from memoir.batching import build_batch
from memoir.editor import default_background_texts
from memoir.machine import machine_info
from memoir.ops import best_match, overlap_counts
from memoir.tophash import make_permutation, masks_from_features

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZSRE = ROOT.parent / "shared" / "data" / "zsre" / "zsre_mend_eval_portability_gpt4.public.json"


@torch.no_grad()
def layer_stats(model, tok, texts, layers, batch_size=32):
    """Per text and layer: mean and last-token input of the FFN output projection."""
    seen = {}
    hooks = []
    for layer in layers:
        module = locate_target(model, layer).module
        hooks.append(module.register_forward_hook(lambda m, i, o, layer=layer: seen.__setitem__(layer, i[0])))
    means = {layer: [] for layer in layers}
    lasts = {layer: [] for layer in layers}
    try:
        for s in range(0, len(texts), batch_size):
            b = build_batch(tok, texts[s : s + batch_size])
            pos = (b.attention_mask.cumsum(-1) - 1).clamp_min(0)
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos, use_cache=False,
                  logits_to_keep=1)
            w = b.attention_mask.float()
            for layer in layers:
                a = seen[layer].float()
                means[layer].append(torch.einsum("bs,bsd->bd", w, a) / w.sum(1, keepdim=True))
                lasts[layer].append(a[:, -1])
    finally:
        for h in hooks:
            h.remove()
    return {l: torch.cat(means[l]) for l in layers}, {l: torch.cat(lasts[l]) for l in layers}


def evaluate(feat_src, feat_reph, feat_loc, k, perm, taus):
    _, _, bank = masks_from_features(feat_src, k, perm)
    _, _, reph = masks_from_features(feat_reph, k, perm)
    _, _, loc = masks_from_features(feat_loc, k, perm)
    n = len(bank)
    own = torch.arange(n)
    r_scores, r_idx = best_match(reph, bank, 0.0)
    l_scores, _ = best_match(loc, bank, 0.0)
    pair = overlap_counts(bank, bank).float() / k
    off = pair[~torch.eye(n, dtype=torch.bool)]
    out = {
        "rephrase_top1_own": float((r_idx == own).float().mean()),
        "rephrase_score_median": float(r_scores.median()),
        "loc_best_score_median": float(l_scores.median()),
        "loc_best_score_p95": float(l_scores.quantile(0.95)),
        "edit_pair_overlap_median": float(off.median()),
        "chance_overlap": k / feat_src.shape[1],
        "by_tau": {},
    }
    for tau in taus:
        gen_hit = float(((r_idx == own) & (r_scores >= tau)).float().mean())
        loc_fp = float((l_scores >= tau).float().mean())
        out["by_tau"][f"{tau:.2f}"] = {"gen_hit": gen_hit, "loc_fp": loc_fp}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--layers", default="18,21,24,25,27")
    ap.add_argument("--output", default=str(ROOT / "experiments" / "results" / "sweep_routing.json"))
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    records = json.loads(ZSRE.read_text())[: args.n]
    model, tok = load_model("smollm2")
    t0 = time.time()
    bg_mean, _ = layer_stats(model, tok, default_background_texts(), layers)
    src_m, src_l = layer_stats(model, tok, [r["src"] for r in records], layers)
    reph_m, reph_l = layer_stats(model, tok, [r["rephrase"] for r in records], layers)
    loc_m, loc_l = layer_stats(model, tok, [r["loc"] for r in records], layers)
    taus = [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]
    results = []
    for layer in layers:
        d = src_m[layer].shape[1]
        perm = make_permutation(d, 0)
        mu, sd = bg_mean[layer].mean(0), bg_mean[layer].std(0).clamp_min(1e-6)
        variants = {
            "mean": (src_m[layer], reph_m[layer], loc_m[layer]),
            "mean_decentered": (src_m[layer] - mu, reph_m[layer] - mu, loc_m[layer] - mu),
            "mean_decentered_std": ((src_m[layer] - mu) / sd, (reph_m[layer] - mu) / sd, (loc_m[layer] - mu) / sd),
            "last": (src_l[layer], reph_l[layer], loc_l[layer]),
        }
        for k_ratio in (4096 / 14336, 0.15, 0.08):
            k = max(1, round(d * k_ratio))
            for name, feats in variants.items():
                row = {"layer": layer, "k": k, "features": name, **evaluate(*feats, k, perm, taus)}
                results.append(row)
                best = max(row["by_tau"].items(), key=lambda kv: kv[1]["gen_hit"] - 2 * kv[1]["loc_fp"])
                print(f"layer {layer:2d} k {k:4d} {name:20s} own {row['rephrase_top1_own']:.2f} "
                      f"pair {row['edit_pair_overlap_median']:.2f} loc95 {row['loc_best_score_p95']:.2f} "
                      f"best tau {best[0]} gen {best[1]['gen_hit']:.2f} locfp {best[1]['loc_fp']:.2f}", flush=True)
    out = {
        "data": str(ZSRE.name),
        "n_records": len(records),
        "model": "SmolLM2-135M-Instruct",
        "machine": machine_info(),
        "seconds": time.time() - t0,
        "results": results,
    }
    pathlib.Path(args.output).write_text(json.dumps(out, indent=1))
    print("wrote", args.output)


if __name__ == "__main__":
    main()
