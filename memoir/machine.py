"""What a measurement ran on: one record shared by the evaluation runner and every benchmark.

Results are only comparable on the same machine and thread count, so each JSON under
``benchmarks/results/`` carries this record (CPU model and flags, torch threads, library
versions and, when CUDA is visible, the card).
"""
from __future__ import annotations

import os
import platform
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
