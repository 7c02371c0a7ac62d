"""Markdown table of every evaluation JSON under benchmarks/results/eval/ (for the README).

    python benchmarks/summarise_eval.py > benchmarks/results/eval/summary.md
"""
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "eval"
COLS = ("rel", "gen", "loc", "mean", "rel_em", "gen_em", "rel_ppl", "route_gen", "route_loc_any")


def fmt(v):
    return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def main():
    rows = []
    for path in sorted(ROOT.glob("*.json")):
        d = json.loads(path.read_text())
        if "method" not in d:
            continue
        # File names are <data>_<run>_n<N>.json; <run> names the method and variant (memoir-protect).
        run = path.stem.split("_")[1]
        rows.append((path.stem.split("_")[0], run, d["n_edits"], d))
    rows.sort(key=lambda r: (r[0], r[2], r[1]))
    print("| data | run | N | " + " | ".join(COLS) + " | s/edit |")
    print("|---" * (len(COLS) + 4) + "|")
    for data, run, n, d in rows:
        print(f"| {data} | {run} | {n} | " + " | ".join(fmt(d.get(c)) for c in COLS)
              + f" | {d.get('edit_seconds_mean', 0):.1f} |")


if __name__ == "__main__":
    main()
