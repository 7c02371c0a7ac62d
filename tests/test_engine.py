"""The editing engine on tiny random models of every supported family."""
import copy

import pytest
import torch
from torch import nn

from memoir import MemoirConfig, MemoirEditor, MemoirLayer, locate_target
from memoir import editing
from memoir.batching import build_batch
from memoir.memory_op import route_masks
from tiny import FAMILIES, tiny_model

BACKGROUND = ["the city of paris is in france", "who wrote the book ?", "the river nile is long",
              "what is the capital of japan ?", "i live in london", "yes the answer is no"]
PROMPT = "the eiffel tower is located in the city of"
TARGET = "rome"


def make_editor(family="llama", **overrides):
    model, tok = tiny_model(family)
    cfg = MemoirConfig(**{"n_iter": 25, "num_context_templates": 2, "threshold": 0.6, **overrides})
    return MemoirEditor(model, tok, cfg, background_texts=BACKGROUND)


def target_argmax(editor, prompt, target):
    batch = build_batch(editor.tokenizer, [prompt], target)
    with torch.no_grad(), editor.prompt_span(batch.prompt_mask):
        logits = editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    pred = logits[0, :-1].argmax(-1)
    labels = batch.labels[0, 1:]
    sel = labels != -100
    return pred[sel], labels[sel]


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_changes_edited_prompt_and_spares_unrelated(family):
    editor = make_editor(family, threshold=1.0, n_iter=60)
    unrelated = "who wrote the book ?"
    base = build_batch(editor.tokenizer, [unrelated])
    with torch.no_grad():
        before = editor.model(input_ids=base.input_ids, attention_mask=base.attention_mask).logits
    pred, labels = target_argmax(editor, PROMPT, TARGET)
    assert not torch.equal(pred, labels), "random model already predicts the target: test is vacuous"

    result = editor.edit(PROMPT, TARGET)
    assert result.steps > 0 and result.edit_id == 0
    pred, labels = target_argmax(editor, PROMPT, TARGET)
    assert torch.equal(pred, labels)
    with torch.no_grad():
        after = editor.model(input_ids=base.input_ids, attention_mask=base.attention_mask).logits
    assert torch.equal(before, after)
    assert editor.retrieve([PROMPT, unrelated])[1].edit_id is None


def test_disable_enable_restores_base_behaviour():
    editor = make_editor()
    batch = build_batch(editor.tokenizer, [PROMPT], TARGET)
    with torch.no_grad():
        base_logits = editor.model(input_ids=batch.input_ids).logits
    editor.edit(PROMPT, TARGET)
    editor.disable()
    with torch.no_grad():
        off = editor.model(input_ids=batch.input_ids).logits
    editor.enable()
    with torch.no_grad():
        on = editor.model(input_ids=batch.input_ids).logits
    assert torch.equal(base_logits, off)
    assert not torch.allclose(base_logits, on)


def test_batched_left_padded_generate_equals_one_by_one():
    editor = make_editor(threshold=0.9)
    editor.edit(PROMPT, TARGET)
    editor.edit("the capital of japan is", "berlin")
    prompts = [PROMPT, "who", "the capital of japan is", "the river nile is the longest river in"]
    routed = [r.edit_id for r in editor.retrieve(prompts)]
    assert routed[0] == 0 and routed[2] == 1  # a mix of routed and unrouted rows
    batched = editor.generate(prompts, max_new_tokens=6)
    single = [editor.generate(p, max_new_tokens=6) for p in prompts]
    assert batched == single
    # Plain HF generate routes from the prefill too.
    enc = editor.tokenizer(prompts, return_tensors="pt", padding=True)
    out = editor.model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
    plain = editor.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert plain == batched


def test_generate_after_edit_starts_with_target():
    editor = make_editor()
    editor.edit(PROMPT, TARGET)
    assert editor.generate(PROMPT, max_new_tokens=3).strip().startswith(TARGET)


def test_cached_activation_editing_equals_full_forward():
    model, tok = tiny_model("llama")
    cfg = MemoirConfig(n_iter=12, num_context_templates=3, threshold=0.6, layer=2)
    fast = MemoirEditor(copy.deepcopy(model), tok, cfg, background_texts=BACKGROUND)
    slow = MemoirEditor(copy.deepcopy(model), tok, cfg, background_texts=BACKGROUND, full_forward=True)
    for prompt, target in ((PROMPT, TARGET), ("the capital of japan is", "berlin")):
        a, b = fast.edit(prompt, target), slow.edit(prompt, target)
        assert a.steps == b.steps
        assert a.loss == pytest.approx(b.loss, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(fast.layer.memory, slow.layer.memory, rtol=1e-4, atol=1e-6)
    assert torch.equal(fast.layer.bank.words, slow.layer.bank.words)
    # The frozen layers are restored after editing.
    assert all(type(l).__name__ != "_Replay" for l in fast.target.layers)


def test_only_mask_columns_are_written():
    editor = make_editor(decay_scope="none")
    editor.edit(PROMPT, TARGET)
    touched = editor.layer.memory.abs().sum(0) > 0
    owned = editor.layer.column_usage() > 0
    assert touched.any()
    assert not (touched & ~owned).any()
    assert int(owned.sum()) == editor.config.top_k


def test_weight_decay_scopes():
    full = make_editor(decay_scope="all", weight_decay=0.1)
    full.edit(PROMPT, TARGET)
    first = full.layer.memory.clone()
    full.edit("the capital of japan is", "berlin")
    only_second = full.layer.column_usage()
    # Columns owned only by the first edit shrank under whole-matrix decay.
    cols = (first.abs().sum(0) > 0) & (only_second == 1)
    assert cols.any()  # the two edits own different columns too
    assert full.layer.memory[:, cols].abs().sum() < first[:, cols].abs().sum()


def test_routing_is_per_row_and_reused_during_decode():
    editor = make_editor(threshold=0.9)
    editor.edit(PROMPT, TARGET)
    layer = editor.layer
    enc = build_batch(editor.tokenizer, [PROMPT, "who wrote the book ?"])
    with torch.no_grad():
        out = editor.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=True)
        route = layer.last_route
        assert route.rows.tolist() == [0, -1]
        masks = route_masks(layer.bank.words, route.rows, layer.in_features, torch.float32)
        assert masks[0].sum() == editor.config.top_k and masks[1].sum() == 0
        # A decode step (non-empty cache) reads the prefill's route instead of routing again.
        step = torch.tensor([[3], [3]])
        attn = torch.cat([enc.attention_mask, torch.ones(2, 1, dtype=enc.attention_mask.dtype)], dim=1)
        with layer.capturing() as seen:
            editor.model(input_ids=step, attention_mask=attn, cache=out.past_key_values)
        assert seen and layer.last_route is route


def test_empty_bank_is_identity():
    editor = make_editor()
    batch = build_batch(editor.tokenizer, [PROMPT])
    with torch.no_grad():
        on = editor.model(input_ids=batch.input_ids).logits
        editor.disable()
        off = editor.model(input_ids=batch.input_ids).logits
    assert torch.equal(on, off)
    assert editor.retrieve(PROMPT)[0].edit_id is None


def test_same_prompt_reedited_reuses_its_mask():
    editor = make_editor()
    editor.edit(PROMPT, TARGET)
    second = editor.edit(PROMPT, "paris")
    assert len(editor.layer.bank) == 1
    assert editor.layer.bank.edit_ids == [second.edit_id]
    assert [r.edit_id for r in editor.edits()] == [second.edit_id]


def test_edit_many_accepts_dicts_and_pairs_and_rejects_bad_requests():
    editor = make_editor(n_iter=2)
    out = editor.edit_many([{"prompt": PROMPT, "target": TARGET}, ("the capital of japan is", "berlin")],
                           progress=False)
    assert [r.edit_id for r in out] == [0, 1]
    with pytest.raises(ValueError, match="target"):
        editor.edit_many([{"prompt": PROMPT}], progress=False)
    with pytest.raises(TypeError):
        editor.edit_many([42], progress=False)


def test_attaching_twice_is_an_error():
    editor = make_editor()
    with pytest.raises(ValueError, match="already"):
        MemoirEditor(editor.model, editor.tokenizer, editor.config, background_texts=BACKGROUND)


def test_detach_restores_plain_model():
    editor = make_editor()
    editor.edit(PROMPT, TARGET)
    model = editor.detach()
    assert not any(isinstance(m, MemoirLayer) for m in model.modules())


def test_locate_target_errors_name_what_was_found():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "odd", "num_hidden_layers": 2})()
            self.blocks = nn.ModuleList([Block(), Block()])

    with pytest.raises(ValueError, match="proj"):
        locate_target(Odd())
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        locate_target(model, layer=9)


def test_gpt2_conv1d_target_is_transposed():
    model, _ = tiny_model("gpt2")
    t = locate_target(model)
    assert t.transposed and (t.in_features, t.out_features) == (256, 64)


def test_column_protection_slows_writes_to_owned_columns():
    plain = make_editor(decay_scope="none", n_iter=3, early_stop=False)
    guarded = make_editor(decay_scope="none", n_iter=3, early_stop=False, column_protection=50.0)
    for e in (plain, guarded):
        e.edit(PROMPT, TARGET)
    first = plain.layer.memory.clone()
    torch.testing.assert_close(first, guarded.layer.memory)
    for e in (plain, guarded):
        e.edit("the eiffel tower is in the city of", "paris")
    shared = (plain.layer.column_usage() == 2)
    assert shared.any()
    moved = lambda e: (e.layer.memory[:, shared] - first[:, shared]).abs().sum()
    assert moved(guarded) < 0.1 * moved(plain)


def test_relative_column_protection_keeps_the_step_size():
    """Relative mode: only the preference between columns remains; uniform usage = no protection."""
    kw = dict(decay_scope="none", n_iter=3, early_stop=False)
    plain, absolute, relative = (make_editor(**kw), make_editor(**kw, column_protection=1.0),
                                 make_editor(**kw, column_protection=1.0, column_protection_mode="relative"))
    for e in (plain, absolute, relative):
        e.edit(PROMPT, TARGET)
        e.edit(PROMPT, "paris")  # the same mask again: every one of its columns has one owner
    torch.testing.assert_close(relative.layer.memory, plain.layer.memory)
    assert (absolute.layer.memory - plain.layer.memory).abs().max() > 1e-4
    # Unequal usage: the less-used columns move more than under absolute protection's uniform shrink.
    guarded = make_editor(**kw, column_protection=50.0, column_protection_mode="relative")
    guarded.edit(PROMPT, TARGET)
    first = guarded.layer.memory.clone()
    guarded.edit("the eiffel tower is in the city of", "paris")
    usage = guarded.layer.column_usage()
    fresh, shared = usage == 1, usage == 2
    step = (guarded.layer.memory - first).abs()
    assert shared.any() and fresh.any()
    assert step[:, shared].mean() < 0.1 * step[:, fresh & (step.sum(0) > 0)].mean()
    with pytest.raises(ValueError, match="column_protection_mode"):
        MemoirConfig(column_protection_mode="soft")


def test_failed_edit_leaves_memory_and_bank_untouched(monkeypatch):
    editor = make_editor()
    editor.edit(PROMPT, TARGET)
    memory, words = editor.layer.memory.clone(), editor.layer.bank.words.clone()

    def boom(*a, **k):
        editor.layer.memory.data.add_(1.0)  # half-done work that must be undone
        raise KeyboardInterrupt

    monkeypatch.setattr(editing, "optimise", boom)
    with pytest.raises(KeyboardInterrupt):
        editor.edit("the capital of japan is", "berlin")
    assert torch.equal(editor.layer.memory, memory) and torch.equal(editor.layer.bank.words, words)
    assert [r.edit_id for r in editor.edits()] == [0]


def _editor_state(editor):
    keys = {i: editor.keys.dense(i).clone() for i in editor.keys.ids()}
    return (editor.layer.memory.detach().clone(), editor.layer.bank.words.clone(), editor.layer.bank.edit_ids,
            keys, editor.edits(), editor.threshold, editor._next_id)


def _assert_same_state(got, want):
    assert torch.equal(got[0], want[0]), "memory changed"
    assert torch.equal(got[1], want[1]) and got[2] == want[2], "bank changed"
    assert got[3].keys() == want[3].keys() and all(torch.equal(got[3][i], want[3][i]) for i in want[3])
    assert got[4] == want[4] and got[5] == want[5] and got[6] == want[6]


@pytest.mark.parametrize("prompt", ["the capital of japan is", PROMPT])  # a new mask / the same mask re-edited
def test_interrupted_edit_rolls_back_every_entry_it_touched(monkeypatch, prompt):
    """Interrupted after three real SGD steps (whole-matrix decay: other edits' columns move too)."""
    editor = make_editor(threshold_mode="auto", preserve_neighbours=2, decay_scope="all", weight_decay=0.5,
                         grad_clip=1e6, early_stop=False)
    editor.edit(PROMPT, TARGET)
    editor.edit("who wrote the book ?", "paris")
    before = _editor_state(editor)
    steps, moved = [], []
    transforms = editing.gradient_transforms

    def counting(*args, **kwargs):
        def interrupt_at_fourth_step(g):
            steps.append(1)
            if len(steps) == 4:
                changed = editor.layer.memory.detach() != before[0]
                moved.append(int(changed.any(0).sum()) > editor.config.top_k)  # beyond the edit's own columns
                raise KeyboardInterrupt
        return [*transforms(*args, **kwargs), interrupt_at_fourth_step]

    monkeypatch.setattr(editing, "gradient_transforms", counting)
    with pytest.raises(KeyboardInterrupt):
        editor.edit(prompt, "berlin")
    assert len(steps) == 4 and moved == [True], "the interrupted steps must have changed columns of other edits"
    _assert_same_state(_editor_state(editor), before)
    # The editor still works after the rollback and the next edit gets the next id.
    monkeypatch.setattr(editing, "gradient_transforms", transforms)
    result = editor.edit(prompt, "berlin")
    assert result.edit_id == before[6]
