"""Probe: which stored edit does a new edit conflict with?  Measures the signals of the rule
``on_conflict`` uses (subject key score and bare-prompt TopHash mask overlap) on three kinds of
pairs, without editing:

* ``same_question``: two ZsRE records about one subject (the public file's groups ask one
  question in different words);
* ``other_relation``: a ZsRE prompt and a question about the same subject with another relation
  (built from a few fixed templates);
* ``other_subject``: two records about different subjects.

    python experiments/conflict_rule_probe.py --data ../shared/data/zsre/zsre_mend_eval_portability_gpt4.public.json --n 732
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random

import torch

from memoir import MemoirConfig, MemoirEditor, load_model
from memoir.eval.conflicts import subject_groups
from memoir.batching import build_batch
from memoir.eval.datasets import load_records
from memoir.ops import overlap_counts, popcounts

OTHER_RELATIONS = ("Who founded {}?", "In which country is {} located?", "When was {} born?",
                   "What language is spoken in {}?", "Who is the owner of {}?", "What is {} named after?")


PLACEHOLDER = "this thing"


def masks_of(editor, prompts):
    """Packed bare-prompt TopHash masks ``[n, W]`` (frozen model)."""
    masks = []
    for i in range(0, len(prompts), 16):
        batch = build_batch(editor.tokenizer, prompts[i:i + 16], device=editor.device)
        with editor.disabled(), editor.layer.capturing() as seen:
            editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        acts = seen[0].reshape(*batch.input_ids.shape, -1)
        masks.append(editor.layer.query_masks(acts, batch.prompt_mask)[2])
    return torch.cat(masks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=732)
    ap.add_argument("--preset", default="smollm2")
    ap.add_argument("--output", default="experiments/results/conflict_rule_probe.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    records, _ = load_records(args.data, "zsre", args.n)
    model, tok = load_model("smollm2")
    cfg = MemoirConfig(**{**MemoirConfig.preset(args.preset).to_dict(), "router": "subject"})
    editor = MemoirEditor(model, tok, cfg)
    groups = [m for m in subject_groups(records).values() if len(m) > 1]
    pairs = {"same_question": [], "other_relation": [], "other_subject": []}
    for m in groups:
        for a in m:
            for b in m:
                if a < b:
                    pairs["same_question"].append((records[a].prompt, records[b].prompt, records[a].extra["subject"]))
    for rec in records[:200]:
        subject = rec.extra["subject"]
        pairs["other_relation"].append((rec.prompt, rng.choice(OTHER_RELATIONS).format(subject), subject))
    for _ in range(400):
        a, b = rng.sample(range(len(records)), 2)
        if records[a].extra["subject"].lower() != records[b].extra["subject"].lower():
            pairs["other_subject"].append((records[a].prompt, records[b].prompt, records[a].extra["subject"]))
    out = {"n_records": len(records), "kinds": {}}
    from memoir.types import EditRequest
    from memoir.subject_router import SubjectKeys
    for kind, rows in pairs.items():
        olds = [r[0] for r in rows]
        news = [r[1] for r in rows]
        m_old, m_new = masks_of(editor, olds), masks_of(editor, news)
        overlap = (overlap_counts(m_new, m_old).diagonal().float() / popcounts(m_new).clamp_min(1)).tolist()
        # The relation alone: both prompts with their subject replaced by one neutral word.
        r_old = masks_of(editor, [o.replace(subj_, PLACEHOLDER) for o, _, subj_ in rows])
        r_new = masks_of(editor, [n.replace(subj_, PLACEHOLDER) for _, n, subj_ in rows])
        relation = (overlap_counts(r_new, r_old).diagonal().float() / popcounts(r_new).clamp_min(1)).tolist()
        subj = []
        for old, new, subject in rows:
            keys = SubjectKeys(editor.layer.subject.keys.shape[1])
            keys.mean = editor.layer.subject.mean
            with editor._nested.overriding(active=True):
                keys.add(0, editor._subject_keys(EditRequest(old, "x", subject)))
            states, own = editor._subject_states(texts=[new])
            subj.append(float(keys.scores(states, own, torch.tensor([0]))[0, 0]))
        out["kinds"][kind] = {"n": len(rows), "overlap": overlap, "relation_overlap": relation, "subject_score": subj}
        rq = torch.tensor(relation)
        print(kind, "relation-overlap quartiles",
              [round(float(v), 3) for v in rq.quantile(torch.tensor([.1, .25, .5, .75, .9]))])
        q = torch.tensor(overlap)
        print(kind, len(rows), "overlap quartiles", [round(float(v), 3) for v in q.quantile(torch.tensor([.1, .25, .5, .75, .9]))],
              "subject>=thr", round(sum(s >= cfg.subject_threshold for s in subj) / len(subj), 3))
    for t in (0.2, 0.3, 0.4, 0.5, 0.6):
        line = {k: sum((o >= t and s >= cfg.subject_threshold) for o, s in zip(v["overlap"], v["subject_score"])) / v["n"]
                for k, v in out["kinds"].items()}
        out.setdefault("rule_at", {})[str(t)] = line
        print("overlap >=", t, "and same subject:", {k: round(v, 3) for k, v in line.items()})
    for t in (0.3, 0.4, 0.5, 0.6, 0.7):
        line = {k: sum((o >= t and s >= cfg.subject_threshold) for o, s in zip(v["relation_overlap"], v["subject_score"]))
                / v["n"] for k, v in out["kinds"].items()}
        out.setdefault("relation_rule_at", {})[str(t)] = line
        print("relation overlap >=", t, "and same subject:", {k: round(v, 3) for k, v in line.items()})
    path = pathlib.Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
