"""The bank, edit ids and preservation keys are module state: they move and serialise with the model."""
import pytest
import torch

from memoir import MemoirConfig, MemoirEditor
from memoir.batching import build_batch
from tiny import tiny_model

BACKGROUND = ["the city of paris is in france", "who wrote the book ?", "the river nile is long",
              "what is the capital of japan ?", "i live in london", "yes the answer is no"]
EDITS = [("the eiffel tower is located in the city of", "rome"),
         ("the great wall is located in the country of", "spain")]
PROBES = [EDITS[0][0], "who wrote the book ?", EDITS[1][0], "i live in london"]


def edited(**overrides):
    model, tok = tiny_model("llama")
    cfg = MemoirConfig(**{"n_iter": 40, "num_context_templates": 0, "threshold": 0.6, "preserve_neighbours": 2,
                          **overrides})
    editor = MemoirEditor(model, tok, cfg, background_texts=BACKGROUND)
    for prompt, target in EDITS:
        editor.edit(prompt, target)
    return editor


def predicts_target(editor, prompt, target) -> bool:
    batch = build_batch(editor.tokenizer, [prompt], target, device=editor.device)
    with torch.no_grad(), editor.prompt_span(batch.prompt_mask):
        logits = editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    sel = batch.labels[0, 1:] != -100
    return bool(torch.equal(logits[0, :-1].argmax(-1)[sel], batch.labels[0, 1:][sel]))


def routes(editor):
    return [r.edit_id for r in editor.retrieve(PROBES)]


def test_state_dict_holds_bank_ids_and_keys():
    editor = edited()
    prefix = editor.target.qualified_name + "."
    state = editor.model.state_dict()
    assert torch.equal(state[prefix + "bank.words"], editor.layer.bank.words)
    assert state[prefix + "bank.ids"].tolist() == editor.layer.bank.edit_ids == [0, 1]
    assert {prefix + "keys.cols_0", prefix + "keys.values_1"} <= set(state)
    assert torch.equal(state[prefix + "keys.values_1"], editor.keys.dense(1)[:, editor.keys._entry(1)[0]])


def test_state_dict_loads_into_a_fresh_editor():
    editor = edited()
    model, tok = tiny_model("llama")
    fresh = MemoirEditor(model, tok, editor.config, background_texts=BACKGROUND)
    assert len(fresh.layer.bank) == 0
    fresh.model.load_state_dict(editor.model.state_dict())
    assert routes(fresh) == routes(editor) == [0, None, 1, None]
    assert fresh.keys.ids() == [0, 1]
    assert fresh.generate(PROBES, max_new_tokens=3) == editor.generate(PROBES, max_new_tokens=3)


def test_dtype_round_trip_keeps_routing_answers_and_float32_state():
    editor = edited()
    want_routes = routes(editor)
    assert want_routes[0] == 0 and want_routes[1] is None
    assert all(predicts_target(editor, p, t) for p, t in EDITS)
    mean = editor.layer.background_mean.clone()
    keys = editor.keys.dense(0).clone()

    editor.model.to(torch.bfloat16)
    layer = editor.layer
    assert layer.memory.dtype == torch.bfloat16 and layer.base.weight.dtype == torch.bfloat16
    # Statistics and keys decide masks and protected directions: they stay float32, unrounded.
    assert layer.background_mean.dtype == torch.float32 and torch.equal(layer.background_mean, mean)
    assert torch.equal(editor.keys.dense(0), keys)
    assert layer.bank.words.dtype == torch.int64
    assert routes(editor) == want_routes
    assert all(predicts_target(editor, p, t) for p, t in EDITS)

    editor.model.to(torch.float32)
    assert layer.memory.dtype == torch.float32
    assert routes(editor) == want_routes
    assert all(predicts_target(editor, p, t) for p, t in EDITS)
    # Editing still works after the round trip (keys and bank took part in the move).
    editor.edit("the river nile is the longest river in", "italy")
    assert predicts_target(editor, "the river nile is the longest river in", "italy")


@pytest.mark.gpu
def test_to_cuda_carries_bank_and_keys():
    editor = edited()
    want_routes = routes(editor)
    want = editor.generate(PROBES, max_new_tokens=3)
    editor.model.to("cuda")
    layer = editor.layer
    assert layer.bank.words.is_cuda and layer.bank.ids.is_cuda and editor.keys.key_dim.is_cuda
    assert layer.keys._entry(0)[1].is_cuda and layer.background_mean.is_cuda
    assert routes(editor) == want_routes
    assert all(predicts_target(editor, p, t) for p, t in EDITS)
    assert editor.generate(PROBES, max_new_tokens=3) == want
    editor.model.to("cpu")
    assert routes(editor) == want_routes


def test_unrouted_rows_never_read_the_memory():
    """A memory holding NaN (or anything) does not reach rows that route to no edit."""
    import torch

    from memoir import memory_op
    from memoir.ops import pack_bits

    y, a = torch.randn(3, 4, 5), torch.randn(3, 4, 70)
    memory = torch.full((5, 70), float("nan"))
    bank = pack_bits(torch.rand(2, 70) > 0.5)
    rows = torch.tensor([-1, 1, -1])
    out = memory_op.routed_residual_reference(y, a, memory, bank, rows, 10)
    assert torch.equal(out[0], y[0]) and torch.equal(out[2], y[2])
    assert torch.isnan(out[1]).all()
    from memoir.kernels import residual_linear_gathered_torch, residual_linear_reference

    w0, cols = torch.randn(5, 70), torch.tensor([[1, 3], [0, 69], [2, 4]])
    active = torch.tensor([False, True, False])
    for fn in (residual_linear_reference, residual_linear_gathered_torch):
        got = fn(a, w0, None, memory, cols, active)
        base = torch.nn.functional.linear(a, w0)
        assert torch.equal(got[0], base[0]) and torch.equal(got[2], base[2]), fn.__name__
