"""memory: private: each edit keeps its own low-rank block, which no later edit can overwrite."""
import pytest
import torch
import torch.nn.functional as F

from memoir import MemoirConfig, MemoirEditor
from memoir.private import PrivateBlocks, private_residual
from memoir.route import Route
from test_faults import BACKGROUND, teacher_forced
from tiny import tiny_model

FACTS = [("the eiffel tower is located in the city of", "rome"),
         ("the capital of japan is", "berlin"),
         ("the longest river is the", "saturn"),
         ("who wrote the book ? the author", "london")]


def make_editor(memory="private", **overrides):
    model, tok = tiny_model("llama")
    cfg = MemoirConfig(**{"n_iter": 40, "num_context_templates": 0, "threshold": 0.6, "memory": memory,
                          "on_conflict": "keep", **overrides})
    return MemoirEditor(model, tok, cfg, background_texts=BACKGROUND)


def routed_logits(editor, prompt, target, edit_id):
    """Teacher-forced logits of ``prompt + target`` with every row routed to ``edit_id``'s bank row."""
    from memoir.batching import build_batch

    batch = build_batch(editor.tokenizer, [prompt], target)
    row = editor.layer.bank.edit_ids.index(edit_id)
    with torch.no_grad(), editor.layer.using_route(Route.to_row(row, 1)):
        return editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


# ---------------------------------------------------------------------------- the store and the op
def test_blocks_factorise_exactly_up_to_the_rank_and_report_what_truncation_drops():
    torch.manual_seed(0)
    blocks = PrivateBlocks(out_features=12, top_k=7, rank=3)
    low = torch.randn(12, 2) @ torch.randn(2, 7)
    assert blocks.add(5, torch.arange(7), low) == pytest.approx(1.0)
    torch.testing.assert_close(blocks.block(5), low, rtol=1e-5, atol=1e-5)
    full = torch.randn(12, 7)
    kept = blocks.add(9, torch.arange(7) + 2, full)
    s = torch.linalg.svdvals(full)
    assert kept == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-5)
    assert kept < 1.0
    blocks.pop(5)
    assert blocks.ids.tolist() == [9] and blocks.u.shape == (1, 12, 3) and blocks.cols[0, 0] == 2


@pytest.mark.parametrize("layout", ["bsd", "flat", "strided"])
def test_private_residual_matches_a_dense_reference(layout):
    torch.manual_seed(1)
    b, s, d, out, k, r = 3, 5, 16, 8, 6, 2
    u, v = torch.randn(4, out, r), torch.randn(4, r, k)
    cols = torch.stack([torch.randperm(d)[:k] for _ in range(4)])
    a = torch.randn(b, s, d)
    if layout == "strided":
        a = torch.randn(b, s, 2 * d)[..., ::2]  # non-contiguous input
    y = torch.randn(b, s, out)
    index = torch.tensor([2, -1, 0])
    expected = y.clone()
    for i, j in enumerate(index.tolist()):
        if j >= 0:
            block = torch.zeros(out, d)
            block[:, cols[j]] = u[j] @ v[j]
            expected[i] = y[i] + F.linear(a[i], block)
    if layout == "flat":
        got = private_residual(y.reshape(b * s, out), a.reshape(b * s, d), u, v, cols, index).reshape(b, s, out)
    else:
        got = private_residual(y, a, u, v, cols, index)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], y[1]), "an unrouted row must be the base output itself"


def test_index_maps_bank_rows_to_blocks_in_any_order():
    blocks = PrivateBlocks(out_features=4, top_k=2, rank=1)
    for edit_id in (7, 3):
        blocks.add(edit_id, torch.tensor([0, 1]), torch.ones(4, 2))
    bank_ids = torch.tensor([3, 7, 11])  # edit 11 has no block
    assert blocks.index_for(bank_ids, torch.tensor([1, 0, -1, 2])).tolist() == [0, 1, -1, -1]
    assert PrivateBlocks(4, 2, 1).index_for(bank_ids, torch.tensor([0])).tolist() == [-1]


# ---------------------------------------------------------------------------- the editor
def test_a_first_edit_gives_the_shared_memory_result_and_the_shared_memory_stays_empty():
    shared, private = make_editor("shared"), make_editor("private", private_rank=64)
    for editor in (shared, private):
        editor.edit(*FACTS[0])
    assert private.layer.memory.abs().max() == 0
    assert len(private.layer.private) == 1
    torch.testing.assert_close(routed_logits(private, *FACTS[0], 0), routed_logits(shared, *FACTS[0], 0),
                               rtol=1e-4, atol=1e-4)
    assert teacher_forced(private, *FACTS[0])[1]


def test_later_edits_leave_an_earlier_edits_output_bit_identical():
    editor = make_editor()
    editor.edit(*FACTS[0])
    before = routed_logits(editor, *FACTS[0], 0)
    for fact in FACTS[1:]:
        editor.edit(*fact)
    assert torch.equal(routed_logits(editor, *FACTS[0], 0), before)
    # The shared memory does move the first edit (the property private blocks add).
    shared = make_editor("shared")
    shared.edit(*FACTS[0])
    first = routed_logits(shared, *FACTS[0], 0)
    for fact in FACTS[1:]:
        shared.edit(*fact)
    assert not torch.equal(routed_logits(shared, *FACTS[0], 0), first)


def test_the_shared_memory_options_do_not_change_private_edits():
    # Column protection, preservation and neighbour checks act on a shared memory; private blocks
    # have nothing for them to protect, so setting them leaves every edit bit-identical.
    plain = make_editor()
    loaded = make_editor(column_protection=1.0, column_protection_mode="relative", preserve_neighbours=8,
                         preserve_min_overlap=0.0, preserve_energy=0.9, check_neighbours=4)
    for editor in (plain, loaded):
        for fact in FACTS:
            editor.edit(*fact)
    assert all(torch.equal(a, b) for a, b in zip(plain.layer.private.snapshot(), loaded.layer.private.snapshot()))
    assert [r.loss for r in plain.edits()] == [r.loss for r in loaded.edits()]


def test_remove_and_rollback_restore_the_blocks():
    editor = make_editor()
    unrelated = "i live in london"
    base = editor.generate(unrelated, max_new_tokens=4)
    editor.edit(*FACTS[0])
    r = editor.edit(*FACTS[1])
    editor.remove(r.edit_id)
    assert editor.layer.private.ids.tolist() == [0]
    assert editor.generate(unrelated, max_new_tokens=4) == base
    snap = editor.layer.private.snapshot()
    editor.config.n_iter = 0  # an edit that cannot converge, rolled back
    res = editor.edit(*FACTS[3], on_unconverged="rollback")
    assert not res.kept
    assert all(torch.equal(a, b) for a, b in zip(editor.layer.private.snapshot(), snap))
    assert editor.layer.memory.abs().max() == 0


def test_save_and_load_keep_the_blocks_and_check_them(tmp_path):
    editor = make_editor()
    for fact in FACTS[:3]:
        editor.edit(*fact)
    expected = [routed_logits(editor, p, t, i) for i, (p, t) in enumerate(FACTS[:3])]
    editor.save(tmp_path / "m")
    model, tok = tiny_model("llama")
    loaded = MemoirEditor.load(model, tok, tmp_path / "m")
    assert loaded.config.memory == "private"
    for i, (p, t) in enumerate(FACTS[:3]):
        assert torch.equal(routed_logits(loaded, p, t, i), expected[i])
    assert [r.edit_id for r in loaded.retrieve([p for p, _ in FACTS[:3]])] == \
        [r.edit_id for r in editor.retrieve([p for p, _ in FACTS[:3]])]


def test_a_save_whose_blocks_do_not_match_the_bank_is_refused(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from memoir import persist

    editor = make_editor()
    for fact in FACTS[:2]:
        editor.edit(*fact)
    editor.save(tmp_path / "m")
    state = load_file(str(tmp_path / "m" / persist.STATE_FILE))
    state["private_ids"] = torch.tensor([0, 5])
    save_file(state, str(tmp_path / "m" / persist.STATE_FILE))
    meta_path = tmp_path / "m" / persist.CONFIG_FILE
    meta = json.loads(meta_path.read_text())
    meta["state_sha256"] = persist._sha256(tmp_path / "m" / persist.STATE_FILE)
    meta["config_sha256"] = persist.meta_checksum(meta)
    meta_path.write_text(json.dumps(meta))
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match="private_ids"):
        MemoirEditor.load(model, tok, tmp_path / "m")


# ---------------------------------------------------------------------------- training augmentation
def test_augmentation_changes_what_the_memory_reads_never_the_frozen_projection():
    editor = make_editor(memory="shared")
    editor.edit(*FACTS[0])
    a = torch.randn(2, 3, editor.layer.in_features)
    route = Route.to_row(0, 2)
    with torch.no_grad(), editor.layer.using_route(route):
        routed = editor.layer(a)
        with editor.layer.training_passes(lambda x: 0 * x):
            silenced = editor.layer(a)
        with editor.layer.training_passes(lambda x: 2 * x):
            doubled = editor.layer(a)
    base = editor.layer.base(a)
    assert not torch.allclose(routed, base)
    torch.testing.assert_close(silenced, base)
    torch.testing.assert_close(doubled - base, 2 * (routed - base), rtol=1e-4, atol=1e-5)


def test_an_input_scale_trains_a_block_that_reaches_the_target_from_weaker_inputs():
    plain, scaled = make_editor(), make_editor(train_input_scale=0.5)
    for editor in (plain, scaled):
        editor.edit(*FACTS[0])
    assert teacher_forced(scaled, *FACTS[0])[1]  # judged without the scale: the block as stored
    # The same block read from half the input still produces the target (the plain block need not).
    block = scaled.layer.private.block(0)
    half = make_editor()
    half.edit(*FACTS[0])
    with torch.no_grad():
        half.layer.private.u[0] = 0.5 * scaled.layer.private.u[0]
        half.layer.private.v[0] = scaled.layer.private.v[0]
        half.layer.private.cols[0] = scaled.layer.private.cols[0]
    assert teacher_forced(half, *FACTS[0])[1]
    assert block.norm() > plain.layer.private.block(0).norm()


@pytest.mark.parametrize("field,value", [("train_input_scale", 0.0), ("train_input_scale", 1.5)])
def test_augmentation_fields_are_range_checked(field, value):
    with pytest.raises(ValueError, match=field):
        MemoirConfig(**{field: value})


def test_a_block_gain_stores_the_trained_block_amplified():
    plain, amplified = make_editor(), make_editor(block_gain=2.0)
    for editor in (plain, amplified):
        editor.edit(*FACTS[2])
    torch.testing.assert_close(amplified.layer.private.block(0), 2.0 * plain.layer.private.block(0),
                               rtol=1e-5, atol=1e-6)
    assert teacher_forced(amplified, *FACTS[2])[1]
    assert [r.steps for r in amplified.edits()] == [r.steps for r in plain.edits()]  # no extra training


def test_a_block_gain_below_one_is_refused():
    with pytest.raises(ValueError, match="block_gain"):
        MemoirConfig(block_gain=0.5, memory="private")


def test_the_private_memory_options_do_not_change_a_shared_memory():
    plain, loaded = make_editor("shared"), make_editor("shared", block_gain=2.0, stop_after_target=True)
    for editor in (plain, loaded):
        for fact in FACTS[:2]:
            editor.edit(*fact)
    assert torch.equal(plain.layer.memory, loaded.layer.memory)
    assert plain.generate([FACTS[0][0]], max_new_tokens=4) == loaded.generate([FACTS[0][0]], max_new_tokens=4)


def _recording_still_needed(monkeypatch):
    seen = []
    original = PrivateBlocks.still_needed

    def record(self, index, decoded):
        out = original(self, index, decoded)
        seen.append((decoded, out.tolist()))
        return out

    monkeypatch.setattr(PrivateBlocks, "still_needed", record)
    return seen


def test_stop_after_target_reads_a_block_for_the_prompt_and_its_targets_tokens_only(monkeypatch):
    prompt, target = "the capital of japan is", "rome paris"
    editor = make_editor(stop_after_target=True)
    assert editor.edit(prompt, target).converged
    n = int(editor.layer.private.lens[0])
    assert n >= 2, "a multi-token target makes the test mean something"
    seen = _recording_still_needed(monkeypatch)
    out = editor.generate([prompt, "who wrote the book ?"], max_new_tokens=n + 3)
    assert out[0].strip().startswith(target)
    # Decode step d feeds the d-th generated token: the block serves steps 0 .. n - 2 (tokens 2 .. n).
    assert [d for d, _ in seen] == list(range(n + 2))
    assert [rows[0] for _, rows in seen] == [0 if d < n - 1 else -1 for d in range(n + 2)]
    assert all(rows[1] == -1 for _, rows in seen)  # the unrouted prompt reads nothing throughout


def test_without_stop_after_target_a_block_is_read_at_every_step(monkeypatch):
    editor = make_editor()
    editor.edit("the capital of japan is", "rome paris")
    seen = _recording_still_needed(monkeypatch)
    editor.generate(["the capital of japan is"], max_new_tokens=4)
    assert seen == []


def test_still_needed_counts_each_blocks_target():
    blocks = PrivateBlocks(out_features=4, top_k=2, rank=1)
    for edit_id, n in ((3, 1), (4, 3)):
        blocks.add(edit_id, torch.tensor([0, 1]), torch.ones(4, 2), target_tokens=n)
    index = torch.tensor([0, 1, -1])
    assert blocks.still_needed(index, 0).tolist() == [-1, 1, -1]
    assert blocks.still_needed(index, 1).tolist() == [-1, 1, -1]
    assert blocks.still_needed(index, 2).tolist() == [-1, -1, -1]


def test_decode_steps_read_a_gained_block_as_trained():
    """The prompt pass reads the stored (gained) block; each decode step reads it divided by the gain."""
    from memoir.route import Route

    editor = make_editor(block_gain=3.0)
    editor.edit(*FACTS[0])
    layer = editor.layer
    a = torch.randn(1, 1, layer.in_features)
    base = layer.base(a)
    with torch.no_grad():
        prompt_pass = layer.routed(a, Route.to_row(0, 1)) - base
        decode_step = layer.routed(a, Route.to_row(0, 1), decoded=0) - base
    assert prompt_pass.abs().max() > 0
    torch.testing.assert_close(decode_step, prompt_pass / 3.0, rtol=1e-4, atol=1e-5)
