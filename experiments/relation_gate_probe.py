"""Can a question key tell a rephrasing of an edit from another question about the same subject?

The subject router makes an edit eligible for every query that names its subject, so "Carlos
Valderrama plays as" gets the edit "Carlos Valderrama professionally plays the sport -> basketball".
Candidate signal: the state of the prompt's last token (the position that predicts the answer),
de-centred by the mean last-token state, compared (cosine) between the edit prompt and the query.

Positives: CounterFact (ROME layout) edit prompts and their paraphrases.  Negatives: pairs of records
of the flat CounterFact file that share a subject and ask different relations (relation classes
from the prompt wording, ``relation_of``; pairs with an unknown class are left out).  Reported per
layer: AUC, and the share of negatives below the thresholds that keep 95 / 97 / 99 % of positives.
The TopHash mask overlap of the edited layer (what the router compares) is reported beside it.

    PYTHONPATH=. python experiments/relation_gate_probe.py
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import pathlib

import numpy as np
import torch
from tqdm.auto import tqdm

from memoir import MemoirConfig, MemoirEditor, load_model
from memoir.eval.datasets import load_records

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/counterfact"
LAYERS = (4, 8, 12, 16, 20, 24, 27)
# Relation classes by wording (first match wins); CounterFact's templates, grouped coarsely.
RELATIONS = [
    ("twin_city", ["twin city"]),
    ("religion", ["religion", "follower of"]),
    ("language", ["language", "understand", "speaks", "spoke", "speaker", "writes in", "mother tongue", "written in"]),
    ("capital", ["capital"]),
    ("continent", ["continent", "{}, in =>", "is within"]),
    ("death_place", ["died", "expired", "succumbed", "passed away", "lost their life", "life ended"]),
    ("citizenship", ["citizen"]),
    ("sport", ["sport"]),
    ("instrument", ["instrument", "performing on", "{}, the =>", "plays the =>", "playing the =>"]),
    ("genre", ["performs", "genre", "play? They play", "plays =>", "known for performing"]),
    ("network", ["premiere", "aired on", "network", "debut", "released on"]),
    ("maker", ["created by", "product of", "developed by", "owner", "owned by", "product developed",
               "manufactured by", "{}, from =>", "produced by", "{}, by =>"]),
    ("headquarters", ["headquarter", "based in", "formed in", "created in", "founded in", "formulated in",
                      "started in", "developed in"]),
    ("field", ["area of", "domain of", "expertise", "specializes"]),
    ("named_after", ["named after", "named for", "called after"]),
    ("work_place", ["worked in", "found employment", "used to work", "work in", "works in", "employed in"]),
    ("member_of", ["member of", "affiliated with", "organization of"]),
    ("position", ["plays as", "position", "title of"]),
    ("occupation", ["works as", "profession", "{} is a =>", "occupation"]),
    ("origin", ["born", "native", "originat", "originally from", "was from", "is from", "{} from =>", "hails from"]),
    ("location", ["located", "location", "can be found", "is in =>", "Where is"]),
]


def relation_of(prompt: str, subject: str) -> str | None:
    template = prompt.replace(subject, "{}") + " =>"
    for name, phrases in RELATIONS:
        if any(p in template for p in phrases):
            return name
    return None


def other_relation_pairs(path: pathlib.Path) -> list[tuple[dict, dict]]:
    """(edit, query) record pairs with the same subject and different relation classes."""
    groups = collections.defaultdict(list)
    for r in json.loads(path.read_text()):
        groups[r["subject"]].append(r)
    pairs = []
    for subject, recs in groups.items():
        for a, b in itertools.permutations(recs, 2):
            ra, rb = relation_of(a["prompt"], subject), relation_of(b["prompt"], subject)
            if ra is not None and rb is not None and ra != rb:
                pairs.append((a, b))
    return pairs


@torch.no_grad()
def last_token_states(editor: MemoirEditor, texts: list[str]) -> dict:
    """Per layer in LAYERS (27: the edited layer's memory input), the last token's state [N, d];
    plus the TopHash mask ``packed`` of each text."""
    out = {layer: [] for layer in LAYERS}
    out["packed"] = []
    model, tok = editor.model, editor.tokenizer
    for text in tqdm(texts, desc="states", unit="text", leave=False):
        ids = tok(text, return_tensors="pt").input_ids
        with editor.disabled(), editor.layer.capturing() as seen:
            hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        for layer in LAYERS[:-1]:
            out[layer].append(hs[layer][0, -1].float())
        a = seen[0].reshape(1, ids.shape[1], -1)
        out[LAYERS[-1]].append(a[0, -1].float())
        span = torch.ones(1, ids.shape[1], dtype=torch.bool)
        out["packed"].append(editor.layer.query_masks(a, span)[2][0])
    return {k: torch.stack(v) for k, v in out.items()}


def separation(pos: np.ndarray, neg: np.ndarray) -> dict:
    auc = float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
    res = {"auc": round(auc, 4), "pos_median": round(float(np.median(pos)), 4),
           "neg_median": round(float(np.median(neg)), 4)}
    for keep in (0.95, 0.97, 0.99):
        t = float(np.quantile(pos, 1 - keep))
        res[f"neg_gated@keep{int(keep * 100)}"] = round(float((neg < t).mean()), 4)
        res[f"threshold@keep{int(keep * 100)}"] = round(t, 4)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=731)
    ap.add_argument("--cache", default=None, help="keep the states in this file (a rerun reads them)")
    ap.add_argument("--output", default=str(ROOT / "experiments/results/relation_gate_probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    records, _ = load_records(DATA / "counterfact_portability_gpt4.public.json", "counterfact_rome", limit=args.n)
    pairs = other_relation_pairs(DATA / "counterfact-edit.public.json")
    model, tok = load_model("smollm2")
    editor = MemoirEditor(model, tok, MemoirConfig.load(ROOT / "memoir/presets/smollm2.yaml"))

    pos_a = [r.prompt for r in records for _ in r.paraphrases]
    pos_b = [p for r in records for p in r.paraphrases]
    neg_a, neg_b = [a["prompt"] for a, _ in pairs], [b["prompt"] for _, b in pairs]
    texts = sorted(set(pos_a + pos_b + neg_a + neg_b))
    index = {t: i for i, t in enumerate(texts)}
    cache = pathlib.Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        states = torch.load(cache)
    else:
        states = last_token_states(editor, texts)
        if cache is not None:
            torch.save(states, cache)

    def cos(layer, xs, ys):
        s = states[layer]
        s = torch.nn.functional.normalize(s - s.mean(0), dim=-1)
        return (s[[index[x] for x in xs]] * s[[index[y] for y in ys]]).sum(-1).numpy()

    def cos_layer_scaled(xs, ys):  # as the memory layer de-centres its input (background mean and std)
        layer = editor.layer
        s = (states[LAYERS[-1]] - layer.background_mean) / layer.background_std
        s = torch.nn.functional.normalize(s, dim=-1)
        return (s[[index[x] for x in xs]] * s[[index[y] for y in ys]]).sum(-1).numpy()

    def overlap(xs, ys):
        p = states["packed"]
        a, b = p[[index[x] for x in xs]], p[[index[y] for y in ys]]
        from memoir.ops import overlap_counts
        return np.array([int(overlap_counts(a[i:i + 1], b[i:i + 1])[0, 0]) for i in range(len(a))]) / editor.layer.top_k

    report = {"n_positive_pairs": len(pos_a), "n_negative_pairs": len(neg_a), "signals": {}}
    for layer in LAYERS:
        name = f"last_token_L{layer}" + (" (memory input)" if layer == LAYERS[-1] else "")
        report["signals"][name] = separation(cos(layer, pos_a, pos_b), cos(layer, neg_a, neg_b))
    report["signals"]["last_token_L27_layer_scaling"] = separation(cos_layer_scaled(pos_a, pos_b),
                                                                   cos_layer_scaled(neg_a, neg_b))
    report["signals"]["tophash_overlap_L27"] = separation(overlap(pos_a, pos_b), overlap(neg_a, neg_b))
    print(json.dumps(report, indent=1))
    pathlib.Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
