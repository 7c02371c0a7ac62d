"""Would a real-valued second look fix rephrase routing? (no editing)

MEMOIR routes a query to the stored edit whose binary TopHash mask overlaps its own most; on
SmolLM2 a ZsRE rephrase finds its own edit that way in ~67 % of cases, which caps Gen.  The mask is
the top-k of a real-valued feature (the prompt's mean layer input, de-centred and z-scored by the
background statistics); this probe asks how much of the ranking the binarisation loses, and whether
another layer's feature would rank better.  For every edit prompt, rephrase and NQ ``loc`` prompt of
the public ZsRE file, with the whole file as the bank, per layer:

* ``top1_mask``: the preset's routing (mask overlap, k = 230); ``recall_mask@m``: own edit among the m
  best overlaps;
* ``top1_cos``: cosine of the z-scored features instead;
* ``top1_rerank@m``: the m best overlaps re-ranked by cosine (the mask still shortlists);
* ``gen_hit`` / ``loc_fp`` with the gate MEMOIR would use: the top overlap >= tau (0.4 and the automatic
  tau from the background texts) for mask and rerank; for cosine, the automatic gate is the best
  background cosine plus 0.02.

Writes experiments/results/rerank_probe.json.

    PYTHONPATH=. python experiments/rerank_probe.py [--layers 20 24 27] [--n 732]
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
from memoir.models import locate_target
from memoir.replay import keep_logits

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZSRE = ROOT.parent / "shared" / "data" / "zsre" / "zsre_mend_eval_portability_gpt4.public.json"


def pooled_inputs(editor, layers, texts, batch_size=32, keep_tokens=False):
    """``(pooled, tokens)`` per layer: ``[N, D]`` mean over each text's prompt tokens of that layer's
    FFN-output input, and (only with ``keep_tokens``, for background statistics) every token's row.
    """
    modules = {i: locate_target(editor.model, i).module for i in layers}
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, inp[0].detach()))
             for i, m in modules.items()]
    pooled = {i: [] for i in layers}
    tokens = {i: [] for i in layers}
    try:
        with editor.disabled(), torch.no_grad():
            for s in range(0, len(texts), batch_size):
                batch = build_batch(editor.tokenizer, texts[s : s + batch_size])
                editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                             **keep_logits(editor.model, 1))
                span = batch.prompt_mask.bool()
                for i in layers:
                    acts = seen[i].reshape(*batch.input_ids.shape, -1).float()
                    w = span[..., None].float()
                    pooled[i].append((acts * w).sum(1) / w.sum(1))
                    if keep_tokens:
                        tokens[i].append(acts[span])
    finally:
        for h in hooks:
            h.remove()
    return ({i: torch.cat(v) for i, v in pooled.items()},
            {i: torch.cat(v) for i, v in tokens.items() if v})


def top_mask(z, k):
    return torch.zeros_like(z).scatter_(1, z.abs().topk(k, dim=1).indices, 1.0)


def unit(x):
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def evaluate(z: dict, k: int, margin: float, ms=(3, 10)) -> dict:
    """Routing numbers for one layer's z-scored features ``z[part]`` (parts: src, reph, loc, bg)."""
    m = {p: top_mask(v, k) for p, v in z.items()}
    u = {p: unit(v) for p, v in z.items()}
    n = z["src"].shape[0]
    own = torch.arange(n)
    ov = {p: m[p] @ m["src"].T / k for p in ("reph", "loc", "bg")}
    cs = {p: u[p] @ u["src"].T for p in ("reph", "loc", "bg")}
    tau_auto = float(ov["bg"].max()) + margin
    tau_cos = float(cs["bg"].max()) + margin
    row = {"k": k, "tau_auto": tau_auto, "tau_cos_auto": tau_cos}
    best_ov, best_i = ov["reph"].max(1)
    row["top1_mask"] = float((best_i == own).float().mean())
    loc_top = ov["loc"].max(1).values
    for tau_name, tau in (("0.4", 0.4), ("auto", tau_auto)):
        row[f"gen_hit_mask_{tau_name}"] = float(((best_i == own) & (best_ov >= tau)).float().mean())
        row[f"loc_fp_{tau_name}"] = float((loc_top >= tau).float().mean())
    best_cs, best_ci = cs["reph"].max(1)
    row["top1_cos"] = float((best_ci == own).float().mean())
    order = ov["reph"].argsort(dim=1, descending=True, stable=True)  # mask shortlists, best first
    # "All but the top": centre on the bank mean and drop its r leading principal directions, which
    # hold what every ZsRE question shares (the question form) rather than what tells them apart.
    centre = z["src"].mean(0)
    _, _, vh = torch.linalg.svd(z["src"] - centre, full_matrices=False)
    for r in (0, 1, 3, 10, 30):
        def strip(x):
            x = x - centre
            return unit(x - (x @ vh[:r].T) @ vh[:r]) if r else unit(x)
        sim = strip(z["reph"]) @ strip(z["src"]).T
        row[f"top1_cos_abtt{r}"] = float((sim.argmax(1) == own).float().mean())
        short = order[:, :10]
        pick = short.gather(1, sim.gather(1, short).argmax(1, keepdim=True)).squeeze(1)
        row[f"top1_rerank@10_abtt{r}"] = float((pick == own).float().mean())
    row["gen_hit_cos_auto"] = float(((best_ci == own) & (best_cs >= tau_cos)).float().mean())
    row["loc_fp_cos_auto"] = float((cs["loc"].max(1).values >= tau_cos).float().mean())
    for mm in ms:
        short = order[:, :mm]
        row[f"recall_mask@{mm}"] = float((short == own[:, None]).any(1).float().mean())
        pick = short.gather(1, cs["reph"].gather(1, short).argmax(1, keepdim=True)).squeeze(1)
        row[f"top1_rerank@{mm}"] = float((pick == own).float().mean())
        for tau_name, tau in (("0.4", 0.4), ("auto", tau_auto)):
            # the gate is unchanged (top overlap >= tau), so loc_fp is the mask's
            row[f"gen_hit_rerank@{mm}_{tau_name}"] = float(((pick == own) & (best_ov >= tau)).float().mean())
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[18, 21, 24, 27])
    ap.add_argument("--n", type=int, default=732)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=None, help="keep the pooled activations in this file (re-runs skip the model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    records = json.loads(ZSRE.read_text())[: args.n]
    model, tok = load_model("smollm2")
    cfg = MemoirConfig.preset("smollm2")
    editor = MemoirEditor(model, tok, cfg)
    t0 = time.time()
    texts = {"src": [r["src"] for r in records], "reph": [r["rephrase"] for r in records],
             "loc": [r["loc"] for r in records]}
    cache = pathlib.Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        bg_pooled, bg_tokens, pooled = torch.load(cache)
    else:
        bg_pooled, bg_tokens = pooled_inputs(editor, args.layers, editor._background_texts, keep_tokens=True)
        pooled = {p: pooled_inputs(editor, args.layers, t)[0] for p, t in texts.items()}
        if cache is not None:
            torch.save((bg_pooled, bg_tokens, pooled), cache)
    rows = []
    for layer in args.layers:
        if layer == editor.target.layer_index:  # exactly the editor's statistics
            mu, sd = editor.layer.background_mean.float(), editor.layer.background_std.float()
        else:
            mu, sd = bg_tokens[layer].mean(0), bg_tokens[layer].std(0).clamp_min(1e-6)
        z = {p: (pooled[p][layer] - mu) / sd for p in texts}
        z["bg"] = (bg_pooled[layer] - mu) / sd
        row = {"layer": layer, **evaluate(z, cfg.top_k, cfg.threshold_margin)}
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    out = ROOT / "experiments" / "results" / "rerank_probe.json"
    out.write_text(json.dumps({"model": "smollm2", "n": len(records), "edited_layer": editor.target.layer_index,
                               "seconds": time.time() - t0, "machine": machine_info(), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
