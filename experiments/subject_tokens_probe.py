"""Which subject key tells subjects apart in a bank of hundreds: the last subject token, or all of them?

With one key per edit (the hidden state of the subject's last token at an early layer) subjects that
end in the same word collide once the bank is large ("United Rugby Championship" reaches the key of
"1983 World Snooker Championship", "Eugene IV" the key of "Mehmed IV").  This probe keeps the state
of every subject token and scores a query for an edit by ``agg`` over the subject's tokens of the best
cosine of that token with any query token (``last``: the shipped key; ``mean`` / ``min``: every token
must be found).  For the whole public CounterFact file it reports, per rule and threshold, the share
of edit prompts and paraphrases that reach their own edit (subject and best mask overlap, as the
router decides; S/O from experiments/subject_routing_sim.py's cache) and of neighbourhood prompts
that reach any edit, and the same for ZsRE's NQ prompts.

    PYTHONPATH=. python experiments/subject_tokens_probe.py --dataset counterfact --n 731
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

from memoir import MemoirConfig, MemoirEditor, load_model, subject_router
from memoir.batching import build_batch
from memoir.eval.datasets import load_records

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from subject_routing_sim import DATA  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def subject_token_positions(tokenizer, prompt: str, subject: str) -> tuple[list[int], list[int]]:
    text = subject_router.PREFIX + prompt
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    at = text.find(subject, len(subject_router.PREFIX))
    if at < 0:
        at = text.lower().find(subject.lower(), len(subject_router.PREFIX))
    if at < 0:
        return enc["input_ids"], []
    end = at + len(subject)
    return enc["input_ids"], [j for j, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > at]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", choices=sorted(DATA), default="counterfact")
    ap.add_argument("--n", type=int, default=731)
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--joint", action="store_true", help="tokenise queries as PREFIX + text (as the keys are)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path, fmt = DATA[args.dataset]
    records, _ = load_records(path, fmt, limit=args.n)
    sim = np.load(f"/tmp/subject_sim_{args.dataset}_{args.n}.npz")
    O = sim["O"].astype(np.float32)
    model, tok = load_model("smollm2")
    cfg = MemoirConfig.load(ROOT / "experiments/configs/smollm2_subject.yaml")
    editor = MemoirEditor(model, tok, MemoirConfig(**{**cfg.to_dict(), "subject_layer": args.layer}))
    mean = editor.layer.subject.mean
    keys, owner = [], []  # one [m, d] block of subject-token states per edit
    for i, r in enumerate(tqdm(records, desc="keys")):
        ids, pos = subject_token_positions(tok, r.prompt, r.extra["subject"])
        ids_t = torch.tensor([ids])
        with editor._nested.overriding(active=True):
            states = subject_router.token_states(model, editor.target.layers, args.layer, ids_t,
                                                 torch.ones_like(ids_t))[0]
        if not pos:
            pos = [len(ids) - 1]
        keys.append(F.normalize(states[pos] - mean, dim=-1))
        owner += [i] * len(pos)
    flat = torch.cat(keys)
    owner_t = torch.tensor(owner)
    last_index = torch.tensor([sum(len(k) for k in keys[:i + 1]) - 1 for i in range(len(keys))])
    probes = []
    for i, r in enumerate(records):
        probes.append(("rel", i, r.prompt))
        probes += [("gen", i, p) for p in r.paraphrases]
        probes += [("nbr" if args.dataset == "counterfact" else "loc", i, p) for p in r.neighbours]
    scores = {"last": [], "mean": [], "min": []}
    n = len(records)
    for s in tqdm(range(0, len(probes), 16), desc="probes"):
        if args.joint:  # the query tokenised as PREFIX + text, as the keys are
            texts = [subject_router.PREFIX + p for _, _, p in probes[s:s + 16]]
            enc = tok(texts, padding=True, return_offsets_mapping=True, return_tensors="pt")
            own = (enc["offset_mapping"][..., 1] >= len(subject_router.PREFIX)) & enc["attention_mask"].bool()
            with editor._nested.overriding(active=True):
                states = subject_router.token_states(model, editor.target.layers, args.layer, enc["input_ids"],
                                                     enc["attention_mask"])
        else:
            batch = build_batch(tok, [p for _, _, p in probes[s:s + 16]])
            states, own = editor._subject_states(batch.input_ids, batch.attention_mask)
        q = F.normalize(states - mean, dim=-1)
        sim_tok = torch.einsum("bsd,kd->bsk", q, flat).masked_fill(~own[..., None], -1.0).amax(1)  # [B, K]
        scores["last"].append(sim_tok[:, last_index])
        sums = torch.zeros(sim_tok.shape[0], n).index_add_(1, owner_t, sim_tok)
        counts = torch.bincount(owner_t, minlength=n).float()
        scores["mean"].append(sums / counts)
        mins = torch.full((sim_tok.shape[0], n), 2.0).scatter_reduce(1, owner_t.expand_as(sim_tok), sim_tok, "amin")
        scores["min"].append(mins)
    kinds = np.array([k for k, _, _ in probes])
    own_edit = np.array([i for _, i, _ in probes])
    out = {"dataset": args.dataset, "n": n, "layer": args.layer, "rules": []}
    for agg, parts in scores.items():
        S = torch.cat(parts).numpy()
        for t in (0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97):
            masked = np.where(S >= t, O, -1.0)
            rows = masked.argmax(1)
            rows = np.where(masked[np.arange(len(rows)), rows] >= 0, rows, -1)
            row = {"agg": agg, "subject_threshold": t}
            for kind in ("rel", "gen"):
                sel = kinds == kind
                row[f"{kind}_own"] = float((rows[sel] == own_edit[sel]).mean())
            for kind in ("nbr", "loc"):
                sel = kinds == kind
                if sel.any():
                    row[f"{kind}_fire"] = float((rows[sel] >= 0).mean())
            out["rules"].append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    out["joint"] = args.joint
    dest = ROOT / (f"experiments/results/subject_tokens_probe_{args.dataset}_n{n}_L{args.layer}"
                   f"{'_joint' if args.joint else ''}.json")
    dest.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
