"""The memory layer under torch.compile: the route is data, so one compiled graph serves routed and
unrouted sequences alike (no branch of either is baked in)."""
import pytest
import torch

from memoir import MemoirConfig, MemoirEditor, Route
from memoir.batching import build_batch
from tiny import tiny_model

BACKGROUND = ["the city of paris is in france", "who wrote the book ?", "the river nile is long",
              "what is the capital of japan ?", "i live in london", "yes the answer is no"]
EDITED, UNRELATED = "the eiffel tower is located in the city of", "who wrote the book ?"


@pytest.fixture(scope="module")
def editor():
    model, tok = tiny_model("llama")
    ed = MemoirEditor(model, tok, MemoirConfig(n_iter=40, num_context_templates=0, threshold=0.6),
                      background_texts=BACKGROUND)
    ed.edit(EDITED, "rome")
    assert [r.edit_id for r in ed.retrieve([EDITED, UNRELATED])] == [0, None]
    return ed


def logits(editor, prompt):
    b = build_batch(editor.tokenizer, [prompt])
    with torch.no_grad():
        return editor.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits


@pytest.mark.parametrize("first", [EDITED, UNRELATED])
def test_compiled_model_routes_like_eager_in_either_order(first):
    model, tok = tiny_model("llama")
    ed = MemoirEditor(model, tok, MemoirConfig(n_iter=40, num_context_templates=0, threshold=0.6),
                      background_texts=BACKGROUND)
    ed.edit(EDITED, "rome")
    eager = {p: logits(ed, p) for p in (EDITED, UNRELATED)}
    with ed.disabled():
        assert not torch.allclose(logits(ed, EDITED), eager[EDITED]), "the edit must change the logits"
    want = ed.generate([EDITED, UNRELATED], max_new_tokens=3)
    torch._dynamo.reset()
    ed.model.compile(backend="aot_eager")  # traces through AOTAutograd: exercises the fake kernel
    try:
        second = UNRELATED if first == EDITED else EDITED
        for prompt in (first, second, first):
            torch.testing.assert_close(logits(ed, prompt), eager[prompt], rtol=0, atol=1e-6)
        assert ed.generate([EDITED, UNRELATED], max_new_tokens=3) == want
    finally:
        torch._dynamo.reset()


def test_layer_with_an_explicit_route_is_one_graph(editor):
    """The inference-stack path (route passed in) compiles with fullgraph=True, and a graph traced on
    a routed batch gives the eager output for an unrouted one and for a mixed one."""
    layer = editor.layer
    torch.manual_seed(0)
    a = torch.randn(3, 5, layer.in_features)

    def step(x, rows):
        return layer(x, route=Route(rows, torch.zeros(rows.shape[0])))

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    try:
        for rows in ([0, 0, 0], [-1, -1, -1], [0, -1, 0]):
            rows = torch.tensor(rows)
            torch.testing.assert_close(compiled(a, rows), step(a, rows), rtol=0, atol=0)
        assert not torch.equal(step(a, torch.tensor([0, 0, 0])), step(a, torch.tensor([-1, -1, -1])))
    finally:
        torch._dynamo.reset()


def test_fake_kernel_and_autograd_of_the_op(editor):
    layer = editor.layer
    a = torch.randn(2, 4, layer.in_features, dtype=torch.float64)
    memory = layer.memory.detach().double().clone().requires_grad_(True)
    words, rows = layer.bank.words, torch.tensor([0, -1])
    y = torch.randn(2, 4, layer.out_features, dtype=torch.float64)
    torch.library.opcheck(torch.ops.memoir.routed_residual.default, (y, a, memory, words, rows, layer.top_k))
    a.requires_grad_(True)
    torch.autograd.gradcheck(lambda a_, m_: torch.ops.memoir.routed_residual(y, a_, m_, words, rows, layer.top_k),
                             (a, memory))


@pytest.mark.parametrize("mode", ["reference", "triton"])
@pytest.mark.parametrize("seq", [1, 7])
def test_op_kernels_match_the_reference(mode, seq, monkeypatch):
    """Odd sizes, a non-contiguous input, ties-free k-bit masks, an unrouted row, an empty bank."""
    from memoir import backends, memory_op
    from memoir.memory_op import routed_residual_reference
    from memoir.ops import pack_bits

    calls = []
    triton_residual = memory_op._triton_residual
    monkeypatch.setattr(memory_op, "_triton_residual", lambda *args: calls.append(1) or triton_residual(*args))

    if mode == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("MEMOIR_KERNELS", mode)
    backends.reload()
    gen = torch.Generator().manual_seed(seq)
    d_in, d_out, k = 70, 33, 9
    dense = torch.zeros(2, d_in, dtype=torch.bool)
    for r in range(2):
        dense[r, torch.randperm(d_in, generator=gen)[:k]] = True
    words = pack_bits(dense)
    a = torch.randn(3, d_in, seq, generator=gen).transpose(1, 2)  # [3, seq, D], non-contiguous
    memory = torch.randn(d_out, d_in, generator=gen)
    y = torch.randn(3, seq, d_out, generator=gen)
    rows = torch.tensor([1, -1, 0])
    got = torch.ops.memoir.routed_residual(y, a, memory, words, rows, k)
    want = routed_residual_reference(y, a, memory, words, rows, k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], y[1])  # the unrouted row is the base output, bit for bit
    assert len(calls) == (1 if mode == "triton" else 0)  # the mode chose the kernel
    empty = torch.zeros(0, words.shape[1], dtype=torch.int64)
    assert torch.equal(torch.ops.memoir.routed_residual(y, a, memory, empty, rows, k), y)
