"""``memoir bench``: run the pytest-benchmark suite under benchmarks/ and summarise it.

Writes ``<output>/bench.json`` (pytest-benchmark's full record, machine included),
``<output>/summary.json`` (per benchmark group: each variant's best time and its ratio to the
group's baseline measured in the same run; retrieval also as a share of the streaming bandwidth)
and ``<output>/summary.png``.  ``--quick`` picks the small sizes (a few minutes on 2 CPU cores).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def suite_dir() -> pathlib.Path:
    folder = ROOT / "benchmarks"
    if not (folder / "conftest.py").exists():
        raise FileNotFoundError(f"no benchmark suite at {folder}: memoir bench runs from a source checkout")
    return folder


def run(output, quick: bool = False, select: str | None = None, timeout: float | None = None) -> dict:
    """Run the suite (in a child pytest, so its settings cannot leak into the caller) and summarise."""
    out = pathlib.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "bench.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite_dir()),
           "-o", "addopts=", "-o", "timeout=1800", f"--benchmark-json={raw}", "--benchmark-columns=min,median,rounds"]
    if select:
        cmd += ["-k", select]
    env = {**os.environ, "MEMOIR_BENCH_QUICK": "1" if quick else "0"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the benchmark suite failed (exit {proc.returncode}); see the output above")
    summary = summarise(json.loads(raw.read_text()))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "summary.png")
    return summary


def run_vllm(output, python: str | None = None, timeout: float | None = None) -> dict:
    """vLLM generation with memoir's plugin against plain vLLM (benchmarks/bench_vllm.py), run with the
    Python that has vLLM (:func:`memoir.integrations.vllm.vllm_python`); writes ``<output>/vllm.json``."""
    from memoir.integrations.vllm import vllm_python

    dest = pathlib.Path(output) / "vllm.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    cmd = [vllm_python(python), str(suite_dir() / "bench_vllm.py"), "--output", str(dest)]
    proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the vLLM benchmark failed (exit {proc.returncode}); see the output above")
    return json.loads(dest.read_text())


def summarise(raw: dict) -> dict:
    """Per group: rows ``{name, min_s, median_s, ratio_to_baseline, ...extra_info}``; the baseline of a
    group is its row marked ``baseline`` (several baselines: each memoir row gets a ratio to each)."""
    groups: dict[str, list] = {}
    for b in raw["benchmarks"]:
        row = {"name": b["name"], "min_s": b["stats"]["min"], "median_s": b["stats"]["median"],
               "rounds": b["stats"]["rounds"], **b.get("extra_info", {})}
        groups.setdefault(b["group"] or b["name"], []).append(row)
    bandwidth = {r["kind"]: r["gb_s"] for r in groups.get("bandwidth", [])}
    for rows in groups.values():
        baselines = [r for r in rows if r.get("baseline")]
        for r in rows:
            if r.get("baseline"):
                continue
            # > 1: the baseline takes that many times longer (a speed-up); < 1: memoir costs more.
            r["speedup_vs"] = {b.get("impl") or b.get("memory") or b["name"]: b["min_s"] / r["min_s"]
                               for b in baselines}
            if "gb_s" in r and "read" in bandwidth:
                r["share_of_read_bandwidth"] = r["gb_s"] / bandwidth["read"]
    return {"machine": raw.get("machine_info", {}), "datetime": raw.get("datetime"), "groups": groups}


def plot(summary: dict, path: pathlib.Path) -> None:
    """One bar per memoir variant and group: its speed-up over each baseline (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional; the JSON carries every number
        return
    labels, values = [], []
    for group, rows in summary["groups"].items():
        for r in rows:
            for base, ratio in r.get("speedup_vs", {}).items():
                labels.append(f"{group}: {r.get('impl') or r.get('memory', '')} {r.get('kernel_mode', '')} vs {base}")
                values.append(ratio)
    if not values:
        return
    fig, ax = plt.subplots(figsize=(9, 0.22 * len(values) + 1))
    ax.barh(range(len(values)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(values)), labels, fontsize=6)
    ax.set_xlabel("baseline time / memoir time (same run)")
    cpu = summary["machine"].get("memoir", {}).get("cpu", "")
    ax.set_title(f"memoir bench ({cpu})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
