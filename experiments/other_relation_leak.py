"""Does an edit change the answers to other questions about its subject?

From the flat CounterFact file: per subject asked about in several records, the first record whose
relation class is known (``relation_gate_probe.relation_of``) is edited; every record of that subject
with another relation class is a query.  All edits are made one after another, then each query is
answered greedily (``max_new_tokens`` tokens) by the edited model and by the unedited one.

Reported: ``changed`` (the edited model's first word differs from the unedited one's), ``leaked``
(the answer contains the edit's new target), ``edit_rel`` (each edit prompt's greedy answer starts
with its target, a sanity check), and ``routed`` (the query reaches some edit).

    PYTHONPATH=. python experiments/other_relation_leak.py [--config memoir/presets/smollm2.yaml]
"""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys

import torch
from tqdm.auto import tqdm

from memoir import MemoirConfig, MemoirEditor, load_model

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from relation_gate_probe import DATA, ROOT, relation_of  # noqa: E402


def edits_and_queries(path: pathlib.Path, limit: int | None):
    groups = collections.defaultdict(list)
    for r in json.loads(path.read_text()):
        groups[r["subject"]].append(r)
    edits, queries = [], []
    for subject, recs in groups.items():
        known = [r for r in recs if relation_of(r["prompt"], subject) is not None]
        if len(known) < 2:
            continue
        edit = known[0]
        others = [r for r in known[1:] if relation_of(r["prompt"], subject) != relation_of(edit["prompt"], subject)]
        if others:
            edits.append(edit)
            queries.extend((len(edits) - 1, r) for r in others)
        if limit and len(edits) >= limit:
            break
    return edits, queries


def first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,;:!?\"'").lower() if words else ""


def answers(editor: MemoirEditor, prompts: list[str], n: int, batch: int = 16) -> list[str]:
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc="answers", unit="batch", leave=False):
        out.extend(editor.generate(prompts[i:i + batch], max_new_tokens=n))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "memoir/presets/smollm2.yaml"))
    ap.add_argument("--name", default="preset")
    ap.add_argument("--limit", type=int, default=None, help="at most this many edits")
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    edits, queries = edits_and_queries(DATA / "counterfact-edit.public.json", args.limit)
    model, tok = load_model("smollm2")
    editor = MemoirEditor(model, tok, MemoirConfig.load(args.config))
    q_prompts = [q["prompt"] for _, q in queries]
    editor.disable()
    before = answers(editor, q_prompts, args.max_new_tokens)
    editor.enable()
    editor.edit_many([{"prompt": e["prompt"], "target": e["target_new"], "subject": e["subject"]} for e in edits],
                     on_conflict="keep")
    after = answers(editor, q_prompts, args.max_new_tokens)
    own = answers(editor, [e["prompt"] for e in edits], args.max_new_tokens)
    routed = [int(r) >= 0 for r in editor.route(q_prompts).rows.tolist()]
    rows = []
    for (e, q), b, a, r in zip(queries, before, after, routed):
        target = edits[e]["target_new"]
        rows.append({"edit": edits[e]["prompt"], "target": target, "query": q["prompt"], "before": b, "after": a,
                     "changed": first_word(a) != first_word(b), "leaked": target.lower() in a.lower()
                     and target.lower() not in b.lower(), "routed": r})
    n = len(rows)
    report = {
        "config": args.name, "n_edits": len(edits), "n_queries": n,
        "edit_rel": round(sum(o.strip().lower().startswith(e["target_new"].lower()) for o, e in zip(own, edits))
                          / len(edits), 4),
        "routed": round(sum(r["routed"] for r in rows) / n, 4),
        "changed": round(sum(r["changed"] for r in rows) / n, 4),
        "leaked": round(sum(r["leaked"] for r in rows) / n, 4),
        "examples": [r for r in rows if r["changed"]][:20],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=1))
    out = pathlib.Path(args.output or ROOT / f"experiments/results/other_relation_leak_{args.name}.json")
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
