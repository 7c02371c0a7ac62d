"""Among the eligible edits, should the subject score pick before the mask overlap does?

The shipped rule routes a prompt to the eligible edit (subject score >= t) with the largest TopHash
mask overlap.  With an edit's subject given, the edits eligible together mostly share the subject
(scores tie near 1) and the overlap tells their relations apart.  Without a subject the keys are the
prompt's most specific tokens, several edits can pass the threshold with a paraphrase, and the
overlap of a CounterFact paraphrase ("<unrelated sentence>. <question>") often prefers another.
Compared: ``overlap`` (shipped) and ``near_best eps`` (only the eligible edits whose score is within
``eps`` of the best eligible score compete on overlap).  Bank: the 731 public CounterFact edits,
with and without their subjects (no training: routing reads only the frozen model).  Probes: every
paraphrase (``gen_own``: routed to its own edit).  A neighbourhood prompt fires under either rule
exactly when some edit is eligible for it (the best eligible edit always competes), so the rules
differ only in which edit a routed prompt reads.

    PYTHONPATH=. python experiments/subject_tiebreak_probe.py
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from subject_forms_probe import build_bank  # noqa: E402
from subject_routing_sim import DATA, score_matrices  # noqa: E402

from memoir import MemoirConfig, MemoirEditor, load_model  # noqa: E402
from memoir.eval.datasets import load_records  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
EPS = (None, 0.005, 0.01, 0.02, 0.05)


def decide(S, O, t, eps):
    eligible = S >= t
    if eps is not None:
        best = np.where(eligible, S, -2.0).max(1, keepdims=True)
        eligible &= S >= best - eps
    masked = np.where(eligible, O, -1.0)
    rows = masked.argmax(1)
    return np.where(masked[np.arange(len(rows)), rows] >= 0, rows, -1)


def main() -> None:
    torch.set_num_threads(1)
    path, fmt = DATA["counterfact"]
    records, _ = load_records(path, fmt)
    model, tok = load_model("smollm2")
    cfg = MemoirConfig.preset("smollm2")
    t = cfg.subject_threshold
    gen = [(i, p) for i, r in enumerate(records) for p in r.paraphrases]
    result = {"bank": len(records), "subject_threshold": t, "paraphrases": len(gen),
              "banks": {}}
    for with_subject in (True, False):
        editor = MemoirEditor(model, tok, cfg)
        build_bank(editor, records, with_subject=with_subject)
        Sg, Og = score_matrices(editor, [p for _, p in gen])
        editor.unload()
        owners = np.array([i for i, _ in gen])
        rows = {}
        for eps in EPS:
            name = "overlap" if eps is None else f"near_best {eps}"
            rg = decide(Sg, Og, t, eps)
            rows[name] = {"gen_own": float((rg == owners).mean()), "gen_other": float(((rg >= 0) & (rg != owners)).mean())}
            print("subject" if with_subject else "no subject", name, json.dumps(rows[name]))
        result["banks"]["subject" if with_subject else "no_subject"] = rows
    dest = ROOT / "experiments/results/subject_tiebreak_probe.json"
    dest.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
