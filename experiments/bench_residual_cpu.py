"""CPU cost of the MEMOIR residual memory beside a SmolLM2 down-projection (no Triton).

Side by side, per batch x seq shape:
  (a) base      F.linear(a, W0)                                   -- plain down-proj
  (b) dense     F.linear(a, W0) + F.linear(a * M[:, None, :], Wm)  -- dense 0/1 masks
  (c) gathered  F.linear(a, W0) + bmm(a[..., cols], Wm[:, cols].T)  -- k gathered columns,
                Wm stored row-major [d, D] (the nn.Linear layout)
  (d) gathered_colmajor  the same with Wm stored column-major ([D, d] contiguous), so the
                k columns are k contiguous rows (index_select)
  (e) gathered_cached    (d) with the gathered [B, k, d] memory slice built once outside the
                timed call: a sequence's mask is fixed, so decode steps can reuse it
Every row carries an edit (worst case).  Reports min/median ms, ratio to (a), the fastest
residual form, and writes experiments/results/residual_cpu.json with machine info.

    python experiments/bench_residual_cpu.py [--dtype float32] [--repeats 40] [--threads 1 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from memoir.machine import machine_info

D_OUT, D_IN, K = 576, 1536, 439  # SmolLM2-135M mlp.down_proj, MEMOIR k
SHAPES = [(1, 1), (4, 1), (1, 32), (12, 30)]
OUT = Path(__file__).resolve().parent / "results" / "residual_cpu.json"


def _time_interleaved(fns: dict, repeats: int, min_time: float = 0.002) -> dict:
    """Per form: (min, median) wall time in ms.  Samples of the forms are interleaved
    round-robin so that load from other processes on a shared machine hits every form
    alike; each sample loops enough calls to last >= min_time s.  Ratios use the min
    (the least-disturbed estimate), the median is reported alongside."""
    inner = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        fn()
        inner[name] = max(1, int(min_time / max(time.perf_counter() - t0, 1e-7)))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner[name] * 1e3)
    return {n: (min(v), statistics.median(v)) for n, v in samples.items()}


def run(dtype: torch.dtype, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(D_OUT, D_IN, generator=g) / D_IN**0.5).to(dtype)
    wm = (torch.randn(D_OUT, D_IN, generator=g) / K**0.5).to(dtype)
    wm_t = wm.t().contiguous()  # [D, d]: column-major storage of the memory
    rows = []
    for b, s in SHAPES:
        a = torch.randn(b, s, D_IN, generator=g).to(dtype)
        cols = torch.stack([torch.randperm(D_IN, generator=g)[:K].sort().values for _ in range(b)])
        mask = torch.zeros(b, D_IN, dtype=dtype).scatter_(1, cols, 1.0)
        idx = cols[:, None, :].expand(b, s, K)

        def base():
            return F.linear(a, w0)

        def dense():
            return F.linear(a, w0) + F.linear(a * mask[:, None, :], wm)

        def gathered():
            return F.linear(a, w0) + torch.bmm(a.gather(2, idx), wm.t()[cols])

        def gathered_colmajor():
            mg = wm_t.index_select(0, cols.reshape(-1)).view(b, K, D_OUT)
            return F.linear(a, w0) + torch.bmm(a.gather(2, idx), mg)

        mg_cached = wm_t.index_select(0, cols.reshape(-1)).view(b, K, D_OUT).clone()

        def gathered_cached():
            return F.linear(a, w0) + torch.bmm(a.gather(2, idx), mg_cached)

        ref = dense()
        for fn in (gathered, gathered_colmajor, gathered_cached):
            assert torch.allclose(fn(), ref, atol=1e-3 if dtype == torch.float32 else 5e-2, rtol=1e-2)
        with torch.inference_mode():
            t = _time_interleaved({"base": base, "dense": dense, "gathered": gathered,
                                   "gathered_colmajor": gathered_colmajor,
                                   "gathered_cached": gathered_cached}, repeats)
        forms = ("dense", "gathered", "gathered_colmajor", "gathered_cached")
        per_call = ("dense", "gathered", "gathered_colmajor")  # no state kept between calls
        best = {n: v[0] for n, v in t.items()}
        rows.append({
            "batch": b, "seq": s, "tokens": b * s,
            "ms_min": {n: round(v[0], 4) for n, v in t.items()},
            "ms_median": {n: round(v[1], 4) for n, v in t.items()},
            "ratio_to_base": {n: round(best[n] / best["base"], 3) for n in forms},
            "fastest": min(per_call, key=lambda n: best[n]),
            "fastest_incl_cached": min(forms, key=lambda n: best[n]),
        })
    return rows


def _print(rows: list[dict], threads: int, dtype: str) -> None:
    print(f"SmolLM2 down_proj d={D_OUT} D={D_IN} k={K} {dtype}, {threads} thread(s); min ms (ratio to base)")
    print(f"{'BxS':>7} {'base':>8} {'dense':>16} {'gathered':>16} {'gathered_colmajor':>18} "
          f"{'gathered_cached':>16}  fastest (b-d) / incl. (e)")
    for r in rows:
        cell = lambda n: f"{r['ms_min'][n]:.3f} ({r['ratio_to_base'][n]:.2f}x)"  # noqa: E731
        print(f"{r['batch']:>3}x{r['seq']:<3} {r['ms_min']['base']:>8.3f} {cell('dense'):>16} "
              f"{cell('gathered'):>16} {cell('gathered_colmajor'):>18} {cell('gathered_cached'):>16}  {r['fastest']} / {r['fastest_incl_cached']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="torch thread counts to measure (default: 1 and torch's default)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    default_threads = torch.get_num_threads()
    threads = args.threads or sorted({1, default_threads})
    by_threads = {}
    for n in threads:
        torch.set_num_threads(n)
        rows = run(dtype, args.repeats)
        _print(rows, n, args.dtype)
        by_threads[str(n)] = rows
    torch.set_num_threads(default_threads)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    result = {
        "benchmark": "residual_cpu",
        "layer": {"d": D_OUT, "D": D_IN, "k": K, "model": "SmolLM2-135M mlp.down_proj"},
        "dtype": args.dtype,
        "forms": {
            "base": "F.linear(a, W0)",
            "dense": "F.linear(a, W0) + F.linear(a * M[:, None, :], Wm)",
            "gathered": "F.linear(a, W0) + bmm(a.gather(cols), Wm.t()[cols]); Wm row-major [d, D]",
            "gathered_colmajor": "same, Wm stored column-major [D, d]: index_select of k rows",
            "gathered_cached": "same, with Wm[:, cols] gathered once and reused (the mask is fixed per "
                               "sequence, so a generation can gather once and reuse it every decode step)",
        },
        "timing": "min over interleaved samples (median also given); ratios from the min",
        "all_rows_active": True,
        "machine": {
            **machine_info("cpu"),
            "torch_default_threads": default_threads,
            "load_average_at_end": load,
            "note": "shared machine: other processes may have been running",
        },
        "results_by_threads": by_threads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
