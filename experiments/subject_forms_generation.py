"""Edited answers for paraphrases that write the subject in another form, end to end.

The first ``--n`` CounterFact edits (ROME format) are trained with the shipped preset, then every
paraphrase is asked again with its subject rewritten (the forms of subject_spelling_probe.py:
verbatim, upper, lower, four typos, the acronym) and answered greedily.  Reported per form, with
``subject_spellings`` on and off (the same trained edits, only the router's check toggled): the
share of paraphrases whose generation starts with the edit's target (Gen, generation EM) and the
share routed to their own edit; and for the neighbourhood prompts the share routed to any edit.

    PYTHONPATH=. python experiments/subject_forms_generation.py --n 100 \
        --output experiments/results/subject_forms_generation_n100.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from subject_spelling_probe import DATA, rewrites  # noqa: E402

from memoir import MemoirEditor, load_model  # noqa: E402
from memoir.batching import target_ids  # noqa: E402
from memoir.eval.datasets import load_records  # noqa: E402
from memoir.eval.metrics import exact_match  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def answers(editor, prompts, targets, batch=16):
    out = []
    for i in range(0, len(prompts), batch):
        budget = max(len(target_ids(editor.tokenizer, t)) for t in targets[i:i + batch]) + 2
        out += editor.generate(prompts[i:i + batch], max_new_tokens=budget)
    return [exact_match(o, t) for o, t in zip(out, targets)]


def measure(editor, records) -> dict:
    queries: dict[str, list[tuple[str, str, int]]] = {}
    for i, r in enumerate(records):
        subject = r.extra["subject"]
        for para in r.paraphrases:
            if subject in para:
                for kind, form in rewrites(subject).items():
                    queries.setdefault(kind, []).append((para.replace(subject, form), r.target, i))
    ids = [e.edit_id for e in editor.edits()]
    out = {}
    for kind, rows in queries.items():
        prompts, targets, owners = zip(*rows)
        routed = [x.edit_id for x in editor.retrieve(list(prompts))]
        out[kind] = {"queries": len(rows), "gen": round(sum(answers(editor, list(prompts), list(targets))) / len(rows), 4),
                     "routed_own": round(sum(r == ids[o] for r, o in zip(routed, owners)) / len(rows), 4)}
    neighbours = [n for r in records for n in r.neighbours]
    fired = [x.edit_id is not None for x in editor.retrieve(neighbours)]
    out["neighbours_fire"] = round(sum(fired) / len(fired), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default=str(ROOT / "experiments/results/subject_forms_generation_n100.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path, fmt = DATA["counterfact"]
    records, _ = load_records(path, fmt, limit=args.n)
    model, tok = load_model("smollm2")
    editor = MemoirEditor(model, tok)
    start = time.perf_counter()
    editor.edit_many([{"prompt": r.prompt, "target": r.target, "subject": r.extra["subject"]} for r in records],
                     progress=False)
    result = {"n": args.n, "preset": "smollm2", "edit_seconds": round(time.perf_counter() - start, 1)}
    for spellings in (True, False):
        editor.config = dataclasses.replace(editor.config, subject_spellings=spellings)
        result["spellings_on" if spellings else "spellings_off"] = measure(editor, records)
    pathlib.Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
