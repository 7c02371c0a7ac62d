"""The pytest-benchmark suite (``memoir bench``): shared settings and one machine record.

``MEMOIR_BENCH_QUICK=1`` (``memoir bench --quick``) picks the small sizes, so the whole suite
finishes in a few minutes on a 2-core CPU (CI runs it as a smoke test).
"""
import os

import pytest
import torch

QUICK = os.environ.get("MEMOIR_BENCH_QUICK") == "1"


def sizes(quick, full):
    """The parameter values for this run: ``quick`` under --quick, else ``full``."""
    return quick if QUICK else full


def pytest_benchmark_update_machine_info(config, machine_info):
    from memoir.machine import machine_info as memoir_machine

    machine_info["memoir"] = memoir_machine()
    machine_info["memoir"]["bench_quick"] = QUICK
    machine_info["memoir"]["torch_threads"] = 1  # what every benchmark runs with (the _one_thread fixture)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every figure is for one torch thread (the per-core cost; ratios compare like with like)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pedantic(benchmark, fn, *, rounds=None, warmup=2):
    """``benchmark.pedantic`` with enough rounds for a stable median but a bounded time."""
    for _ in range(warmup):
        fn()
    return benchmark.pedantic(fn, rounds=rounds or (5 if QUICK else 20), iterations=1, warmup_rounds=0)
