"""Where should ``subject_threshold`` sit?  A ROC of the subject score on the public files.

Bank: every edit of a public file with its subject keys (no training: the score reads only the
frozen model).  Positives: every paraphrase (ZsRE: rephrase) scored against its own edit.
Negatives, each counted as the share of prompts for which *some* edit reaches the threshold:
- ``neighbours``: CounterFact neighbourhood prompts (same relation, another subject) / ZsRE NQ prompts;
- ``swapped``: synthetic neighbours, available at edit time: each edit prompt with its subject
  replaced by the subject of the next record, scored against the edit itself only;
- ``background``: the background texts the editor calibrates with.
For thresholds 0.80 ... 0.99 the curve is written to JSON and a PNG, with the spelling check's
constant contribution (it does not depend on the threshold) reported apart.

    PYTHONPATH=. python experiments/subject_threshold_roc.py --dataset counterfact
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from subject_forms_probe import build_bank  # noqa: E402
from subject_spelling_probe import DATA  # noqa: E402

from memoir import MemoirConfig, MemoirEditor, load_model, spelling  # noqa: E402
from memoir.background import default_background_texts  # noqa: E402
from memoir.eval.datasets import load_records  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
THRESHOLDS = [round(t, 2) for t in np.arange(0.80, 0.995, 0.01)]


@torch.no_grad()
def scores(editor, texts, batch=16) -> np.ndarray:
    out = []
    with editor._nested.overriding(active=True):
        for i in range(0, len(texts), batch):
            out.append(editor._subject_scores(texts[i:i + batch]).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(editor.layer.bank)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", choices=sorted(DATA), default="counterfact")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path, fmt = DATA[args.dataset]
    records, _ = load_records(path, fmt)
    model, tok = load_model("smollm2")
    editor = MemoirEditor(model, tok, MemoirConfig.preset("smollm2"))
    build_bank(editor, records, with_subject=True)
    ids = editor.layer.bank.edit_ids
    row = {e: i for i, e in enumerate(ids)}

    pos_texts, pos_rows = [], []
    for i, r in enumerate(records):
        if i not in row:
            continue  # its mask was stored again by a later record with the same prompt
        for p in r.paraphrases or [r.rephrase]:
            pos_texts.append(p)
            pos_rows.append(row[i])
    pos = scores(editor, pos_texts)[np.arange(len(pos_rows)), pos_rows]

    neighbours = [n for r in records for n in (r.neighbours or [r.loc_prompt])]
    neg = scores(editor, neighbours).max(axis=1)

    swapped_texts, swapped_rows = [], []
    for i, r in enumerate(records):
        subject, other = r.extra["subject"], records[(i + 1) % len(records)].extra["subject"]
        if i in row and subject in r.prompt and other.lower() != subject.lower():
            swapped_texts.append(r.prompt.replace(subject, other))
            swapped_rows.append(row[i])
    swapped = scores(editor, swapped_texts)[np.arange(len(swapped_rows)), swapped_rows]

    background = scores(editor, default_background_texts()).max(axis=1)

    index = spelling.SpellingIndex(tok)
    for i, r in enumerate(records):
        if i in row:
            index.add(i, r.extra["subject"])
    spelled_pos = np.array([ids[rw] in index.named(t) for t, rw in zip(pos_texts, pos_rows)])
    spelled_neg = np.array([bool(index.named(t)) for t in neighbours])
    curve = []
    for t in THRESHOLDS:
        curve.append({"threshold": t, "paraphrases_own": float((pos >= t).mean()),
                      "paraphrases_own_or_spelled": float(((pos >= t) | spelled_pos).mean()),
                      "neighbours_any": float((neg >= t).mean()),
                      "neighbours_any_or_spelled": float(((neg >= t) | spelled_neg).mean()),
                      "swapped_own": float((swapped >= t).mean()), "background_any": float((background >= t).mean())})
    result = {"dataset": args.dataset, "edits": len(records), "paraphrases": len(pos_texts),
              "neighbours": len(neighbours), "swapped": len(swapped_texts), "background": len(background),
              "shipped_threshold": editor.config.subject_threshold, "curve": curve}
    out = pathlib.Path(args.output or ROOT / f"experiments/results/subject_threshold_roc_{args.dataset}.json")
    out.write_text(json.dumps(result, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        for key, label in (("neighbours_any", "neighbourhood / NQ prompts"), ("swapped_own", "subject swapped"),
                           ("background_any", "background texts")):
            ax.plot([c[key] for c in curve], [c["paraphrases_own"] for c in curve], marker=".", label=label)
        shipped = next(c for c in curve if abs(c["threshold"] - result["shipped_threshold"]) < 1e-9)
        ax.scatter([shipped["neighbours_any"]], [shipped["paraphrases_own"]], color="k", zorder=3,
                   label=f"shipped {result['shipped_threshold']}")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel("negatives reaching some edit (share)")
        ax.set_ylabel("paraphrases reaching their own edit")
        ax.set_title(f"subject score ROC, {args.dataset} ({len(records)} edits)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass
    print(json.dumps(result["curve"][::3], indent=1))


if __name__ == "__main__":
    main()
