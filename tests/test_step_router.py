"""StepRouter: requests served as flat multi-request steps read the memory as generate() reads it."""
import pytest
import torch
from transformers import DynamicCache

from memoir import MemoirConfig, MemoirEditor
from memoir.integrations.step_router import StepRouter
from test_subject_router import BACKGROUND
from tiny import tiny_model

FACTS = [("the capital of japan is", "rome paris", "japan"),
         ("the eiffel tower is located in the city of", "london", "eiffel tower")]
PROMPTS = ["the capital of japan is", "what is the capital of japan ?", "the capital of spain is",
           "the eiffel tower is located in the city of", "who wrote the book ?"]


def make_editor(**overrides):
    model, tok = tiny_model("llama")
    cfg = MemoirConfig(**{"n_iter": 40, "num_context_templates": 0, "threshold": 0.3, "router": "subject",
                          "subject_layer": 2, "subject_threshold": 0.9, "memory": "private",
                          "stop_after_target": True, "block_gain": 2.0, "on_conflict": "keep", **overrides})
    editor = MemoirEditor(model, tok, cfg, background_texts=BACKGROUND)
    for prompt, target, subject in FACTS:
        assert editor.edit(prompt, target, subject=subject).converged
    return editor


class EmulatedEngine:
    """A serving engine in miniature: each request keeps its own KV cache, and every pass of the
    edited layer is one flat step handed to a StepRouter (as vLLM's op does), with the request's
    key, token offsets and processed-token count."""

    def __init__(self, editor, monkeypatch):
        self.editor, self.router = editor, StepRouter(editor)
        self.step = None
        layer = editor.layer

        def flat_forward(a, route=None):
            ids, context, key = self.step
            s = a.shape[1]
            y = layer.base(a)
            out = self.router.residual(y.reshape(s, -1), a.reshape(s, -1), ids, torch.tensor([0, s]),
                                       torch.tensor([context]), torch.tensor([key]))
            return out.reshape(y.shape)

        monkeypatch.setattr(layer, "forward", flat_forward)

    def start(self, key, prompt):
        ids = self.editor.tokenizer(prompt, return_tensors="pt").input_ids[0]
        return {"key": key, "ids": ids, "cache": DynamicCache(), "done": 0, "out": [], "next": ids}

    @torch.no_grad()
    def advance(self, req):
        self.step = (req["next"], req["done"], req["key"])
        with self.editor._nested.overriding(active=True):  # not a generate() call: no prompt routing hooks
            logits = self.editor.model(input_ids=req["next"][None], past_key_values=req["cache"], use_cache=True).logits
        req["done"] += req["next"].numel()
        token = int(logits[0, -1].argmax())
        req["out"].append(token)
        req["next"] = torch.tensor([token])

    def text(self, req):
        return self.editor.tokenizer.decode(req["out"], skip_special_tokens=True)


@pytest.mark.parametrize("memory", ["private", "shared"])
def test_interleaved_requests_read_the_memory_as_generate_does(memory, monkeypatch):
    editor = make_editor(memory=memory)
    n = 5
    expected = editor.generate(PROMPTS, max_new_tokens=n)
    assert expected[0].strip().startswith("rome paris") and expected[3].strip().startswith("london")
    with editor.disabled():
        assert editor.generate([PROMPTS[2]], max_new_tokens=n) == [expected[2]], "the neighbour stays unedited"
    engine = EmulatedEngine(editor, monkeypatch)
    # Requests start at different steps and decode interleaved, in reverse order of arrival.
    reqs = [engine.start(100 + i, p) for i, p in enumerate(PROMPTS)]
    for step in range(n + len(reqs)):
        for req in reversed(reqs[: step + 1]):
            if len(req["out"]) < n:
                engine.advance(req)
    assert [engine.text(r) for r in reqs] == expected


def test_one_flat_step_of_several_requests_equals_each_request_alone():
    editor = make_editor()
    router, layer = StepRouter(editor), editor.layer
    tok = editor.tokenizer
    torch.manual_seed(0)
    ids = [tok(p, return_tensors="pt").input_ids[0] for p in PROMPTS[:4]]
    acts = [torch.randn(len(i), layer.in_features) for i in ids]
    # First steps, one request at a time (keys 0..3): the prompts.
    alone = []
    for key, (i, a) in enumerate(zip(ids, acts)):
        y = layer.base(a)
        alone.append(router.residual(y, a, i, torch.tensor([0, len(i)]), torch.tensor([0]), torch.tensor([key])))
    # The same prompts again, under new keys, as one flat step with padding after the last request.
    flat_a = torch.cat(acts + [torch.randn(3, layer.in_features)])
    flat_ids = torch.cat(ids + [torch.zeros(3, dtype=torch.int64)])
    starts = torch.tensor([0] + [len(i) for i in ids]).cumsum(0)
    y = layer.base(flat_a)
    flat = router.residual(y, flat_a, flat_ids, starts, torch.zeros(4, dtype=torch.int64), torch.arange(10, 14))
    torch.testing.assert_close(flat[: starts[-1]], torch.cat(alone))
    assert torch.equal(flat[starts[-1]:], y[starts[-1]:]), "padding tokens read nothing"
    assert any(not torch.equal(o, layer.base(a)) for o, a in zip(alone, acts)), "some prompt must be routed"
    # A decode step of all four, mixed in one step with a new request's prompt.
    dec_a = torch.randn(4 + len(ids[0]), layer.in_features)
    dec_ids = torch.cat([torch.tensor([5, 6, 7, 8]), ids[0]])
    starts = torch.tensor([0, 1, 2, 3, 4, 4 + len(ids[0])])
    context = torch.tensor([len(i) for i in ids] + [0])
    mixed = router.residual(layer.base(dec_a), dec_a, dec_ids, starts, context, torch.tensor([10, 11, 12, 13, 20]))
    for r in range(4):
        one = router.residual(layer.base(dec_a[r:r + 1]), dec_a[r:r + 1], dec_ids[r:r + 1], torch.tensor([0, 1]),
                              context[r:r + 1], torch.tensor([10 + r]))
        torch.testing.assert_close(mixed[r:r + 1], one)


def test_a_request_whose_first_step_was_not_seen_is_refused():
    editor = make_editor()
    router, layer = StepRouter(editor), editor.layer
    a = torch.randn(3, layer.in_features)
    with pytest.raises(RuntimeError, match="prefix caching and chunked prefill"):
        router.residual(layer.base(a), a, torch.tensor([4, 5, 6]), torch.tensor([0, 3]), torch.tensor([7]),
                        torch.tensor([1]))


def test_an_empty_bank_and_a_disabled_memory_read_nothing():
    model, tok = tiny_model("llama")
    editor = MemoirEditor(model, tok, MemoirConfig(num_context_templates=0), background_texts=BACKGROUND)
    a = torch.randn(4, editor.layer.in_features)
    y = editor.layer.base(a)
    out = StepRouter(editor).residual(y, a, torch.arange(4), torch.tensor([0, 4]), torch.tensor([0]), torch.tensor([0]))
    assert torch.equal(out, y)
