"""Typed config fields, presets that know their model, the generated configuration table, peft-style verbs."""
import logging
import re
import pathlib
import warnings

import pytest

from memoir import MemoirConfig, MemoirEditor, config as config_mod
from memoir.models import model_signature
from test_engine import BACKGROUND, PROMPT, TARGET
from tiny import tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_yaml_values_are_type_and_range_checked_with_file_field_and_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\n")  # PyYAML reads this as the string '1e-3'
    assert MemoirConfig.load(path).lr == pytest.approx(1e-3)
    for text, field in (("early_stop: 'false'\n", "early_stop"), ("lr: .inf\n", "lr"), ("lr: 0\n", "lr"),
                        ("grad_clip: -1\n", "grad_clip"), ("weight_decay: .nan\n", "weight_decay"),
                        ("n_iter: 2.5\n", "n_iter"), ("router: masks\n", "router"), ("top_k: true\n", "top_k")):
        path.write_text(text)
        with pytest.raises(ValueError) as err:
            MemoirConfig.load(path)
        assert str(path) in str(err.value) and field in str(err.value), err.value
    path.write_text("full_forward: false\n")  # a run switch, not a method setting
    with pytest.raises(ValueError, match="unknown MemoirConfig field.*full_forward"):
        MemoirConfig.load(path)


def test_threshold_is_a_number_and_its_mode_a_separate_field():
    assert MemoirConfig(threshold_mode="auto", threshold=0.3).threshold == 0.3
    with pytest.raises(ValueError, match="threshold_mode: auto"):
        MemoirConfig(threshold="auto")


def test_a_config_file_can_derive_from_a_preset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: smollm2\nrouter: subject\n")
    cfg = MemoirConfig.load(path)
    assert cfg == MemoirConfig(**{**MemoirConfig.preset("smollm2").to_dict(), "router": "subject"})
    path.write_text("base: nope\n")
    with pytest.raises(ValueError, match="no preset 'nope'"):
        MemoirConfig.load(path)


def test_preset_takes_names_only():
    for name in ("../presets/smollm2", str(config_mod.PRESET_DIR / "smollm2.yaml"), "smollm2.yaml"):
        with pytest.raises(ValueError, match="no preset"):
            MemoirConfig.preset(name)


def test_configuration_doc_table_is_generated_from_the_field_metadata():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    found = re.search(r"<!-- config-table:start -->\n(.*?)\n<!-- config-table:end -->", doc, re.S)
    assert found, "docs/configuration.md lacks the generated configuration table"
    assert found.group(1) == config_mod.markdown_table(), \
        "regenerate it: memoir config --write docs/configuration.md"


def test_every_field_has_help_and_a_type():
    import dataclasses

    for f in dataclasses.fields(MemoirConfig):
        assert f.metadata.get("help") and f.metadata.get("kind"), f.name


def _fake_preset_dir(tmp_path, signature):
    import yaml

    (tmp_path / "tinypreset.yaml").write_text(yaml.safe_dump({"n_iter": 7, "tuned_for": signature}))
    return tmp_path


def test_a_recognised_model_gets_its_preset_and_an_unknown_one_the_reference(tmp_path, monkeypatch, caplog):
    model, tok = tiny_model("llama")
    caplog.set_level(logging.INFO, logger="memoir")
    editor = MemoirEditor(model, tok, background_texts=BACKGROUND)
    assert editor.config.n_iter == MemoirConfig().n_iter
    assert "no preset is tuned for this model" in caplog.text and "reference" in caplog.text
    editor.unload()
    caplog.clear()
    monkeypatch.setattr(config_mod, "PRESET_DIR", _fake_preset_dir(tmp_path, model_signature(model)))
    editor = MemoirEditor(model, tok, background_texts=BACKGROUND)
    assert editor.config.n_iter == 7
    assert "'tinypreset' preset" in caplog.text
    editor.unload()


def test_a_preset_for_another_model_warns():
    model, tok = tiny_model("llama")
    other = MemoirConfig.preset("smollm2")
    with pytest.warns(UserWarning, match="tuned for"):
        MemoirEditor(model, tok, MemoirConfig(**{**other.to_dict(), "layer": 2, "top_k": 20, "subject_layer": 1}),
                     background_texts=BACKGROUND).unload()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MemoirEditor(model, tok, MemoirConfig(layer=1, top_k=20), background_texts=BACKGROUND).unload()


def test_peft_style_verbs(tmp_path):
    model, tok = tiny_model("llama")
    base = model.model.layers[2].mlp.down_proj
    editor = MemoirEditor(model, tok, MemoirConfig(n_iter=30, num_context_templates=0, threshold=0.6, layer=2),
                          background_texts=BACKGROUND)
    editor.edit(PROMPT, TARGET)
    edited = editor.generate(PROMPT, max_new_tokens=3)
    with editor.disabled():
        plain = editor.generate(PROMPT, max_new_tokens=3)
    assert edited != plain, "the edit must change the output for the test to mean anything"
    with editor.disable_adapter():
        assert editor.generate(PROMPT, max_new_tokens=3) == plain
    editor.save_pretrained(tmp_path / "e")
    assert editor.unload() is model and model.model.layers[2].mlp.down_proj is base
    again = MemoirEditor.from_pretrained(model, tmp_path / "e", tokenizer=tok)
    assert again.generate(PROMPT, max_new_tokens=3) == edited
    # The edited model's state_dict carries the memory beside the base weights (documented in the README).
    keys = set(model.state_dict())
    assert {"model.layers.2.mlp.down_proj.memory", "model.layers.2.mlp.down_proj.base.weight"} <= keys
    again.unload()
    assert not any("memory" in k for k in model.state_dict())


def test_a_config_file_may_start_from_another_file(tmp_path):
    (tmp_path / "common.yaml").write_text("base: smollm2\nmemory: shared\ncolumn_protection: 1.0\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "k96.yaml").write_text("base: ../common.yaml\ntop_k: 96\n")
    cfg = MemoirConfig.load(sub / "k96.yaml")
    preset = MemoirConfig.preset("smollm2")
    assert (cfg.memory, cfg.column_protection, cfg.top_k) == ("shared", 1.0, 96)
    assert cfg.router == preset.router and cfg.lr == preset.lr
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="loop"):
        MemoirConfig.load(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ValueError, match="not found"):
        MemoirConfig.load(tmp_path / "c.yaml")
