"""Markdown table of every evaluation JSON under benchmarks/results/eval/ (for the README).

    python benchmarks/summarise_eval.py            # print it
    python benchmarks/summarise_eval.py --readme   # replace the table between README's eval-table markers
"""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "eval"
COLS = ("rel", "gen", "loc", "mean", "rel_em", "gen_em", "rel_ppl", "route_gen", "route_loc_any")


def fmt(v):
    return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def table() -> list[str]:
    rows = []
    for path in sorted(ROOT.glob("*.json")):
        d = json.loads(path.read_text())
        if "method" not in d:
            continue
        # File names are <data>_<run>_n<N>.json; <run> names the method and variant (memoir-protect).
        run = path.stem.split("_")[1]
        rows.append((path.stem.split("_")[0], run, d["n_edits"], d))
    rows.sort(key=lambda r: (r[0], r[2], r[1]))
    lines = ["| data | run | N | " + " | ".join(COLS) + " | s/edit |", "|---" * (len(COLS) + 4) + "|"]
    for data, run, n, d in rows:
        lines.append(f"| {data} | {run} | {n} | " + " | ".join(fmt(d.get(c)) for c in COLS)
                     + f" | {d.get('edit_seconds_mean', 0):.1f} |")
    return lines


def main():
    lines = table()
    if "--readme" not in sys.argv[1:]:
        print("\n".join(lines))
        return
    readme = ROOT.parents[2] / "README.md"
    text = readme.read_text()
    start, end = "<!-- eval-table -->\n", "<!-- /eval-table -->"
    if start not in text or end not in text:
        raise SystemExit(f"{readme}: eval-table markers not found")
    head, rest = text.split(start, 1)
    readme.write_text(head + start + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])
    print(f"updated {readme} ({len(lines) - 2} runs)")


if __name__ == "__main__":
    main()
