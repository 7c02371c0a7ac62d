"""Subject-router decisions on a whole public file, without editing.

Routing reads only the frozen model (the subject keys at an early layer, the TopHash masks at the
edited layer's input), so which edit each probe prompt would read can be computed for a bank of
N stored edits without training any of them.  For every probe prompt (edit prompt, every
paraphrase, every neighbourhood / locality prompt) this stores two score matrices against the
bank, ``S`` (best subject-key cosine) and ``O`` (mask overlap ratio), then scores routing rules:

- ``subject t``: eligible when ``S >= t``, the eligible edit with the largest ``O`` (the shipped rule);
- ``subject t + floor f``: the same, and the chosen edit's ``O`` must reach ``f``.

Reported per rule: ``rel_own`` / ``gen_own`` (the prompt reads its own edit), ``loc_fire`` /
``nbr_fire`` (a locality / neighbourhood prompt reads any edit).

    PYTHONPATH=. python experiments/subject_routing_sim.py --dataset zsre --n 732
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from memoir import MemoirConfig, MemoirEditor, load_model
from memoir import editing, ops
from memoir.batching import build_batch
from memoir.subject_router import row_texts
from memoir.eval.datasets import load_records
from memoir.replay import keep_logits
from memoir import EditRequest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = {
    "zsre": (ROOT.parent / "shared/data/zsre/zsre_mend_eval_portability_gpt4.public.json", "zsre"),
    "counterfact": (ROOT.parent / "shared/data/counterfact/counterfact_portability_gpt4.public.json",
                    "counterfact_rome"),
}


@torch.no_grad()
def score_matrices(editor: MemoirEditor, prompts: list[str], batch_size: int = 16):
    """``(S, O)``: ``[P, N]`` subject scores and mask-overlap ratios of each prompt against the bank."""
    layer = editor.layer
    s_rows, o_rows = [], []
    for i in tqdm(range(0, len(prompts), batch_size), desc="probes", unit="batch"):
        batch = build_batch(editor.tokenizer, prompts[i:i + batch_size], device=editor.device)
        texts = row_texts(editor.tokenizer, batch.input_ids, batch.attention_mask)
        with editor._nested.overriding(active=True):
            s_rows.append(editor._subject_scores(texts).cpu())  # as the router scores them (casefold too)
        with layer.calls.overriding(eligible=None, pinned=None), editor.disabled(), layer.capturing() as seen:
            editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                         **keep_logits(editor.model, 1))
        acts = seen[0].reshape(*batch.input_ids.shape, -1)
        _, _, packed = layer.query_masks(acts, batch.prompt_mask)
        ratio = ops.overlap_counts(packed, layer.bank.words).float() / ops.popcounts(packed).clamp_min(1)[:, None]
        o_rows.append(ratio.cpu())
    return torch.cat(s_rows).numpy(), torch.cat(o_rows).numpy()


def decide(S, O, t, floor=0.0):
    """Bank row each prompt reads under ``subject t + floor f`` (-1: none)."""
    masked = np.where(S >= t, O, -1.0)
    rows = masked.argmax(1)
    best = masked[np.arange(len(rows)), rows]
    return np.where(best >= max(floor, 0.0), rows, -1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", choices=sorted(DATA), default="zsre")
    ap.add_argument("--n", type=int, default=732)
    ap.add_argument("--config", default=str(ROOT / "experiments/configs/smollm2_subject.yaml"))
    ap.add_argument("--cache", default=None, help="npz with S/O from an earlier run (skips the model)")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path, fmt = DATA[args.dataset]
    records, _ = load_records(path, fmt, limit=args.n)
    cache = pathlib.Path(args.cache or f"/tmp/subject_sim_{args.dataset}_{args.n}.npz")
    # probe prompts and what they are: (kind, record position)
    probes: list[tuple[str, int, str]] = []
    for i, r in enumerate(records):
        probes.append(("rel", i, r.prompt))
        probes += [("gen", i, p) for p in r.paraphrases]
        probes += [("nbr" if args.dataset == "counterfact" else "loc", i, p) for p in r.neighbours]
    start = time.perf_counter()
    if cache.exists():
        z = np.load(cache)
        S, O = z["S"], z["O"]
    else:
        model, tok = load_model("smollm2")
        editor = MemoirEditor(model, tok, MemoirConfig.load(args.config))
        for r in tqdm(records, desc="bank", unit="edit"):
            request = EditRequest.coerce({"prompt": r.prompt, "target": r.target,
                                          "subject": (r.extra or {}).get("subject")})
            inputs = editing.encode_edit(editor, request)
            edit_id, _ = editor._store_mask(inputs.packed, request)
            with editor._nested.overriding(active=True):  # the key pass is not a routed prompt
                editor.layer.subject.add(edit_id, editor._subject_keys(request))
        S, O = score_matrices(editor, [p for _, _, p in probes])
        np.savez_compressed(cache, S=S.astype(np.float16), O=O.astype(np.float16))
    kinds = np.array([k for k, _, _ in probes])
    owner = np.array([i for _, i, _ in probes])
    rules = []
    for t in (0.9, 0.93, 0.95, 0.96, 0.97, 0.98):
        for floor in (0.0, 0.2, 0.25, 0.3, 0.35, 0.4):
            rows = decide(S.astype(np.float32), O.astype(np.float32), t, floor)
            row = {"subject_threshold": t, "overlap_floor": floor}
            for kind in ("rel", "gen"):
                sel = kinds == kind
                row[f"{kind}_own"] = float((rows[sel] == owner[sel]).mean())
            for kind in ("loc", "nbr"):
                sel = kinds == kind
                if sel.any():
                    row[f"{kind}_fire"] = float((rows[sel] >= 0).mean())
            rules.append(row)
    out = {"dataset": args.dataset, "n": args.n, "config": args.config, "probes": {k: int((kinds == k).sum())
           for k in sorted(set(kinds))}, "seconds": time.perf_counter() - start, "rules": rules}
    dest = pathlib.Path(args.output or ROOT / f"experiments/results/subject_routing_sim_{args.dataset}_n{args.n}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1))
    for row in rules:
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
