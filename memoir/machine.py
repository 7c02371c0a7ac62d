"""What a measurement ran on: one record shared by the evaluation runner and every benchmark.

Results are only comparable on the same machine and thread count, so each JSON under
``benchmarks/results/`` carries this record (CPU model and flags, torch threads, library
versions and, when CUDA is visible, the card).
"""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

# The CPU features the C++ popcount kernels dispatch on.
_RELEVANT_FLAGS = {"popcnt", "avx2", "avx512f", "avx512bw", "avx512_vpopcntdq"}


def _cpuinfo_field(name: str, cpuinfo: str | None = None) -> str | None:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), else what ``platform`` knows."""
    return _cpuinfo_field("model name", cpuinfo) or platform.processor() or platform.machine()


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The popcount-relevant instruction-set flags this CPU reports."""
    flags = _cpuinfo_field("flags", cpuinfo) or ""
    return sorted(set(flags.split()) & _RELEVANT_FLAGS)


# Peak memory bandwidth (GB/s, vendor spec) by GPU name pattern, most specific first (first match
# wins): what achieved GB/s is compared with.  A plain "H100" is the SXM card ("NVIDIA H100 80GB HBM3").
GPU_PEAK_GBPS = [
    (r"GH200", 4000.0),
    (r"H200", 4800.0),
    (r"H100.*NVL", 3900.0),
    (r"H100.*PCIe", 2000.0),
    (r"H100", 3350.0),
    (r"B200", 8000.0),
    (r"A100.*80GB.*PCIe", 1935.0),
    (r"A100.*80", 2039.0),
    (r"A100", 1555.0),
    (r"L40S", 864.0),
    (r"L40", 864.0),
    (r"L4\b", 300.0),
    (r"A10G", 600.0),
    (r"A10\b", 600.0),
    (r"RTX 4090", 1008.0),
    (r"RTX 3090", 936.0),
    (r"V100", 900.0),
    (r"T4\b", 320.0),
]


def gpu_peak_gbps(name: str) -> float | None:
    """The vendor's peak memory bandwidth of the GPU called ``name`` (GB/s), or None when unknown."""
    return next((gbps for pattern, gbps in GPU_PEAK_GBPS if re.search(pattern, name, re.IGNORECASE)), None)


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken in a way that must not sink a benchmark
        return None


def machine_info(device: str | torch.device | None = None) -> dict:
    """A JSON-ready description of this machine; ``device`` (default: CUDA when visible) adds the GPU."""
    info = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": None,
    }
    want_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if want_gpu:
        props = torch.cuda.get_device_properties(torch.device(device or "cuda"))
        info.update(
            gpu=props.name,
            gpu_sms=props.multi_processor_count,
            gpu_mem_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return info
