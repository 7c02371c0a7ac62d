"""End to end: the same edits give the same top-1 tokens through every kernel path.

``reference`` (pure PyTorch), ``auto`` (C++ retrieval on CPU) and ``triton`` (Triton TopHash
selection and residual kernels, run by the interpreter on CPU) on a tiny model.
"""
import copy

import pytest
import torch

from memoir import MemoirConfig, MemoirEditor, backends
from memoir.batching import build_batch
from test_engine import BACKGROUND
from tiny import tiny_model

EDITS = [("the eiffel tower is located in the city of", "rome"), ("the capital of japan is", "berlin"),
         ("who wrote the book ?", "paris")]
PROBES = [p for p, _ in EDITS] + ["the eiffel tower is in the city of", "what is the capital of france ?"]


def run(mode, monkeypatch, model, tok, feature_scaling):
    monkeypatch.setenv("MEMOIR_KERNELS", mode)
    backends.reload()
    cfg = MemoirConfig(n_iter=8, num_context_templates=1, threshold=0.5, top_k=40, layer=2,
                       feature_scaling=feature_scaling)
    editor = MemoirEditor(copy.deepcopy(model), tok, cfg, background_texts=BACKGROUND)
    for p, t in EDITS:
        editor.edit(p, t)
    batch = build_batch(tok, PROBES, "rome")
    with torch.no_grad(), editor.prompt_span(batch.prompt_mask):
        top1 = editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.argmax(-1)
    routes = [(r.edit_id, round(r.score, 6)) for r in editor.retrieve(PROBES)]  # the score checks the mask
    gens = editor.generate(PROBES, max_new_tokens=3)
    return top1, routes, gens, editor.layer.memory.detach().clone()


@pytest.mark.parametrize("feature_scaling", ["none", "std"])
def test_reference_auto_and_triton_agree(monkeypatch, feature_scaling):
    pytest.importorskip("triton")
    model, tok = tiny_model("llama")
    ref = run("reference", monkeypatch, model, tok, feature_scaling)
    for mode in ("auto", "triton"):
        got = run(mode, monkeypatch, model, tok, feature_scaling)
        assert torch.equal(got[0], ref[0]), mode
        assert got[1] == ref[1] and got[2] == ref[2], mode
        torch.testing.assert_close(got[3], ref[3], rtol=1e-4, atol=1e-5)
    assert any(r is not None for r, _ in ref[1]) and any(r is None for r, _ in ref[1])
