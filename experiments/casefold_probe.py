"""Which reading of a query should the subject router add to catch subjects written in capitals?

Bank: the subject keys of every edit of the public CounterFact file (no training: the keys read only
the frozen model).  Every neighbourhood prompt and paraphrase is scored against the bank read
- ``as_is`` (no second reading), ``lower`` (the whole query lower-cased; ``subject_casefold`` before),
- ``caps`` (only the words written in capitals, two letters or more, lower-cased);
- ``lower@t2``: the lower-cased reading, held to a stricter threshold ``t2``.
Reported per policy and subject threshold: ``nbr_fire`` (a neighbourhood prompt makes some edit
eligible: with no overlap floor that edit fires) and ``gen_own`` / ``upper_own`` / ``title_own`` (a
paraphrase, the paraphrase with its subject upper-cased, the paraphrase in title case makes its own
edit eligible).

    PYTHONPATH=. python experiments/casefold_probe.py
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re

import numpy as np
import torch
from tqdm.auto import tqdm

from memoir import EditRequest, MemoirConfig, MemoirEditor, load_model
from memoir.eval.datasets import load_records

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/counterfact/counterfact_portability_gpt4.public.json"
THRESHOLDS = (0.93, 0.95, 0.96)
FOLD_THRESHOLDS = (0.96, 0.97, 0.98)
CAPS = re.compile(r"\b[A-Z][A-Z0-9]+\b")


def caps_folded(text: str) -> str:
    return CAPS.sub(lambda m: m.group(0).lower(), text)


@torch.no_grad()
def subject_scores(editor: MemoirEditor, texts: list[str], bank_ids: torch.Tensor, batch: int = 64):
    rows = []
    for i in tqdm(range(0, len(texts), batch), desc="scores", unit="batch", leave=False):
        states, own = editor._subject_states(texts=texts[i:i + batch])
        rows.append(editor.layer.subject.scores(states, own, bank_ids).cpu())
    return torch.cat(rows).numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=731)
    ap.add_argument("--output", default=str(ROOT / "experiments/results/casefold_probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    records, _ = load_records(DATA, "counterfact_rome", limit=args.n)
    model, tok = load_model("smollm2")
    editor = MemoirEditor(model, tok, MemoirConfig.load(ROOT / "memoir/presets/smollm2.yaml"))
    for i, r in enumerate(tqdm(records, desc="keys", unit="edit")):
        request = EditRequest.coerce({"prompt": r.prompt, "target": r.target, "subject": r.extra["subject"]})
        with editor._nested.overriding(active=True):
            editor.layer.subject.add(i, editor._subject_keys(request))
    ids = torch.arange(len(records))
    nbr = [(i, p) for i, r in enumerate(records) for p in r.neighbours]
    gen = [(i, p) for i, r in enumerate(records) for p in r.paraphrases]
    upper = [(i, p.replace(r.extra["subject"], r.extra["subject"].upper()))
             for i, r in enumerate(records) for p in r.paraphrases[:1] if r.extra["subject"] in p]
    title = [(i, p.title()) for i, r in enumerate(records) for p in r.paraphrases[:1]]
    readings = {"as_is": lambda t: t, "lower": str.lower, "caps": caps_folded}
    sets = {"nbr": nbr, "gen": gen, "upper": upper, "title": title}
    cache = pathlib.Path(f"/tmp/casefold_probe_{len(records)}.npz")
    if cache.exists():
        z = np.load(cache)
        S = {tuple(k.split("|")): z[k] for k in z.files}
    else:
        S = {}
        for name, items in sets.items():
            texts = [t for _, t in items]
            for reading, fold in readings.items():
                S[name, reading] = subject_scores(editor, [fold(t) for t in texts], ids)
        np.savez_compressed(cache, **{f"{a}|{b}": v for (a, b), v in S.items()})
    # policy -> the readings it adds to the query as written, and the threshold each added reading
    # must reach (None: the subject threshold itself)
    policies = {"as_is": [], "lower": [("lower", None)], "caps": [("caps", None)],
                **{f"lower@{t2}": [("lower", t2)] for t2 in FOLD_THRESHOLDS}}
    out = {"n": len(records), "probes": {k: len(v) for k, v in sets.items()}, "policies": {}}
    for policy, parts in policies.items():
        rows = {}
        for t in THRESHOLDS:
            row = {}
            for name, items in sets.items():
                hit = S[name, "as_is"] >= t
                for reading, t2 in parts:
                    hit |= S[name, reading] >= (t if t2 is None else t2)
                if name == "nbr":
                    row["nbr_fire"] = float(hit.any(1).mean())
                else:
                    owner = np.array([i for i, _ in items])
                    row[f"{name}_own"] = float(hit[np.arange(len(items)), owner].mean())
            rows[str(t)] = row
        out["policies"][policy] = rows
    pathlib.Path(args.output).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["policies"], indent=1))


if __name__ == "__main__":
    main()
