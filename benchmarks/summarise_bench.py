"""Markdown tables of a ``memoir bench`` summary (``summary.json``): the README's performance section.

    python benchmarks/summarise_bench.py benchmarks/results/bench/summary.json              # print
    python benchmarks/summarise_bench.py benchmarks/results/bench/summary.json --write README.md

``--write`` replaces the block between the file's ``<!-- bench-table -->`` markers.  Every ratio is
to the baseline of the same group measured in the same run (> 1: memoir is faster).
"""
import argparse
import json
import pathlib

from markdown_block import write_block


def _variant(row: dict) -> str:
    parts = [str(row[k]) for k in ("impl", "memory", "kernel_mode") if row.get(k)]
    for key in ("n", "d", "q"):
        if key in row:
            parts.append(f"{key}={row[key]}")
    return " ".join(parts) or row["name"]


def _ratios(row: dict) -> str:
    return ", ".join(f"{v:.3g}x {k}" for k, v in row.get("speedup_vs", {}).items())


def _extra(row: dict) -> str:
    out = []
    if "tokens_per_s" in row:
        out.append(f"{row['tokens_per_s']:.1f} tokens/s")
    if "gb_s" in row:
        out.append(f"{row['gb_s']:.2f} GB/s")
    if "share_of_read_bandwidth" in row:
        out.append(f"{100 * row['share_of_read_bandwidth']:.0f} % of read bandwidth")
    if "bytes_per_edit_total" in row:
        out.append(f"{row['bytes_per_edit_total'] / 1e3:.1f} kB per edit")
    return ", ".join(out)


def tables(summary: dict) -> list[str]:
    machine = summary.get("machine", {}).get("memoir", {})
    where = f"{machine.get('cpu', 'unknown CPU')}, {machine.get('cpu_count', '?')} cores, " \
            f"{machine.get('torch_threads', 1)} torch thread, {machine.get('gpu') or 'no GPU'}"
    lines = [f"Measured on: {where} ({summary.get('datetime', '')[:10]}{', quick sizes' if machine.get('bench_quick') else ''}).",
             "", "| group | variant | best time | vs baseline (same run) | figures |", "|---|---|---|---|---|"]
    for group, rows in summary["groups"].items():
        for row in rows:
            t = row["min_s"]
            shown = f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"
            variant = _variant(row) + (" (baseline)" if row.get("baseline") else "")
            lines.append(f"| {group} | {variant} | {shown} | {_ratios(row)} | {_extra(row)} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summary", help="summary.json written by memoir bench")
    ap.add_argument("--write", metavar="MARKDOWN", help="replace the table between this file's bench-table markers")
    ap.add_argument("--groups", help="comma-separated group-name prefixes to keep (default: all)")
    args = ap.parse_args()
    summary = json.loads(pathlib.Path(args.summary).read_text())
    if args.groups:
        keep = tuple(g.strip() for g in args.groups.split(","))
        summary["groups"] = {g: r for g, r in summary["groups"].items() if g.startswith(keep)}
    lines = tables(summary)
    if not args.write:
        print("\n".join(lines))
        return
    write_block(args.write, "bench-table", lines)
    print(f"updated {args.write}")


if __name__ == "__main__":
    main()
