"""Markdown table of the evaluation JSON files in one or more folders.

    python benchmarks/summarise_eval.py                                  # print the headline runs
    python benchmarks/summarise_eval.py experiments/results/eval         # print the ablations
    python benchmarks/summarise_eval.py --write docs/results.md          # refresh its eval-table block

File names are ``<data>_<run>_n<N>.json``; ``<run>`` names the method and variant (``memoir-private``).
"""
import argparse
import json
import pathlib

from markdown_block import write_block

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLS = ("rel", "gen", "gen_all", "loc", "nbr_spec", "nbr_fire", "mean", "rel_em", "gen_em", "route_gen")


def fmt(v):
    return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def table(folders) -> list[str]:
    rows = []
    for folder in folders:
        for path in sorted(pathlib.Path(folder).glob("*.json")):
            d = json.loads(path.read_text())
            if "method" not in d:
                continue
            data, run = path.stem.split("_")[:2]
            rows.append((data, d["n_edits"], run, d))
    rows.sort(key=lambda r: r[:3])
    lines = ["| data | run | N | " + " | ".join(COLS) + " | s/edit |", "|---" * (len(COLS) + 4) + "|"]
    for data, n, run, d in rows:
        lines.append(f"| {data} | {run} | {n} | " + " | ".join(fmt(d.get(c)) for c in COLS)
                     + f" | {d.get('edit_seconds_mean', 0):.1f} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", default=[str(ROOT / "benchmarks" / "results" / "eval")])
    ap.add_argument("--write", metavar="MARKDOWN", help="replace the table between this file's eval-table markers")
    args = ap.parse_args()
    lines = table(args.folders)
    if not args.write:
        print("\n".join(lines))
        return
    write_block(args.write, "eval-table", lines)
    print(f"updated {args.write} ({len(lines) - 2} runs)")


if __name__ == "__main__":
    main()
