"""Which tokens should stand for the subject of an edit given without one?

Without a ``subject`` the router keys an edit on the prompt tokens least like any background token
(``MemoirEditor._specific_tokens``, 3 tokens).  A subject is one contiguous name, and when it is a
single token ("Japan") two of the three picks are relation words ("capital", "located") that a
paraphrase may not repeat: its score (the mean of the keys' best cosines) then stays below the
threshold.  Compared here, on the public files with their subjects withheld (no training: routing
reads only the frozen model):

- ``least n``: the n tokens least like the background (n = 3 ships);
- ``span c``: the least-like token, grown into a contiguous run while the next token's likeness to
  the background is at most ``c`` (at most 6 tokens);
- ``span +d``: the same, grown while the next token is within ``d`` of the seed's likeness;
- each of them with the relation wordings of ``memoir/data/relation_templates.txt`` added to the
  background (``subject_fallback_relations``), so that rare relation words look ordinary.

Per rule: how many picked tokens lie in the withheld subject (precision, recall), a paraphrase's
eligibility for its own edit and whether it is routed there (best overlap among eligible edits, the
shipped rule), and the share of neighbourhood (CounterFact) / NQ (ZsRE) prompts for which some edit
is eligible (they would fire).  With subjects given, the same numbers are the reference row.

    PYTHONPATH=. python experiments/subject_inference_probe.py --dataset counterfact
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from subject_routing_sim import DATA  # noqa: E402

from memoir import EditRequest, MemoirConfig, MemoirEditor, editing, load_model, ops  # noqa: E402
from memoir import subject_router  # noqa: E402
from memoir.background import relation_texts  # noqa: E402
from memoir.batching import build_batch  # noqa: E402
from memoir.eval.datasets import load_records  # noqa: E402
from memoir.replay import keep_logits  # noqa: E402
from memoir.subject_router import SubjectKeys  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_SPAN = 6


def least(n):
    return lambda like: like.topk(min(n, len(like)), largest=False).indices.sort().values


def grow(like, ok):
    """Contiguous run around the least-like token, extended while ``ok(likeness)`` holds."""
    seed = int(like.argmin())
    lo = hi = seed
    while hi - lo + 1 < MAX_SPAN:
        left = like[lo - 1] if lo > 0 else None
        right = like[hi + 1] if hi + 1 < len(like) else None
        cands = [(float(v), s) for v, s in ((left, -1), (right, 1)) if v is not None and ok(float(v), float(like[seed]))]
        if not cands:
            break
        _, side = min(cands)
        lo, hi = (lo - 1, hi) if side < 0 else (lo, hi + 1)
    return torch.arange(lo, hi + 1)


def span_abs(c):
    return lambda like: grow(like, lambda v, s: v <= c)


def span_rel(d):
    return lambda like: grow(like, lambda v, s: v <= s + d)


RULES = {"least 3": least(3), "least 2": least(2), "least 1": least(1)}
RULES.update({f"span {c}": span_abs(c) for c in (0.6, 0.8)})
RULES.update({f"span +{d}": span_rel(d) for d in (0.2,)})



@torch.no_grad()
def own_states(editor, texts, batch=32):
    """Per text, the subject-layer states of its own tokens ``[m, d]`` (after the neutral prefix)."""
    out = []
    for i in range(0, len(texts), batch):
        s, o = editor._subject_states(texts=texts[i:i + batch])
        out += [s[j][o[j]].float().cpu() for j in range(s.shape[0])]
    return out


def padded(rows):
    m = max(r.shape[0] for r in rows)
    states = torch.zeros(len(rows), m, rows[0].shape[1])
    own = torch.zeros(len(rows), m, dtype=torch.bool)
    for j, r in enumerate(rows):
        states[j, : r.shape[0]], own[j, : r.shape[0]] = r, True
    return states, own


def subject_scores(keys: SubjectKeys, ids, rows, folded_rows, margin, batch=64):
    """``[P, N]`` as ``MemoirEditor._subject_scores`` computes them (better of the text as written and
    lower-cased, the latter ``margin`` less)."""
    out = []
    for i in range(0, len(rows), batch):
        s = keys.scores(*padded(rows[i:i + batch]), ids)
        f = keys.scores(*padded(folded_rows[i:i + batch]), ids) - margin
        out.append(torch.maximum(s, f))
    return torch.cat(out).numpy()


@torch.no_grad()
def overlaps(editor, prompts, batch=16):
    layer, rows = editor.layer, []
    for i in tqdm(range(0, len(prompts), batch), desc="masks", unit="batch"):
        b = build_batch(editor.tokenizer, prompts[i:i + batch], device=editor.device)
        with layer.calls.overriding(eligible=None, pinned=None), editor.disabled(), layer.capturing() as seen:
            editor.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False,
                         **keep_logits(editor.model, 1))
        _, _, packed = layer.query_masks(seen[0].reshape(*b.input_ids.shape, -1), b.prompt_mask)
        rows.append((ops.overlap_counts(packed, layer.bank.words).float()
                     / ops.popcounts(packed).clamp_min(1)[:, None]).cpu())
    return torch.cat(rows).numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", choices=sorted(DATA), default="counterfact")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    path, fmt = DATA[args.dataset]
    records, _ = load_records(path, fmt, limit=args.n)
    model, tok = load_model("smollm2")
    cfg = MemoirConfig.preset("smollm2")
    editor = MemoirEditor(model, tok, cfg)
    t, margin = cfg.subject_threshold, cfg.subject_casefold_margin
    gen = [(i, p) for i, r in enumerate(records) for p in r.paraphrases]
    nbr = [p for r in records for p in r.neighbours]
    owners = np.array([i for i, _ in gen])
    texts = [p for _, p in gen] + nbr
    cache = pathlib.Path(f"/tmp/subject_inference_{args.dataset}_{len(records)}.pt")
    if cache.exists():
        ids, prompt_rows, rows, folded, O, mean, background = torch.load(cache)
    else:
        # The bank's masks (independent of the keys), the own-token states of every prompt.
        for r in tqdm(records, desc="bank", unit="edit"):
            request = EditRequest.coerce({"prompt": r.prompt, "target": r.target, "subject": None})
            editor._store_mask(editing.encode_edit(editor, request).packed, request)
        ids = editor.layer.bank.ids.cpu()
        prompt_rows = own_states(editor, [r.prompt for r in records])
        rows = own_states(editor, texts)
        folded = own_states(editor, [x.lower() for x in texts])
        O = torch.from_numpy(overlaps(editor, [p for _, p in gen]))
        mean, background = editor.layer.subject.mean.cpu(), editor._background_states.cpu()
        torch.save((ids, prompt_rows, rows, folded, O, mean, background), cache)
    O = O.numpy()
    # The relation wordings the library reads as background (memoir/data/relation_templates.txt).
    relation_states = torch.cat(own_states(editor, relation_texts()))
    with_relations = torch.cat([background, F.normalize(relation_states - mean, dim=-1)])
    likes_rel = [(F.normalize(st - mean, dim=-1) @ with_relations.T).amax(dim=1) for st in prompt_rows]
    likes, in_subject, own_tokens = [], [], []
    for r, st in zip(records, prompt_rows):
        likes.append((F.normalize(st - mean, dim=-1) @ background.T).amax(dim=1))
        enc, _, own = subject_router.prefixed_batch(tok, [r.prompt])
        own_tokens.append(enc[0][own[0]])
        pos_all, subj = subject_router.subject_positions(tok, r.prompt, (r.extra or {}).get("subject"))
        own_pos = own[0].nonzero().flatten().tolist()
        in_subject.append(torch.tensor([p in subj for p in own_pos]))
    like_sub = torch.cat([lk[m] for lk, m in zip(likes, in_subject)])
    like_rest = torch.cat([lk[~m] for lk, m in zip(likes, in_subject)])
    result = {"dataset": args.dataset, "n": len(records), "subject_threshold": t, "paraphrases": len(gen),
              "neighbours": len(nbr),
              "likeness": {"subject_tokens": np.quantile(like_sub.numpy(), [0.1, 0.25, 0.5, 0.75, 0.9]).round(3).tolist(),
                           "other_tokens": np.quantile(like_rest.numpy(), [0.1, 0.25, 0.5, 0.75, 0.9]).round(3).tolist()},
              "rules": {}}
    print(json.dumps(result["likeness"]))

    def evaluate(groups_of):
        keys = SubjectKeys(mean.shape[0])
        keys.mean = mean
        for eid, groups in zip(ids.tolist(), groups_of):
            keys.add(eid, groups)
        S = subject_scores(keys, ids, rows, folded, margin)
        Sg, Sn = S[: len(gen)], S[len(gen):]
        masked = np.where(Sg >= t, O, -1.0)
        routed = np.where(masked.max(1) >= 0, masked.argmax(1), -1)
        per_edit = (Sn >= t).sum(0)
        return {"gen_eligible": float((Sg[np.arange(len(gen)), owners] >= t).mean()),
                "gen_own": float((routed == owners).mean()),
                "nbr_fire": float((Sn >= t).any(1).mean()),
                "edits_firing_most": [int(i) for i in np.argsort(-per_edit)[:5] if per_edit[i] > 0],
                "their_fires": sorted(per_edit.tolist(), reverse=True)[:5]}

    given = [[st[m]] if m.any() else [st[least(3)(lk)]] for st, lk, m in zip(prompt_rows, likes, in_subject)]
    result["rules"]["subject given"] = evaluate(given)
    print("subject given", json.dumps(result["rules"]["subject given"]))
    variants = [(name, rule, likes) for name, rule in RULES.items()]
    variants += [(name + ", relation background", rule, likes_rel) for name, rule in RULES.items()]
    for name, rule, like_set in variants:
        picks = [rule(lk) for lk in like_set]
        hit = [m[p] for p, m in zip(picks, in_subject)]
        row = {"precision": float(torch.cat(hit).float().mean()),
               "recall": float(sum(int(h.sum()) for h in hit) / max(1, sum(int(m.sum()) for m in in_subject))),
               "exact": float(np.mean([bool(h.all()) and int(h.sum()) == int(m.sum()) for h, m in zip(hit, in_subject)])),
               "tokens": float(np.mean([len(p) for p in picks]))}
        row.update(evaluate([[st[p]] for st, p in zip(prompt_rows, picks)]))
        row["their_keys"] = [tok.convert_ids_to_tokens(own_tokens[i][picks[i]].tolist())
                             for i in row["edits_firing_most"]]
        result["rules"][name] = row
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    result["seconds"] = time.perf_counter() - start
    dest = pathlib.Path(args.output or ROOT / f"experiments/results/subject_inference_probe_{args.dataset}.json")
    dest.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
