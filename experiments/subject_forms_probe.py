"""Does the subject router find a subject written in another form?

Bank: every edit of the public CounterFact file (masks and subject keys, no training: routing reads
only the frozen model).  Queries: the first paraphrase of the first ``--queries`` records (it names
the subject verbatim), rewritten so that the subject appears
- ``verbatim`` (as in the data), ``lower`` / ``upper`` (other casing), ``possessive`` ("X's"),
- ``article`` ("the X"; or without its leading "the"), ``typo`` (two inner letters of its longest
  word swapped), ``last_word`` / ``first_word`` (shortened to one word, subjects of 2+ words only).
Reported per form and subject threshold: the share of queries for which the record's own edit is
eligible and the share routed to it.  Also ``no_subject``: the same bank where every edit is given
without a subject (keys fall back to the prompt's most distinctive tokens), verbatim paraphrases.

    PYTHONPATH=. python experiments/subject_forms_probe.py [--queries 200]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from subject_routing_sim import DATA, score_matrices  # noqa: E402

from memoir import EditRequest, MemoirConfig, MemoirEditor, editing, load_model  # noqa: E402
from memoir.eval.datasets import load_records  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
THRESHOLDS = (0.85, 0.9, 0.93, 0.95)


def typo(word: str) -> str:
    if len(word) < 4:
        return word
    i = len(word) // 2 - 1
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def forms(subject: str) -> dict[str, str | None]:
    words = subject.split()
    longest = max(range(len(words)), key=lambda i: len(words[i]))
    typo_words = list(words)
    typo_words[longest] = typo(words[longest])
    article = subject[4:] if subject.lower().startswith("the ") else "the " + subject
    out = {"verbatim": subject, "lower": subject.lower(), "upper": subject.upper(), "possessive": subject + "'s",
           "article": article, "typo": " ".join(typo_words) if typo_words != words else None,
           "last_word": words[-1] if len(words) > 1 else None, "first_word": words[0] if len(words) > 1 else None}
    return {k: (v if v != subject or k == "verbatim" else None) for k, v in out.items()}


def build_bank(editor, records, with_subject: bool):
    for r in tqdm(records, desc="bank", unit="edit"):
        subject = r.extra["subject"] if with_subject else None
        request = EditRequest.coerce({"prompt": r.prompt, "target": r.target, "subject": subject})
        inputs = editing.encode_edit(editor, request)
        edit_id, _ = editor._store_mask(inputs.packed, request)
        with editor._nested.overriding(active=True):
            editor.layer.subject.add(edit_id, editor._subject_keys(request))


def summarise(S, O, owners):
    out = {}
    for t in THRESHOLDS:
        masked = np.where(S >= t, O, -1.0)
        rows = masked.argmax(1)
        rows = np.where(masked[np.arange(len(rows)), rows] >= 0, rows, -1)
        eligible = S[np.arange(len(owners)), owners] >= t
        out[str(t)] = {"eligible": float(eligible.mean()), "routed_own": float((rows == owners).mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--config", default=str(ROOT / "experiments/configs/smollm2_subject.yaml"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    path, fmt = DATA["counterfact"]
    records, _ = load_records(path, fmt)
    model, tok = load_model("smollm2")
    cfg = MemoirConfig.load(args.config)
    result = {"config": args.config, "bank": len(records), "forms": {}}
    editor = MemoirEditor(model, tok, cfg)
    build_bank(editor, records, with_subject=True)
    queries: dict[str, list[tuple[int, str]]] = {}
    for i, r in enumerate(records[:args.queries]):
        subject, para = r.extra["subject"], r.paraphrases[0]
        if subject not in para:
            continue
        for name, form in forms(subject).items():
            if form is not None:
                queries.setdefault(name, []).append((i, para.replace(subject, form)))
    for name, items in queries.items():
        S, O = score_matrices(editor, [q for _, q in items])
        result["forms"][name] = {"n": len(items), **summarise(S, O, np.array([i for i, _ in items]))}
        print(name, json.dumps(result["forms"][name]))
    editor.unload()
    editor = MemoirEditor(model, tok, cfg)
    build_bank(editor, records, with_subject=False)
    items = queries["verbatim"]
    S, O = score_matrices(editor, [q for _, q in items])
    result["forms"]["no_subject"] = {"n": len(items), **summarise(S, O, np.array([i for i, _ in items]))}
    print("no_subject", json.dumps(result["forms"]["no_subject"]))
    dest = ROOT / "experiments/results/subject_forms_probe.json"
    dest.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
