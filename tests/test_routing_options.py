"""Routing options: max-abs prompt aggregation and the automatically calibrated threshold."""
import pytest
import torch

from memoir import MemoirConfig, MemoirEditor
from memoir.ops import best_match
from memoir.tophash import prompt_features
from tiny import tiny_model

BACKGROUND = ["the city of paris is in france", "who wrote the book ?", "the river nile is long",
              "what is the capital of japan ?", "i live in london", "yes the answer is no"]
PROMPT, TARGET = "the eiffel tower is located in the city of", "rome"


def test_maxabs_aggregation_hand_computed():
    acts = torch.tensor([[[1.0, -5.0], [3.0, 0.0], [9.0, 9.0]],
                         [[0.0, 0.0], [-4.0, 2.0], [1.0, 1.0]]])
    span = torch.tensor([[True, True, False], [False, False, False]])
    bg = torch.tensor([1.0, 1.0])
    feat = prompt_features(acts, span, "maxabs_decentered", bg)
    # Row 0: |a - 1| over the first two tokens -> max(0, 2) and max(6, 1); the padded 9s are ignored.
    torch.testing.assert_close(feat, torch.tensor([[2.0, 6.0], [0.0, 0.0]]))  # empty span -> zeros
    torch.testing.assert_close(prompt_features(acts, span, "maxabs_decentered", None)[0], torch.tensor([3.0, 5.0]))
    # Non-contiguous input gives the same answer.
    t = acts.transpose(1, 2).contiguous().transpose(1, 2)
    assert not t.is_contiguous()
    torch.testing.assert_close(prompt_features(t, span, "maxabs_decentered", bg), feat)


def test_maxabs_editor_edits_and_routes():
    model, tok = tiny_model("llama")
    editor = MemoirEditor(model, tok, MemoirConfig(aggregation="maxabs_decentered", n_iter=25, threshold=0.6,
                                                   num_context_templates=2), background_texts=BACKGROUND)
    editor.edit(PROMPT, TARGET)
    assert editor.retrieve(PROMPT)[0].edit_id == 0
    assert editor.generate(PROMPT, max_new_tokens=3).strip().startswith(TARGET)


def test_threshold_config_values():
    assert MemoirConfig(threshold="0.5").threshold == 0.5
    with pytest.raises(ValueError, match="threshold_mode: auto"):
        MemoirConfig(threshold="auto")
    for bad in ("automatic", 1.5, -0.1, None):
        with pytest.raises(ValueError, match="threshold"):
            MemoirConfig(threshold=bad)
    with pytest.raises(ValueError, match="threshold_mode"):
        MemoirConfig(threshold_mode="learned")
    with pytest.raises(ValueError, match="threshold_margin"):
        MemoirConfig(threshold_margin=2.0)
    cfg = MemoirConfig(threshold_mode="auto", threshold_margin=0.05)
    assert MemoirConfig.from_dict(cfg.to_dict()) == cfg


def _auto_editor(**overrides):
    model, tok = tiny_model("llama")
    cfg = MemoirConfig(**{"threshold_mode": "auto", "threshold_margin": 0.02, "n_iter": 20,
                          "num_context_templates": 2, **overrides})
    return MemoirEditor(model, tok, cfg, background_texts=BACKGROUND)


def test_auto_threshold_sits_above_every_background_text(tmp_path):
    editor = _auto_editor()
    assert editor.threshold == 1.0  # empty bank
    editor.edit(PROMPT, TARGET)
    editor.edit("who is the president of the club ?", "alice")
    bg = editor.background_masks()
    assert bg.shape[0] == len(BACKGROUND)
    scores, _ = best_match(bg, editor.layer.bank.words, 0.0)
    assert editor.threshold == pytest.approx(min(1.0, float(scores.max()) + 0.02))
    # No background text fires an edit; the edited prompt still routes to its own edit.
    assert all(r.edit_id is None for r in editor.retrieve(BACKGROUND))
    assert editor.retrieve(PROMPT)[0].edit_id == 0
    # Saved and reloaded: same masks, same tau.
    editor.save(tmp_path / "mem")
    model, tok = tiny_model("llama")
    loaded = MemoirEditor.load(model, tok, tmp_path / "mem")
    assert torch.equal(loaded.background_masks(), bg)
    assert loaded.threshold == editor.threshold


def test_fixed_threshold_is_not_recalibrated():
    editor = _auto_editor(threshold_mode="fixed", threshold=0.7)
    editor.edit(PROMPT, TARGET)
    assert editor.threshold == 0.7 and editor.calibrate_threshold() == 0.7


def test_eval_cli_threshold_arguments():
    import argparse

    from memoir.eval.cli_eval import _load_configs, add_eval_parser

    def parse(*extra):
        parser = argparse.ArgumentParser()
        add_eval_parser(parser.add_subparsers())
        return parser.parse_args(["eval", "--data", "d.json", "--output", "o.json", *extra])

    cfg = _load_configs(parse("--preset", "reference", "--threshold", "0.45", "--threshold-mode", "auto"))[0]
    assert cfg.threshold == 0.45 and cfg.threshold_mode == "auto"
    assert cfg.on_conflict == "keep", "memoir eval keeps conflicting edits unless told"
    assert _load_configs(parse("--preset", "reference", "--on-conflict", "supersede"))[0].on_conflict == "supersede"
    with pytest.raises(SystemExit):
        parse("--threshold", "auto")
