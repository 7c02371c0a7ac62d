"""The memoir layer's forward against the plain projection it wraps (SmolLM2-135M down_proj sizes,
d_out 576, D 1536, k 230), with stored edits and every sequence routed to one (the worst case):
decode (batch 1 and 8, one token) and prefill (512 tokens), shared and private memory, per kernel
mode.  The route is passed explicitly, as an inference stack does; routing itself is timed in
test_bench_retrieval."""
import pytest
import torch
import torch.nn as nn

from conftest import pedantic, sizes
from memoir import backends, ops
from memoir.layer import MemoirLayer
from memoir.private import PrivateBlocks
from memoir.route import Route

D_OUT, D_IN, K = 576, 1536, 230
EDITS = sizes(100, 1000)
SHAPES = {"decode b1": (1, 1), "decode b8": (8, 1), "prefill 512": (1, 512)}


def make_layer(memory: str, n_edits: int = EDITS) -> tuple[nn.Linear, MemoirLayer]:
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(D_IN, D_OUT, bias=False)
    layer = MemoirLayer(base, D_IN, D_OUT, top_k=K, threshold=0.0, aggregation="mean_decentered",
                        feature_scaling="none", permutation=torch.randperm(D_IN, generator=g),
                        background_mean=torch.zeros(D_IN), background_std=torch.ones(D_IN))
    with torch.no_grad():
        layer.memory.normal_(generator=g)
    if memory == "private":
        layer.private = PrivateBlocks(D_OUT, K, 16)
    for i in range(n_edits):
        cols = torch.randperm(D_IN, generator=g)[:K]
        dense = torch.zeros(D_IN, dtype=torch.bool)
        dense[cols] = True
        layer.bank.add(ops.pack_bits(dense), i)
        if layer.private is not None:
            layer.private.add(i, cols.sort().values, torch.randn(D_OUT, K, generator=g))
    return base, layer


@pytest.fixture(scope="module")
def layers():
    return {m: make_layer(m) for m in ("shared", "private")}


@pytest.mark.parametrize("mode", ["reference", "auto"])
@pytest.mark.parametrize("memory", ["plain", "shared", "private"])
@pytest.mark.parametrize("shape", list(SHAPES))
@torch.no_grad()
def test_layer_forward(benchmark, layers, shape, memory, mode):
    if memory == "plain" and mode == "auto":
        pytest.skip("the plain projection has no kernel mode")
    b, s = SHAPES[shape]
    a = torch.randn(b, s, D_IN)
    base, layer = layers["shared" if memory == "plain" else memory]
    route = Route(torch.randint(0, EDITS, (b,)), torch.ones(b))
    benchmark.group = f"layer {shape}"
    previous = backends.kernel_mode()
    backends.set_kernel_mode(mode)
    try:
        fn = (lambda: base(a)) if memory == "plain" else (lambda: layer(a, route=route))
        pedantic(benchmark, fn, rounds=sizes(10, 50))
    finally:
        backends.set_kernel_mode(previous)
    benchmark.extra_info.update(memory=memory, kernel_mode=mode, baseline=memory == "plain", batch=b, seq=s,
                                edits=EDITS)
