"""Generation throughput of the subject router against the mask router, side by side on SmolLM2.

Two editors on one model (attached in turn), each with a bank of ``--edits`` stored edits built from
public ZsRE and CounterFact prompts (masks and subject keys from the frozen model; the memory is left
at zero, which costs the same as trained columns), generate the same prompts greedily; the rounds
alternate between the routers so that machine load hits both alike.  Reports tokens/s per router and
the ratio subject / mask, batch 1 and batch 8.  Writes experiments/results/router_throughput.json.

    python experiments/bench_router_throughput.py --edits 1000 --threads 2
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch

from memoir import EditRequest, MemoirConfig, MemoirEditor, editing, load_model
from memoir.eval.datasets import load_records
from memoir.machine import machine_info

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
FILES = ((DATA / "zsre" / "zsre_mend_eval_portability_gpt4.public.json", "zsre"),
         (DATA / "counterfact" / "counterfact_portability_gpt4.public.json", "counterfact_rome"))


def stored_edits(files, n: int) -> list[EditRequest]:
    out = []
    for path, fmt in files:
        records, _ = load_records(path, fmt)
        out += [EditRequest(r.prompt, r.target, (r.extra or {}).get("subject")) for r in records]
    if len(out) < n:
        raise SystemExit(f"only {len(out)} public edits for --edits {n}")
    return out[:n]


def attach(model, tok, router: str, requests: list[EditRequest]) -> MemoirEditor:
    base = MemoirConfig.preset("smollm2").to_dict()
    cfg = MemoirConfig(**{**base, "router": router, "threshold": 0.4 if router == "mask" else 0.0})
    editor = MemoirEditor(model, tok, cfg)
    for r in requests:
        inputs = editing.encode_edit(editor, r)
        edit_id, _ = editor._store_mask(inputs.packed, r)
        if editor.layer.subject is not None:
            with editor._nested.overriding(active=True):
                editor.layer.subject.add(edit_id, editor._subject_keys(r))
    return editor


def tokens_per_second(editor, prompts, new_tokens: int) -> float:
    start = time.perf_counter()
    editor.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default=str(ROOT / "experiments" / "results" / "router_throughput.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2")
    requests = stored_edits(FILES, args.edits)
    prompts = [r.prompt for r in requests[:8]]
    banks = {}
    for router in ("mask", "subject"):  # build each bank once, keep its state, detach
        editor = attach(model, tok, router, requests)
        banks[router] = editor
        editor.unload()
    timings = {(router, b): [] for router in banks for b in (1, 8)}
    for _ in range(args.rounds):
        for router, editor in banks.items():
            editor.target.install(editor.layer)  # re-attach this router's memory layer
            editor._install_routing()
            for b in (1, 8):
                timings[(router, b)].append(tokens_per_second(editor, prompts[:b], args.new_tokens))
            editor.unload()
    rows = []
    for b in (1, 8):
        mask, subject = (statistics.median(timings[(r, b)]) for r in ("mask", "subject"))
        rows.append({"batch": b, "mask_tokens_per_s": mask, "subject_tokens_per_s": subject,
                     "ratio_subject_over_mask": subject / mask})
        print(f"batch {b}: mask {mask:.1f} tok/s, subject {subject:.1f} tok/s, ratio {subject / mask:.3f}")
    out = {"edits": args.edits, "new_tokens": args.new_tokens, "rounds": args.rounds, "rows": rows,
           "subject_keys": int(banks["subject"].layer.subject.keys.shape[0]), "machine": machine_info()}
    pathlib.Path(args.output).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
