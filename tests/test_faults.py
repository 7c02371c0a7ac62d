"""Faults a user can provoke: diverging edits, edits that miss their target, tampered saves.

Each test reproduces a way state used to be lost or poisoned silently and checks that memoir now
refuses or rolls back, leaving the editor exactly as it was.
"""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from memoir import MemoirConfig, MemoirEditor, MemoirLayer, atomic, editing, persist
from memoir.batching import build_batch
from tiny import tiny_model

BACKGROUND = ["the city of paris is in france", "who wrote the book ?", "the river nile is long",
              "what is the capital of japan ?", "i live in london", "yes the answer is no"]
PROMPT = "the eiffel tower is located in the city of"
TARGET = "rome"
UNRELATED = "who wrote the book ?"


def make_editor(**overrides):
    model, tok = tiny_model("llama")
    cfg = MemoirConfig(**{"n_iter": 40, "num_context_templates": 0, "threshold": 0.6, **overrides})
    return MemoirEditor(model, tok, cfg, background_texts=BACKGROUND)


def snapshot(editor):
    return (editor.layer.memory.detach().clone(), editor.layer.bank.words.clone(), list(editor.layer.bank.edit_ids),
            editor.edits(), editor.threshold, editor._next_id)


def assert_unchanged(editor, before):
    after = snapshot(editor)
    assert torch.equal(after[0], before[0]), "memory changed"
    assert torch.equal(after[1], before[1]) and after[2] == before[2], "bank changed"
    assert after[3:] == before[3:], "records, threshold or next id changed"


def teacher_forced(editor, prompt, target):
    """(loss, argmax == target) of ``prompt + target``, routed from the prompt as at inference."""
    batch = build_batch(editor.tokenizer, [prompt], target)
    with torch.no_grad(), editor.prompt_span(batch.prompt_mask):
        logits = editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels = batch.labels[0, 1:]
    sel = labels != -100
    logits = logits[0, :-1][sel].float()
    return F.cross_entropy(logits, labels[sel]).item(), bool((logits.argmax(-1) == labels[sel]).all())


def test_a_diverging_edit_raises_and_leaves_every_entry_as_it_was():
    editor = make_editor()
    editor.edit("the capital of japan is", "berlin")
    editor.config.lr, editor.config.grad_clip = 1e30, 1e30  # valid values whose steps overflow float32
    before = snapshot(editor)
    unrelated_before = editor.generate(UNRELATED, max_new_tokens=4)
    with pytest.raises(editing.EditDiverged, match="diverged"):
        editor.edit(PROMPT, TARGET)
    assert_unchanged(editor, before)
    assert bool(torch.isfinite(editor.layer.memory).all())
    assert editor.generate(UNRELATED, max_new_tokens=4) == unrelated_before
    assert editor.retrieve("the capital of japan is")[0].edit_id == 0


def test_reported_loss_is_that_of_the_kept_memory():
    # One step from a zero memory: the loss before it is the base model's, the loss after it is not.
    editor = make_editor(n_iter=1, early_stop=False, threshold=1.0)
    base_loss, _ = teacher_forced(editor, PROMPT, TARGET)
    result = editor.edit(PROMPT, TARGET)
    kept_loss, _ = teacher_forced(editor, PROMPT, TARGET)
    assert result.steps == 1 and abs(base_loss - kept_loss) > 1e-3
    assert result.loss == pytest.approx(kept_loss, rel=1e-4, abs=1e-5)


def test_converged_says_whether_the_prompt_produces_the_target():
    editor = make_editor(n_iter=0)
    missed = editor.edit(PROMPT, TARGET)
    assert not missed.converged and missed.kept and missed.edit_id == 0
    assert teacher_forced(editor, PROMPT, TARGET)[1] is False
    editor.config.n_iter = 40
    trained = editor.edit("the capital of japan is", "berlin")
    assert trained.converged and teacher_forced(editor, "the capital of japan is", "berlin")[1]
    assert [(r.edit_id, r.converged) for r in editor.edits()] == [(0, False), (1, True)]


def test_rollback_policy_undoes_an_edit_that_misses_its_target():
    editor = make_editor()
    editor.edit("the capital of japan is", "berlin")
    before = snapshot(editor)
    editor.config.n_iter = 0
    result = editor.edit(PROMPT, TARGET, on_unconverged="rollback")
    assert not result.converged and not result.kept and result.edit_id is None
    assert_unchanged(editor, before)
    editor.config.n_iter, editor.config.on_unconverged = 40, "rollback"
    kept = editor.edit(PROMPT, TARGET)
    assert kept.kept and kept.edit_id == 1  # the rolled-back edit's id was not spent


def test_unknown_unconverged_policy_is_refused_before_any_work():
    editor = make_editor()
    with pytest.raises(ValueError, match="on_unconverged"):
        editor.edit(PROMPT, TARGET, on_unconverged="maybe")
    with pytest.raises(ValueError, match="on_unconverged"):
        MemoirConfig(on_unconverged="maybe")


@pytest.mark.parametrize("item, field", [
    (("the capital of japan is", None), "target"),
    (["the capital of japan is", None], "target"),
    ({"prompt": "the capital of japan is", "target": None}, "target"),
    ({"prompt": "the capital of japan is"}, "target"),
    (("the capital of japan is", "\u200b"), "target"),
    (("\u200b \ufeff", "berlin"), "prompt"),
    (("the capital of japan is", 3), "target"),
    (("the capital of japan is", "berlin", ""), "subject"),
])
def test_malformed_requests_are_refused_naming_the_field(item, field):
    editor = make_editor()
    with pytest.raises(ValueError, match=field):
        editor.edit_many([("the river nile is long", "yes"), item], progress=False)
    assert editor.edits() == [] and len(editor.layer.bank) == 0  # refused before the first edit


def test_special_token_text_in_a_target_is_refused():
    editor = make_editor()
    special = editor.tokenizer.eos_token
    with pytest.raises(ValueError, match="special token"):
        editor.edit(PROMPT, f"rome {special}")


def test_a_prompt_longer_than_the_context_is_refused_before_training(monkeypatch):
    editor = make_editor()
    limit = editor.model.config.max_position_embeddings
    monkeypatch.setattr(editing, "encode_edit", lambda *a: pytest.fail("training started"))
    with pytest.raises(ValueError, match=f"context of {limit}"):
        editor.edit(" ".join(["the"] * (limit + 5)), TARGET)


def test_empty_or_non_text_prompt_lists_get_a_clear_error():
    editor = make_editor()
    for call in (editor.generate, editor.retrieve):
        with pytest.raises(ValueError, match="no prompts"):
            call([])
        with pytest.raises(TypeError, match="prompt 1 is a NoneType"):
            call([PROMPT, None])


# ---------------------------------------------------------------- saving and loading
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A save of two edits and the model (weights) it was made on."""
    editor = make_editor(n_iter=20)
    editor.edit(PROMPT, TARGET)
    editor.edit("the capital of japan is", "berlin")
    path = tmp_path_factory.mktemp("saves") / "two-edits"
    editor.save(path)
    expected = editor.generate([PROMPT, UNRELATED], max_new_tokens=3)
    return path, editor.detach().state_dict(), expected


def fresh_model(weights, dtype=torch.float32):
    model, tok = tiny_model("llama")
    model.load_state_dict(weights)
    return model.to(dtype), tok


def copy_save(src, dst):
    dst.mkdir(parents=True)
    for name in persist.OWN_FILES:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def rewrite(path, state_fn=None, meta_fn=None):
    """Change a save the way a buggy writer would, with every checksum made to match again."""
    state = load_file(str(path / persist.STATE_FILE))
    if state_fn:
        state_fn(state)
    save_file(state, str(path / persist.STATE_FILE))
    meta = json.loads((path / persist.CONFIG_FILE).read_text())
    meta["state_sha256"] = persist._sha256(path / persist.STATE_FILE)
    if meta_fn:
        meta_fn(meta)
    meta["config_sha256"] = persist.meta_checksum(meta)
    (path / persist.CONFIG_FILE).write_text(json.dumps(meta))


def test_saving_into_a_folder_of_other_files_refuses_and_keeps_them(tmp_path):
    editor = make_editor(n_iter=2)
    editor.edit(PROMPT, TARGET)
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    (folder / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(ValueError, match="refusing to save.*notes.txt, sub/"):
        editor.save(folder)
    assert (folder / "notes.txt").read_text() == "keep me" and (folder / "sub" / "data.csv").read_text() == "1,2"
    editor.save(tmp_path / "fresh")
    editor.save(tmp_path / "fresh")  # an earlier save is replaced
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == sorted(persist.OWN_FILES)


def test_saving_a_state_load_would_refuse_writes_nothing(tmp_path):
    editor = make_editor(n_iter=2)
    editor.edit(PROMPT, TARGET)
    editor.save(tmp_path / "good")
    before = {p.name: p.read_bytes() for p in (tmp_path / "good").iterdir()}
    editor._records.clear()  # records out of step with the bank (a bug elsewhere): load would refuse it
    with pytest.raises(ValueError, match="are not the bank's"):
        editor.save(tmp_path / "good")
    with pytest.raises(ValueError, match="are not the bank's"):
        editor.save(tmp_path / "new")
    assert {p.name: p.read_bytes() for p in (tmp_path / "good").iterdir()} == before
    assert not (tmp_path / "new").exists()


def test_a_save_killed_between_its_renames_is_recovered_by_the_next_load(saved, tmp_path, monkeypatch):
    path, weights, expected = saved
    target = copy_save(path, tmp_path / "save")
    model, tok = fresh_model(weights)
    editor = MemoirEditor.load(model, tok, target)
    editor.edit("i live in london", "paris")

    def killed(tmp, dest):  # the process dies after moving the old version aside
        dest.rename(atomic._old_name(dest))
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_replace_dir", killed)
    with pytest.raises(KeyboardInterrupt):
        editor.save(target)
    monkeypatch.undo()
    assert not target.exists()
    model, tok = fresh_model(weights)
    back = MemoirEditor.load(model, tok, target)  # the last completed save
    assert [r.edit_id for r in back.edits()] == [0, 1]
    assert back.generate([PROMPT, UNRELATED], max_new_tokens=3) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save"]


def test_temporary_folders_of_killed_saves_are_cleaned(saved, tmp_path):
    path, weights, _ = saved
    target = copy_save(path, tmp_path / "save")
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{atomic._temp_prefix(target, int(done.stdout))}abc.tmp"
    live = tmp_path / f"{atomic._temp_prefix(target)}def.tmp"  # this process: a save still running
    for folder in (dead, live):
        folder.mkdir()
        (folder / persist.STATE_FILE).write_bytes(b"half")
    model, tok = fresh_model(weights)
    MemoirEditor.load(model, tok, target)
    assert not dead.exists() and live.exists()


def test_a_config_changed_after_saving_is_refused(saved, tmp_path):
    path, weights, _ = saved
    target = copy_save(path, tmp_path / "save")
    meta = json.loads((target / persist.CONFIG_FILE).read_text())
    meta["config"]["threshold"] = 0.0
    (target / persist.CONFIG_FILE).write_text(json.dumps(meta))
    model, tok = fresh_model(weights)
    with pytest.raises(ValueError, match="changed after it was saved"):
        MemoirEditor.load(model, tok, target)


def _bank_bit_off(state):
    state["bank_words"][0, (state["bank_words"][0] != 0).nonzero()[0]] &= 0  # clears a word of the first mask


@pytest.mark.parametrize("state_fn, meta_fn, message", [
    (lambda s: s["memory"].view(-1).__setitem__(0, float("nan")), None, "memory holds non-finite"),
    (lambda s: s["permutation"].__setitem__(0, s["permutation"][1]), None, "permutation is not a permutation"),
    (_bank_bit_off, None, "exactly top_k"),
    (lambda s: s["bank_edit_ids"].fill_(0), None, "repeats an edit id"),
    (None, lambda m: m.pop("next_edit_id"), "missing field 'next_edit_id'"),
    (None, lambda m: m["target"].pop("weight_sha256"), "missing field 'weight_sha256'"),
    (None, lambda m: m["config"].__setitem__("top_k", 10_000), "top_k"),
    (None, lambda m: m["edits"].pop(), "are not the bank's"),
])
def test_loading_checks_what_the_save_means(saved, tmp_path, state_fn, meta_fn, message):
    path, weights, _ = saved
    target = copy_save(path, tmp_path / "save")
    rewrite(target, state_fn, meta_fn)
    model, tok = fresh_model(weights)
    with pytest.raises(ValueError, match=message):
        MemoirEditor.load(model, tok, target)
    assert not any(isinstance(m, MemoirLayer) for m in model.modules())  # nothing left attached


def test_loading_onto_the_model_in_another_dtype_says_dtype(saved):
    path, weights, _ = saved
    model, tok = fresh_model(weights, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype=torch.float32"):
        MemoirEditor.load(model, tok, path)


def test_remove_gives_back_the_unedited_answer_and_keeps_the_others(tmp_path):
    editor = make_editor()
    prompts = [PROMPT, "the capital of japan is", UNRELATED]
    with editor.disabled():
        plain = editor.generate(prompts, max_new_tokens=3)
    first = editor.edit(PROMPT, TARGET)
    editor.edit("the capital of japan is", "berlin")
    edited = editor.generate(prompts, max_new_tokens=3)
    assert edited[0] != plain[0] and edited[1] != plain[1], "both edits must change their answers"
    editor.remove(first.edit_id)
    assert editor.generate(prompts, max_new_tokens=3) == [plain[0], edited[1], plain[2]]
    assert [r.edit_id for r in editor.edits()] == [1] and editor.removed == [0]
    editor.save(tmp_path / "s")
    model, tok = tiny_model("llama")
    back = MemoirEditor.load(model, tok, tmp_path / "s")
    assert back.removed == [0] and back.generate(prompts, max_new_tokens=3) == [plain[0], edited[1], plain[2]]
    with pytest.raises(KeyError, match="no stored edit 0"):
        back.remove(0)


def test_full_forward_must_be_a_boolean():
    model, tok = tiny_model("llama")
    with pytest.raises(TypeError, match="full_forward='false'"):
        MemoirEditor(model, tok, MemoirConfig(num_context_templates=0), background_texts=BACKGROUND,
                     full_forward="false")


def test_an_edit_that_overwrites_an_earlier_one_says_so(monkeypatch):
    editor = make_editor()
    first = editor.edit(PROMPT, TARGET)
    assert first.converged and first.disturbed == ()
    clean = editor.edit("the capital of japan is", "berlin")
    assert clean.converged and clean.disturbed == ()  # trained beside it without breaking it
    cols0 = editor.layer.bank.rows_to_dense(torch.tensor([0]))[0].bool()
    real = editing.optimise

    def overwriting(ed, inputs, row, transforms):  # as a far too large step would
        out = real(ed, inputs, row, transforms)
        with torch.no_grad():
            ed.layer.memory[:, cols0] *= -5
        return out

    monkeypatch.setattr(editing, "optimise", overwriting)
    bad = editor.edit("i live in london and work in", "paris")
    assert 0 in bad.disturbed and bad.edit_id not in bad.disturbed
    assert teacher_forced(editor, PROMPT, TARGET)[1] is False
    assert {r.edit_id: r.disturbed for r in editor.edits()}[bad.edit_id] == bad.disturbed
