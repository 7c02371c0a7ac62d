"""How far can a different pooling of the prompt tokens lift top-1 routing of rephrases? (no editing)

For every edit prompt, rephrase and NQ ``loc`` prompt of the public ZsRE file and the shipped
background texts: the edited layer's per-token inputs, z-scored with the background mean/std
(the smollm2 preset's features).  Each pooling over the prompt tokens gives a feature, its top-k
the mask; with the whole file as the bank it reports top1_own (a rephrase's best match is its own
edit), gen_hit / loc_fp at the automatic threshold and at 0.4, and the mean overlap between edit
masks.  Writes experiments/results/pooling_sweep.json.

    PYTHONPATH=. python experiments/pooling_sweep.py
"""
from __future__ import annotations

import json
import pathlib
import time

import torch

from memoir import MemoirConfig, MemoirEditor, load_model
from memoir.machine import machine_info
from routing_options import layer_inputs  # same folder: PYTHONPATH=. python experiments/pooling_sweep.py

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZSRE = ROOT.parent / "shared" / "data" / "zsre" / "zsre_mend_eval_portability_gpt4.public.json"
POOLINGS = ("mean", "maxabs", "lp2", "lp4", "lp8", "meanabs", "last", "last3", "mean_nolast", "mean+max")


def token_z(editor, texts, batch_size=32):
    """Per text: the z-scored layer input at each prompt token ``[S_i, D]`` (float16 to save memory)."""
    L, out = editor.layer, []
    mu, sd = L.background_mean.float(), L.background_std.float()
    for acts, span in layer_inputs(editor, texts, batch_size):
        out += [((a[m.bool()].float() - mu) / sd).half() for a, m in zip(acts, span)]
    return out


def pool(name, z):
    z = z.float()
    if name == "mean":
        return z.mean(0)  # = the preset (mean_decentered + std scaling)
    if name == "maxabs":
        return z.abs().amax(0)
    if name.startswith("lp"):
        p = float(name[2:])
        return z.abs().pow(p).mean(0).pow(1 / p)
    if name == "meanabs":
        return z.abs().mean(0)
    if name == "last":
        return z[-1]
    if name == "last3":
        return z[-3:].mean(0)
    if name == "mean_nolast":
        return z[:-1].mean(0) if len(z) > 1 else z.mean(0)
    if name == "mean+max":
        return z.mean(0).abs() + z.abs().amax(0)
    raise ValueError(name)


def dense_masks(feats, k):
    m = torch.zeros_like(feats)
    return m.scatter_(1, feats.abs().topk(k, dim=1).indices, 1.0)


def main():
    torch.set_num_threads(1)
    records = json.loads(ZSRE.read_text())
    model, tok = load_model("smollm2")
    cfg = MemoirConfig.preset("smollm2")
    editor = MemoirEditor(model, tok, cfg)
    t0 = time.time()
    z = {"src": token_z(editor, [r["src"] for r in records]), "reph": token_z(editor, [r["rephrase"] for r in records]),
         "loc": token_z(editor, [r["loc"] for r in records]), "bg": token_z(editor, editor._background_texts)}
    rows = []
    for name in POOLINGS:
        feats = {part: torch.stack([pool(name, x) for x in xs]) for part, xs in z.items()}
        for k in (115, 230, 345):
            m = {part: dense_masks(f, k) for part, f in feats.items()}
            bank = m["src"]
            scores, best = (m["reph"] @ bank.T / k).max(1)
            own = best == torch.arange(len(best))
            tau = float((m["bg"] @ bank.T / k).max()) + cfg.threshold_margin
            loc = (m["loc"] @ bank.T / k).max(1).values
            pair = bank @ bank.T / k
            n = len(bank)
            rows.append({"pooling": name, "k": k, "top1_own": float(own.float().mean()), "auto_tau": tau,
                         "gen_hit_auto": float((own & (scores >= tau)).float().mean()),
                         "loc_fp_auto": float((loc >= tau).float().mean()),
                         "gen_hit_0.4": float((own & (scores >= 0.4)).float().mean()),
                         "loc_fp_0.4": float((loc >= 0.4).float().mean()),
                         "edit_mask_overlap_mean": float((pair.sum() - pair.diagonal().sum()) / (n * (n - 1)))})
            print(rows[-1], flush=True)
    out = ROOT / "experiments" / "results" / "pooling_sweep.json"
    out.write_text(json.dumps({"model": "smollm2", "layer": editor.target.layer_index, "n": len(records),
                               "seconds": time.time() - t0, "machine": machine_info(), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
