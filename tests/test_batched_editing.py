"""edit_many(batch_size=B) under memory private: B edits trained together, stored as B edits."""
import pytest
import torch

from memoir import MemoirConfig, MemoirEditor, editing
from test_faults import BACKGROUND, teacher_forced
from tiny import tiny_model

FACTS = [("the eiffel tower is located in the city of", "rome"),
         ("the capital of japan is", "berlin"),
         ("the longest river is the", "saturn"),
         ("who wrote the book ? the author", "london"),
         ("the color of the sky is", "green paper")]


def make_editor(**overrides):
    model, tok = tiny_model("llama")
    cfg = MemoirConfig(**{"n_iter": 60, "num_context_templates": 0, "threshold": 0.6, "memory": "private",
                          "on_conflict": "keep", **overrides})
    return MemoirEditor(model, tok, cfg, background_texts=BACKGROUND)


def test_a_batch_stores_separate_edits_that_each_produce_their_target():
    editor = make_editor()
    results = editor.edit_many(FACTS, batch_size=4, progress=False)
    assert [r.edit_id for r in results] == [0, 1, 2, 3, 4]
    assert all(r.kept and r.converged for r in results), results
    assert editor.layer.private.ids.tolist() == [0, 1, 2, 3, 4]
    assert editor.layer.memory.abs().max() == 0  # the scratch is emptied
    for (prompt, target), r in zip(FACTS, results):
        assert teacher_forced(editor, prompt, target)[1], prompt
        assert editor.retrieve([prompt])[0].edit_id == r.edit_id


def test_batched_and_one_by_one_editing_answer_alike():
    one, many = make_editor(), make_editor()
    one.edit_many(FACTS, progress=False)
    many.edit_many(FACTS, batch_size=5, progress=False)
    for prompt, target in FACTS:
        assert teacher_forced(one, prompt, target)[1] == teacher_forced(many, prompt, target)[1] is True
    unrelated = "i live in london and"
    assert many.generate(unrelated, max_new_tokens=4) == one.generate(unrelated, max_new_tokens=4)


def test_a_request_repeated_inside_its_batch_is_trained_once():
    editor = make_editor()
    prompt = FACTS[1][0]
    first, other, second = editor.edit_many([(prompt, "berlin"), FACTS[0], (prompt, "madrid")], batch_size=3,
                                            progress=False)
    assert not first.kept and second.kept
    assert first.edit_id in editor.removed and [r.edit_id for r in editor.edits()] == [other.edit_id, second.edit_id]
    assert sorted(editor.layer.private.ids.tolist()) == [other.edit_id, second.edit_id]
    assert editor.retrieve([prompt])[0].edit_id == second.edit_id
    assert teacher_forced(editor, prompt, "madrid")[1]


def test_a_failing_batch_leaves_the_editor_as_it_was(monkeypatch):
    editor = make_editor()
    editor.edit(*FACTS[0])
    before = (editor.layer.bank.snapshot(), editor.layer.private.snapshot(), editor.edits(), editor._next_id)

    def boom(*args, **kwargs):
        raise editing.EditDiverged("injected")
    monkeypatch.setattr(editing, "optimise_many", boom)
    with pytest.raises(editing.EditDiverged):
        editor.edit_many(FACTS[1:], batch_size=4, progress=False)
    after = (editor.layer.bank.snapshot(), editor.layer.private.snapshot(), editor.edits(), editor._next_id)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1]))
    assert before[2:] == after[2:]
    assert editor.layer.memory.abs().max() == 0


def test_unconverged_members_are_rolled_back_alone():
    editor = make_editor(n_iter=0)
    results = editor.edit_many(FACTS[:3], batch_size=3, on_unconverged="rollback", progress=False)
    assert not any(r.kept for r in results) and all(r.edit_id is None for r in results)
    assert len(editor.layer.bank) == 0 and len(editor.layer.private) == 0 and editor.removed == []


def test_batch_size_is_checked():
    with pytest.raises(ValueError, match="memory: private"):
        make_editor(memory="shared").edit_many(FACTS, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        make_editor().edit_many(FACTS, batch_size=0, progress=False)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_results_carry_the_subject_and_no_stray_fields(batch_size):
    editor = make_editor(n_iter=0)
    requests = [{"prompt": p, "target": t, "subject": p.split()[1]} for p, t in FACTS[:2]]
    rolled = editor.edit_many(requests, batch_size=batch_size, on_unconverged="rollback", progress=False)
    assert [r.subject for r in rolled] == [r["subject"] for r in requests]
    assert all(r.disturbed == () and r.preserved == () for r in rolled)
    editor.config.n_iter = 60
    kept = editor.edit_many(requests, batch_size=batch_size, progress=False)
    assert [r.subject for r in editor.edits()] == [r["subject"] for r in requests] == [r.subject for r in kept]
