"""GPU benchmark of the MEMOIR Triton kernels on a LLaMA-3-8B-shaped layer.

Layer: mlp.down_proj with d = 4096 outputs, D = 14336 inputs, MEMOIR k = 4096, bf16.

* residual: ``memoir.kernels.residual_linear`` (vendor GEMM base + Triton residual) vs the
  plain down-projection ``F.linear(a, W0)``, for decode batch 1, 8, 64 (one token per
  row, every row with its own edit) and a 2048-token prefill; the variant picked by
  shape and the other variants, with the memory stored row-major ([d, D], nn.Linear
  layout) and column-major ([D, d] passed as ``.t()``).  Overhead = t / t_base - 1;
  achieved GB/s = minimum bytes / time, vs the card's peak bandwidth.
* tophash: ``memoir.kernels.tophash`` vs the PyTorch path (prompt_features +
  torch.topk + permutation + scatter + pack_bits) on the same inputs.

Every case is checked against the PyTorch path before it is timed.  Writes
``benchmarks/results/triton_<card>.json``.

    python benchmarks/bench_triton.py            # on a CUDA GPU
    TRITON_INTERPRET=1 python benchmarks/bench_triton.py --smoke   # tiny shapes, CPU
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

if "--smoke" in sys.argv and not os.environ.get("TRITON_INTERPRET"):
    try:
        import torch as _t

        if not _t.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # must be set before kernels are defined
    except Exception:  # pragma: no cover
        pass

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memoir import kernels  # noqa: E402
from memoir.kernels import choose_variant, residual_linear, residual_linear_gathered_torch, tophash  # noqa: E402
from memoir.machine import gpu_peak_gbps, machine_info  # noqa: E402
from memoir.ops import pack_bits  # noqa: E402
from memoir.tophash import make_permutation, prompt_features  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ----------------------------------------------------------------------------- timing
def bench(fn, smoke: bool) -> float:
    """Median milliseconds."""
    if smoke:  # interpreter: correctness of the harness, not speed
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- residual
def residual_cases(cfg, smoke: bool, dev: str, dtype) -> list[dict]:
    d, D, k = cfg["d"], cfg["D"], cfg["k"]
    es = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device="cpu").manual_seed(0)
    w0 = (torch.randn(d, D, generator=g) / D**0.5).to(dev, dtype)
    mem_row = (torch.randn(d, D, generator=g) / k**0.5).to(dev, dtype)  # [d, D] row-major
    mem_col = mem_row.t().contiguous().t()  # same values, column-major storage
    out = []
    for name, b, s in cfg["residual_shapes"]:
        a = torch.randn(b, s, D, generator=g).to(dev, dtype)
        cols = torch.stack([torch.randperm(D, generator=g)[:k].sort().values for _ in range(b)]).to(dev)
        active = torch.ones(b, dtype=torch.bool, device=dev)
        rows = b * s
        chosen = choose_variant(b, s, D, k)
        variants = ["gathered", "masked"] + (["gemv"] if rows <= 8 else [])
        t_base = bench(lambda: F.linear(a, w0), smoke)
        base_bytes = (d * D + rows * D + rows * d) * es
        # minimum extra bytes: each memory column some row uses, read once
        extra_bytes = int(torch.unique(cols).numel()) * d * es
        entry = {
            "case": name, "batch": b, "seq": s, "tokens": rows, "chosen_variant": chosen,
            "base_ms": round(t_base, 5),
            "base_GBps": round(base_bytes / (t_base * 1e-3) / 1e9, 1),
            "min_bytes_base": base_bytes, "min_bytes_residual_extra": extra_bytes,
            "runs": [],
        }
        ref = residual_linear_gathered_torch(a, w0, None, mem_row, cols, active).float()
        for layout, mem in (("row_major", mem_row), ("col_major", mem_col)):
            for v in variants:
                y = residual_linear(a, w0, None, mem, cols, active, variant=v)
                _sync()
                err = (y.float() - ref).abs().max().item()
                scale = ref.abs().max().item()
                assert err <= 0.05 * max(1.0, scale), f"{name} {layout} {v}: max err {err} (scale {scale})"
                t = bench(lambda: residual_linear(a, w0, None, mem, cols, active, variant=v), smoke)
                entry["runs"].append({
                    "memory_layout": layout, "variant": v, "chosen": v == chosen,
                    "ms": round(t, 5), "overhead_vs_base": round(t / t_base - 1.0, 4),
                    "achieved_GBps": round((base_bytes + extra_bytes) / (t * 1e-3) / 1e9, 1),
                    "max_abs_err_vs_torch": err,
                })
        t_torch = bench(lambda: residual_linear_gathered_torch(a, w0, None, mem_col, cols, active), smoke)
        t_dense = bench(lambda: F.linear(a, w0) + F.linear(a * _mask(cols, D, dtype)[:, None, :], mem_row), smoke)
        entry["torch_gathered_ms"] = round(t_torch, 5)
        entry["torch_dense_masked_ms"] = round(t_dense, 5)
        out.append(entry)
        del a
    return out


def _mask(cols, D, dtype):
    return torch.zeros(cols.shape[0], D, dtype=dtype, device=cols.device).scatter_(1, cols, 1.0)


# ----------------------------------------------------------------------------- tophash
def tophash_torch(acts, span, bg, k, perm):
    feat = prompt_features(acts, span, "mean_decentered", bg)
    top = feat.abs().topk(k, dim=-1).indices
    cols = perm[top].sort(dim=-1).values
    dense = torch.zeros(feat.shape, dtype=torch.bool, device=feat.device).scatter_(1, cols, True)
    return cols, pack_bits(dense)


def tophash_cases(cfg, smoke: bool, dev: str, dtype) -> list[dict]:
    D, k = cfg["D"], cfg["k"]
    g = torch.Generator(device="cpu").manual_seed(1)
    perm = make_permutation(D, 0).to(dev)
    bg = (torch.randn(D, generator=g) * 0.1).to(dev)
    out = []
    for name, b, s in cfg["tophash_shapes"]:
        # dyadic values: sums are exact, so kernel and torch must agree bit for bit
        acts = (torch.randint(-512, 513, (b, s, D), generator=g).float() / 64).to(dev, dtype)
        span = torch.ones(b, s, dtype=torch.bool, device=dev)
        span[:, : s // 4] = False  # e.g. a chat template prefix outside the prompt
        cols, packed = tophash(acts, span, bg, k, perm)
        from memoir.tophash import masks_from_features

        rc, _, rp = masks_from_features(prompt_features(acts, span, "mean_decentered", bg), k, perm)
        assert torch.equal(cols, rc) and torch.equal(packed, rp), f"tophash mismatch in {name}"
        t_k = bench(lambda: tophash(acts, span, bg, k, perm), smoke)
        t_t = bench(lambda: tophash_torch(acts, span, bg, k, perm), smoke)
        out.append({
            "case": name, "batch": b, "seq": s, "kernel_ms": round(t_k, 5), "torch_ms": round(t_t, 5),
            "speedup": round(t_t / t_k, 3), "matches_oracle": True,
        })
    return out


# ----------------------------------------------------------------------------- main
FULL = {
    "d": 4096, "D": 14336, "k": 4096,
    "residual_shapes": [("decode_b1", 1, 1), ("decode_b8", 8, 1), ("decode_b64", 64, 1), ("prefill_2048", 1, 2048)],
    "tophash_shapes": [("prompt_b1_s32", 1, 32), ("prompt_b8_s32", 8, 32), ("prompt_b64_s32", 64, 32),
                       ("prefill_b1_s2048", 1, 2048)],
}
SMOKE = {
    "d": 48, "D": 200, "k": 57,
    "residual_shapes": [("decode_b1", 1, 1), ("decode_b8", 8, 1), ("decode_b64", 64, 1), ("prefill_20", 1, 20)],
    "tophash_shapes": [("prompt_b1_s4", 1, 4), ("prompt_b8_s4", 8, 4), ("prefill_b1_s20", 1, 20)],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs under TRITON_INTERPRET=1 on CPU")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not kernels.available():
        sys.exit("Triton kernels cannot run here: need CUDA, or --smoke with TRITON_INTERPRET=1")
    cuda = torch.cuda.is_available() and not kernels.interpreting()
    if not cuda and not args.smoke:
        sys.exit("no CUDA GPU: run with --smoke (interpreter, tiny shapes)")
    dev = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    cfg = SMOKE if args.smoke else FULL
    card = torch.cuda.get_device_name() if cuda else "triton-interpreter-cpu"
    peak = gpu_peak_gbps(card) if cuda else None

    res = residual_cases(cfg, args.smoke, dev, dtype)
    th = tophash_cases(cfg, args.smoke, dev, dtype)

    print(f"card: {card}  peak {peak} GB/s  layer d={cfg['d']} D={cfg['D']} k={cfg['k']} {args.dtype}")
    print(f"{'case':>14} {'base ms':>9} {'variant':>9} {'layout':>10} {'ms':>9} {'overhead':>9} {'GB/s':>8} {'%peak':>6}")
    for e in res:
        for r in e["runs"]:
            pct = f"{100 * r['achieved_GBps'] / peak:.0f}" if peak else "-"
            mark = "*" if r["chosen"] else " "
            print(f"{e['case']:>14} {e['base_ms']:>9.4f} {r['variant']:>8}{mark} {r['memory_layout']:>10} "
                  f"{r['ms']:>9.4f} {100 * r['overhead_vs_base']:>8.1f}% {r['achieved_GBps']:>8.1f} {pct:>6}")
    print(f"{'tophash case':>18} {'kernel ms':>10} {'torch ms':>10} {'speedup':>8}")
    for e in th:
        print(f"{e['case']:>18} {e['kernel_ms']:>10.4f} {e['torch_ms']:>10.4f} {e['speedup']:>8.2f}")

    result = {
        "benchmark": "triton_kernels",
        "smoke": args.smoke,
        "card": card,
        "peak_GBps": peak,
        "layer": {k: cfg[k] for k in ("d", "D", "k")},
        "dtype": args.dtype,
        "timing": "triton.testing.do_bench median (L2 flushed between reps)" if not args.smoke
        else "one wall-clock call in the interpreter (not a performance number)",
        "notes": "residual = cuBLAS base + Triton residual; overhead_vs_base = t / t(F.linear(a, W0)) - 1; "
                 "achieved_GBps = (W0 + activations + min active memory bytes) / t; * = variant chosen by shape",
        "machine": machine_info(),
        "residual": res,
        "tophash": th,
    }
    out = args.out
    if out is None:
        out = (Path(tempfile.gettempdir()) / "triton_smoke.json") if args.smoke else RESULTS / f"triton_{slug(card)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
