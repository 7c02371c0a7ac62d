"""End-to-end check on SmolLM2: the same edits and generations through MEMOIR_KERNELS=reference
and =auto give identical top-1 tokens (teacher-forced on edit / rephrase / loc prompts) and
identical greedy generations.  On a CPU machine `auto` differs from `reference` in retrieval (C++
popcount kernels); on CUDA also in TopHash and the residual matmul (Triton).
Writes experiments/results/kernel_paths_<device>.json.

    python experiments/check_kernel_paths.py --n 20 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib

import torch

from memoir import MemoirConfig, MemoirEditor, backends, load_model, ops
from memoir.batching import build_batch
from memoir.machine import machine_info

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZSRE = ROOT.parent / "shared" / "data" / "zsre" / "zsre_mend_eval_portability_gpt4.public.json"


def top1(editor, prompts, targets):
    b = build_batch(editor.tokenizer, prompts, targets, device=editor.device)
    with torch.no_grad(), editor.prompt_span(b.prompt_mask):
        return editor.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.argmax(-1).cpu()


def run(mode, model, tok, records, device):
    backends.set_kernel_mode(mode)
    editor = MemoirEditor(copy.deepcopy(model).to(device), tok, MemoirConfig.preset("smollm2"))
    for r in records:
        editor.edit(r["src"], r["alt"])
    out = {}
    for field in ("src", "rephrase", "loc"):
        prompts = [r[field] for r in records]
        targets = [r["alt"] if field != "loc" else r["loc_ans"] for r in records]
        out[field] = top1(editor, prompts, targets)
    out["routes"] = [x.edit_id for x in editor.retrieve([r["rephrase"] for r in records])]
    out["generations"] = editor.generate([r["src"] for r in records] + [r["rephrase"] for r in records],
                                         max_new_tokens=8)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    records = json.loads(ZSRE.read_text())[: args.n]
    model, tok = load_model("smollm2")
    ref = run("reference", model, tok, records, args.device)
    auto = run("auto", model, tok, records, args.device)
    backend = ops.backend()
    result = {
        "n_edits": len(records),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "machine": machine_info(args.device),
        "auto_backend": backend,
        "identical_top1": {f: bool(torch.equal(ref[f], auto[f])) for f in ("src", "rephrase", "loc")},
        "identical_routes": ref["routes"] == auto["routes"],
        "identical_generations": ref["generations"] == auto["generations"],
    }
    result["all_identical"] = all(result["identical_top1"].values()) and result["identical_routes"] and \
        result["identical_generations"]
    path = ROOT / "experiments" / "results" / f"kernel_paths_{args.device}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
