"""How much of the ZsRE shortfall is in the data?  (no editing: reads the data and finished runs)

1. Subject conflicts: records of the public ZsRE file that share their subject with another edited
   record, and whether those records want the same answer (``memoir.eval.conflicts``).
2. Capacity: target tokens (= stored keys) against the edited layer's input width D, and how many
   edits own each memory column on average (N * k / D).
3. Every finished run on the file (``zsre_*_n<N>.json`` under benchmarks/results/eval/ and
   experiments/results/eval/): Rel, Gen and
   how often a rephrase is routed to its own edit, split by conflict class.

Writes experiments/results/zsre_conflicts.json.

    PYTHONPATH=. python experiments/zsre_conflicts.py [--n 732]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

from memoir.eval.conflicts import CLASSES, conflict_classes, split_by_class, subject_groups
from memoir.eval.datasets import load_dataset
from memoir.machine import machine_info

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZSRE = ROOT.parent / "shared" / "data" / "zsre" / "zsre_mend_eval_portability_gpt4.public.json"
RESULTS = ROOT / "benchmarks" / "results"


def capacity(records, model_name: str) -> dict:
    """Stored keys (target tokens) against the input width of the smollm2 preset's layer."""
    from memoir import MemoirConfig, load_model
    from memoir.batching import target_ids
    from memoir.models import locate_target

    model, tok = load_model(model_name)
    preset = MemoirConfig.preset("smollm2")
    target = locate_target(model, preset.layer)
    width, k = target.in_features, preset.top_k
    tokens = sum(len(target_ids(tok, r.target)) for r in records)
    return {"layer": target.layer_index, "D": width, "k": k, "target_tokens": tokens,
            "keys_per_dimension": tokens / width, "mean_owners_per_column": len(records) * k / width}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ZSRE))
    ap.add_argument("--n", type=int, default=732)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--runs", nargs="+", default=[str(RESULTS / "eval"), str(ROOT / "experiments" / "results" / "eval")],
                    help="folders of memoir eval JSONs")
    ap.add_argument("--output", default=str(ROOT / "experiments" / "results" / "zsre_conflicts.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    records = load_dataset(args.data, "zsre", limit=args.n)
    classes = conflict_classes(records)
    counts = {c: classes.count(c) for c in CLASSES}
    cap = capacity(records, args.model)

    runs = {}
    stem = pathlib.Path(args.data).stem
    for path in sorted(p for folder in args.runs for p in pathlib.Path(folder).glob(f"zsre_*_n{args.n}.json")):
        result = json.loads(path.read_text())
        if pathlib.Path(result.get("data", "")).stem != stem or result.get("offset", 0) != 0:
            continue
        runs[path.stem] = {"method": result["method"], "rel": result["rel"], "gen": result["gen"],
                           "by_class": split_by_class(result["records"], classes[: len(result["records"])])}

    out = {"data": pathlib.Path(args.data).name, "n": len(records), "classes": counts,
           "conflicting_subjects": sum(classes[m[0]] == "conflicting" for m in subject_groups(records).values()),
           "capacity": cap, "runs": runs, "seconds": time.perf_counter() - t0, "machine": machine_info()}
    pathlib.Path(args.output).write_text(json.dumps(out, indent=2))

    print(f"{len(records)} edits: " + ", ".join(f"{c} {n}" for c, n in counts.items())
          + f" ({out['conflicting_subjects']} subjects asked with different answers)")
    print(f"capacity: {cap['target_tokens']} target tokens for D = {cap['D']} ({cap['keys_per_dimension']:.2f} keys"
          f" per input dimension), each column owned by {cap['mean_owners_per_column']:.0f} edits on average")
    for name, r in runs.items():
        parts = [f"{c}: rel {v['rel']:.3f} gen {v['gen']:.3f}"
                 + (f" routed {v['route_gen_own']:.2f}" if v["route_gen_own"] is not None else "")
                 for c, v in r["by_class"].items() if v["n"]]
        print(f"{name:38s} " + " | ".join(parts))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
