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
        rows.append((d["data"].split("/")[-1], d["method"], d["n_edits"], d, path.name))
    rows.sort(key=lambda r: (r[0], r[2], r[1]))
    print("| data | method | N | " + " | ".join(COLS) + " | s/edit | machine | file |")
    print("|---" * (len(COLS) + 6) + "|")
    for data, method, n, d, name in rows:
        m = d.get("machine", {})
        machine = f"{m.get('cpu', '?')} {m.get('torch_threads', '?')} thr"
        print(f"| {data} | {method} | {n} | " + " | ".join(fmt(d.get(c)) for c in COLS)
              + f" | {d.get('edit_seconds_mean', 0):.1f} | {machine} | {name} |")


if __name__ == "__main__":
    main()
