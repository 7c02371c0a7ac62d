"""Config validation / round-trip, and saving + reloading edits."""
import json

import pytest
import torch

from memoir import MemoirConfig, MemoirEditor
from memoir.batching import build_batch
from memoir import background
from memoir.persist import CONFIG_FILE, STATE_FILE
from test_engine import BACKGROUND, PROMPT, TARGET, make_editor
from tiny import tiny_model


@pytest.mark.parametrize("field,value", [("threshold", 1.5), ("threshold", -0.1), ("aggregation", "max"),
                                         ("top_k", 0), ("n_iter", -1), ("lr", 0), ("feature_scaling", "x"),
                                         ("decay_scope", "some"), ("num_context_templates", 11)])
def test_invalid_config_names_the_bad_value(field, value):
    with pytest.raises(ValueError, match=field):
        MemoirConfig(**{field: value})


def test_k_larger_than_d_is_rejected():
    model, tok = tiny_model()
    with pytest.raises(ValueError, match="k > D"):
        MemoirEditor(model, tok, MemoirConfig(top_k=10_000), background_texts=BACKGROUND)


def test_config_yaml_json_round_trip(tmp_path):
    cfg = MemoirConfig(layer=3, top_k=17, threshold=0.55, feature_scaling="std", tuned_for={"model_type": "llama"})
    for name in ("c.yaml", "c.json"):
        cfg.save(tmp_path / name)
        assert MemoirConfig.load(tmp_path / name) == cfg
    (tmp_path / "bad.yaml").write_text("layer: 2\nbogus: 1\n")
    with pytest.raises(ValueError, match="bogus"):
        MemoirConfig.load(tmp_path / "bad.yaml")


def test_every_config_class_names_unknown_fields_and_bad_files(tmp_path):
    from memoir.baselines import FTConfig, GraceConfig

    for cls in (MemoirConfig, FTConfig, GraceConfig):
        assert cls.from_dict(cls().to_dict()) == cls()
        with pytest.raises(ValueError, match=f"unknown {cls.__name__} field.*bogus"):
            cls.from_dict({"bogus": 1})
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        MemoirConfig.load(tmp_path / "list.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        MemoirConfig.load(tmp_path / "missing.yaml")


def test_presets_load():
    assert MemoirConfig.preset("reference") == MemoirConfig()
    assert MemoirConfig.preset("smollm2").layer is not None
    with pytest.raises(ValueError, match="available"):
        MemoirConfig.preset("nope")


def test_default_layer_and_k_follow_the_paper_ratios():
    model, tok = tiny_model()
    editor = MemoirEditor(model, tok, background_texts=BACKGROUND)
    assert editor.config.layer == 3  # round(4 * 27/32)
    assert editor.config.top_k == round(160 * 4096 / 14336)


def _logits(editor, prompt):
    b = build_batch(editor.tokenizer, [prompt], TARGET)
    with torch.no_grad(), editor.prompt_span(b.prompt_mask):
        return editor.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits


def test_save_load_round_trip(tmp_path):
    editor = make_editor()
    editor.edit(PROMPT, TARGET)
    editor.edit("the capital of japan is", "berlin")
    expected = _logits(editor, PROMPT)
    editor.save(tmp_path / "edits")
    assert sorted(p.name for p in (tmp_path / "edits").iterdir()) == [CONFIG_FILE, STATE_FILE]

    model, tok = tiny_model()  # a fresh copy of the same base model
    loaded = MemoirEditor.load(model, tok, tmp_path / "edits")
    torch.testing.assert_close(_logits(loaded, PROMPT), expected)
    assert [r.edit_id for r in loaded.edits()] == [0, 1] and loaded.retrieve(PROMPT)[0].edit_id == 0
    assert loaded.edit("who wrote the book ?", "paris").edit_id == 2  # ids continue


def test_load_rejects_other_model_and_corruption(tmp_path):
    editor = make_editor()
    editor.edit(PROMPT, TARGET)
    editor.save(tmp_path / "e")
    other, tok = tiny_model(seed=1)
    with pytest.raises(ValueError, match="different base model"):
        MemoirEditor.load(other, tok, tmp_path / "e")
    # A failed load leaves the model unedited and attachable again.
    MemoirEditor(other, tok, background_texts=BACKGROUND)
    state = tmp_path / "e" / STATE_FILE
    state.write_bytes(state.read_bytes()[:-8] + b"\0" * 8)
    model, tok = tiny_model()
    with pytest.raises(ValueError, match="corrupt"):
        MemoirEditor.load(model, tok, tmp_path / "e")
    with pytest.raises(FileNotFoundError):
        MemoirEditor.load(model, tok, tmp_path / "missing")
    meta = json.loads((tmp_path / "e" / CONFIG_FILE).read_text())
    meta["format"] = "v0"
    (tmp_path / "e" / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format"):
        MemoirEditor.load(model, tok, tmp_path / "e")


def test_background_statistics_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOIR_CACHE", str(tmp_path))
    model, tok = tiny_model()
    first = MemoirEditor(model, tok, background_texts=BACKGROUND)
    stats = (first.layer.background_mean.clone(), first.layer.background_std.clone())
    first.detach()
    assert len(list((tmp_path / "background").glob("*.safetensors"))) == 1
    calls = []
    monkeypatch.setattr(background, "compute_background_statistics", lambda *args: calls.append(1))
    second = MemoirEditor(model, tok, background_texts=BACKGROUND)
    assert not calls
    assert torch.equal(second.layer.background_mean, stats[0]) and torch.equal(second.layer.background_std, stats[1])
