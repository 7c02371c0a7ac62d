"""Probe: does a subject key (hidden state of the subject's last token, neutral prefix) separate
paraphrases from same-relation neighbours, and does it survive other forms of the subject?

No editing: keys come from the edit prompts, queries are the records' paraphrases, neighbourhood
prompts and variants of the paraphrases (lower case, possessive, one-letter typo, subject dropped
to its last word).  For each layer: paraphrase top-1 among all edits, the score threshold that
keeps 95 % of paraphrases, and the share of neighbours / variants above it.

    python experiments/subject_key_probe.py --data ../shared/data/counterfact/counterfact_portability_gpt4.public.json --n 100
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random

import torch

from memoir import load_model
from memoir.background import default_background_texts
from memoir.eval.datasets import load_records

PREFIX = "Here is a question. "
SHORTLISTS = (1, 3, 10, 100)


def token_states(model, tok, texts, layers, batch_size=16):
    """Per text: (offsets [(start, end)], {layer: states [T, d]}) with the prefix prepended."""
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = [PREFIX + t for t in texts[i:i + batch_size]]
        enc = tok(chunk, return_tensors="pt", padding=True, return_offsets_mapping=True)
        offsets = enc.pop("offset_mapping")
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True, use_cache=False).hidden_states
        for b in range(len(chunk)):
            keep = enc["attention_mask"][b].bool()
            out.append(([tuple(o) for o in offsets[b][keep].tolist()], {L: hs[L][b][keep].float() for L in layers}))
    return out


def subject_position(text, subject, offsets):
    """Index of the subject's last token in PREFIX + text (the editor knows the subject)."""
    start = (PREFIX + text).find(subject)
    if start < 0:
        start = (PREFIX + text).lower().find(subject.lower())
    end = start + len(subject)
    pos = [j for j, (a, b) in enumerate(offsets) if a < end and b > start]
    return pos[-1] if pos else len(offsets) - 1


def variants(text, subject, rng):
    out = {"lower": text.lower()}
    if subject in text:
        out["possessive"] = text.replace(subject, subject + "'s", 1) if not subject.endswith("s") else None
        words = subject.split()
        w = max(words, key=len)
        if len(w) > 4:
            j = rng.randrange(1, len(w) - 2)
            typo = w[:j] + w[j + 1] + w[j] + w[j + 2:]
            out["typo"] = text.replace(w, typo, 1)
        if len(words) > 1:
            out["last_word"] = text.replace(subject, words[-1], 1)
    return {k: v for k, v in out.items() if v}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--layers", default="2,4,6,8,10,12,16")
    ap.add_argument("--output", default="experiments/results/subject_key_probe.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    layers = [int(x) for x in args.layers.split(",")]
    model, tok = load_model("smollm2")
    tok.padding_side = "right"
    recs = load_records(args.data, "auto", limit=args.n)[0]
    rng = random.Random(0)
    subjects = [r.extra.get("subject") for r in recs]
    bg = token_states(model, tok, default_background_texts()[:64], layers)
    mean = {L: torch.cat([s[L][len(tok(PREFIX)["input_ids"]):] for _, s in bg]).mean(0) for L in layers}
    edits = token_states(model, tok, [r.prompt for r in recs], layers)
    n_prefix = len(tok(PREFIX)["input_ids"])
    keys = {L: torch.stack([s[L][subject_position(r.prompt, subj, off)] for r, subj, (off, s) in
                            zip(recs, subjects, edits)]) - mean[L] for L in layers}
    queries = {"paraphrase": [], "neighbour": []}
    for i, r in enumerate(recs):
        for p in r.paraphrases:
            queries["paraphrase"].append((i, p))
            for name, v in variants(p, subjects[i], rng).items():
                queries.setdefault(name, []).append((i, v))
        for p in r.neighbours:
            queries["neighbour"].append((i, p))
    result = {"n": len(recs), "prefix": PREFIX, "layers": {}}
    states = {name: token_states(model, tok, [q for _, q in items], layers) for name, items in queries.items()}
    # TopHash masks of the shipped preset (no edits): the stage-one shortlist by mask overlap.
    from memoir import MemoirConfig, MemoirEditor
    from memoir.batching import build_batch
    from memoir.ops import overlap_counts

    tok.padding_side = "left"
    editor = MemoirEditor(model, tok, MemoirConfig.preset("smollm2"))

    def masks(texts):
        out = []
        for i in range(0, len(texts), 16):
            b = build_batch(tok, texts[i:i + 16])
            with torch.no_grad(), editor.disabled(), editor.layer.capturing() as seen:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            out.append(editor.layer.query_masks(seen[0], b.prompt_mask)[2])
        return torch.cat(out)

    bank = masks([r.prompt for r in recs])
    overlaps = {name: overlap_counts(masks([q for _, q in items]), bank) for name, items in queries.items()}
    editor.detach()
    tok.padding_side = "right"
    for L in layers:
        kn = torch.nn.functional.normalize(keys[L], dim=1)
        scores = {}
        shortlisted = {}
        for name, items in queries.items():
            best, short = [], {m: [] for m in SHORTLISTS}
            for j, ((i, _), (_, s)) in enumerate(zip(items, states[name])):
                q = torch.nn.functional.normalize(s[L][n_prefix:] - mean[L], dim=1)
                sim = (q @ kn.T).max(dim=0).values  # per edit: best query token
                best.append((float(sim[i]), float(sim.max()), int(sim.argmax()) == i))
                order = torch.argsort(overlaps[name][j], descending=True, stable=True)
                for m in SHORTLISTS:  # verify only the m edits with the largest mask overlap
                    cand = order[:m]
                    pick = int(cand[sim[cand].argmax()])
                    short[m].append((float(sim[pick]), pick == i))
            scores[name], shortlisted[name] = best, short
        own = torch.tensor([b[0] for b in scores["paraphrase"]])
        thr = float(torch.quantile(own, 0.05))
        row = {"paraphrase_top1": sum(b[2] for b in scores["paraphrase"]) / len(scores["paraphrase"]),
               "threshold_95": thr,
               "neighbour_above": sum(b[1] >= thr for b in scores["neighbour"]) / len(scores["neighbour"])}
        for name in queries:
            if name in ("paraphrase", "neighbour"):
                continue
            row[f"{name}_top1"] = sum(b[2] for b in scores[name]) / len(scores[name])
            row[f"{name}_recall"] = sum(b[2] and b[0] >= thr for b in scores[name]) / len(scores[name])
        for m in SHORTLISTS:
            own_m = torch.tensor([sc for sc, hit in shortlisted["paraphrase"][m]])
            thr_m = float(torch.quantile(own_m, 0.05))
            row[f"m{m}_paraphrase_routed"] = sum(hit and sc >= thr_m for sc, hit in shortlisted["paraphrase"][m]) / len(own_m)
            row[f"m{m}_neighbour_fire"] = sum(sc >= thr_m for sc, _ in shortlisted["neighbour"][m]) / len(shortlisted["neighbour"][m])
        result["layers"][L] = row
        print(L, json.dumps({k: round(v, 3) for k, v in row.items()}))
    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
