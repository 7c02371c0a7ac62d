"""Which layer and key rule let the subject router find a misspelled or shortened subject?

Keys of every public CounterFact edit (its subject's tokens in ``PREFIX + prompt``, as given and
lower-cased) are read at several layers; queries are the first paraphrase of the first ``--queries``
records with the subject rewritten (``subject_forms_probe.forms``), and every neighbourhood prompt of
the same records (same relation, another subject).  For each layer and score rule the threshold
that lets ``--fire`` of the neighbourhood prompts reach some edit is found, and the share of each
form reaching its own edit at that threshold reported (the router's trade-off at equal leakage).

Score rules of a query for a key group of ``m`` subject tokens (cosines of decentred states, best
query token per key): ``mean`` (the shipped rule), ``mean_drop1`` (the mean without the worst key
when ``m >= 3``), ``last`` (the subject's last token only: the position where a decoder gathers a
multi-token name).

    PYTHONPATH=. python experiments/subject_layer_forms_probe.py [--queries 200]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from subject_forms_probe import forms  # noqa: E402
from subject_routing_sim import DATA  # noqa: E402

from memoir import load_model  # noqa: E402
from memoir.background import default_background_texts  # noqa: E402
from memoir.eval.datasets import load_records  # noqa: E402
from memoir.subject_router import PREFIX, prefixed_batch, subject_positions  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = (2, 4, 6, 8, 10, 12, 16)
RULES = ("mean", "mean_drop1", "last")


@torch.no_grad()
def states_of(model, tok, texts, batch=16):
    """Per text: ``(states [L+1, S, d] of its own tokens, ...)`` at every layer in ``LAYERS``."""
    out = []
    for i in range(0, len(texts), batch):
        ids, attn, own = prefixed_batch(tok, texts[i:i + batch])
        pos = (attn.long().cumsum(-1) - 1).clamp_min(0)
        hs = model(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True).hidden_states
        stack = torch.stack([hs[l] for l in LAYERS], dim=1).float()  # [B, nL, S, d]
        for b in range(ids.shape[0]):
            out.append(stack[b][:, own[b]])
    return out


@torch.no_grad()
def key_states(model, tok, prompt, subject):
    groups = []
    variants = [(prompt, subject)]
    if subject.lower() != subject and subject in prompt:
        variants.append((prompt.replace(subject, subject.lower(), 1), subject.lower()))
    for p, s in variants:
        ids, pos = subject_positions(tok, p, s)
        if not pos:
            continue
        t = torch.tensor([ids])
        hs = model(input_ids=t, attention_mask=torch.ones_like(t), output_hidden_states=True).hidden_states
        groups.append(torch.stack([hs[l][0, pos] for l in LAYERS]).float())  # [nL, m, d]
    return groups


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--fire", type=float, default=0.02)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path, fmt = DATA["counterfact"]
    records, _ = load_records(path, fmt)
    model, tok = load_model("smollm2")
    bg = states_of(model, tok, default_background_texts())
    mean = torch.cat([s for s in bg], dim=1).mean(1)  # [nL, d]

    keys = []  # per edit: list of groups [nL, m, d] normalised
    for r in tqdm(records, desc="keys"):
        gs = key_states(model, tok, r.prompt, r.extra["subject"])
        keys.append([F.normalize(g - mean[:, None], dim=-1) for g in gs])

    queries: dict[str, list[tuple[int, str]]] = {}
    for i, r in enumerate(records[:args.queries]):
        subject, para = r.extra["subject"], r.paraphrases[0]
        if subject not in para:
            continue
        for name, form in forms(subject).items():
            if form is not None and name != "upper":
                queries.setdefault(name, []).append((i, para.replace(subject, form)))
    nbrs = [p for r in records[:args.queries] for p in r.neighbours]

    # Every key of every edit at every layer, flattened: group id, edit id, last-key flag.
    flat = torch.cat([g for gs in keys for g in gs], dim=1)  # [nL, K, d]
    sizes = torch.tensor([g.shape[1] for gs in keys for g in gs])
    gid = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    g_edit = torch.tensor([n for n, gs in enumerate(keys) for _ in gs])
    last = torch.cumsum(sizes, 0) - 1

    def score_all(texts):
        """``[nL, rules, P, N]`` best group score of each text against each edit."""
        st = states_of(model, tok, texts)
        out = np.full((len(LAYERS), len(RULES), len(texts), len(keys)), -1.0, dtype=np.float32)
        G = len(sizes)
        for p, s in enumerate(tqdm(st, desc="score", leave=False)):
            q = F.normalize(s - mean[:, None], dim=-1)  # [nL, S, d]
            best = torch.einsum("lsd,lkd->lsk", q, flat).amax(1)  # [nL, K]
            total = torch.zeros(len(LAYERS), G).index_add_(1, gid, best)
            worst = torch.full((len(LAYERS), G), 2.0).scatter_reduce(1, gid[None].expand(len(LAYERS), -1), best, "amin")
            per_rule = [total / sizes, torch.where(sizes >= 3, (total - worst) / (sizes - 1).clamp_min(1), total / sizes),
                        best[:, last]]
            for ri, g in enumerate(per_rule):
                e = torch.full((len(LAYERS), len(keys)), -1.0).scatter_reduce(
                    1, g_edit[None].expand(len(LAYERS), -1), g, "amax")
                out[:, ri, p] = e.numpy()
        return out

    nb = score_all(nbrs)
    result = {"bank": len(records), "queries": args.queries, "neighbours": len(nbrs), "fire": args.fire,
              "layers": {}}
    form_scores = {name: (np.array([i for i, _ in items]), score_all([q for _, q in items]))
                   for name, items in queries.items()}
    for li, layer in enumerate(LAYERS):
        for ri, rule in enumerate(RULES):
            top = nb[li, ri].max(1)
            t = float(np.quantile(top, 1 - args.fire))
            row = {"threshold": t}
            for name, (owners, S) in form_scores.items():
                own = S[li, ri, np.arange(len(owners)), owners]
                row[name] = float((own >= t).mean())
            result["layers"][f"L{layer}_{rule}"] = row
            print(f"L{layer:<2} {rule:<10}", json.dumps({k: round(v, 3) for k, v in row.items()}))
    dest = ROOT / "experiments/results/subject_layer_forms_probe.json"
    dest.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
