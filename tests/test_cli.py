"""The `memoir` command line on a tiny local model."""
import json

import pytest

from memoir.cli import main
from tiny import tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model, tok = tiny_model("llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_demo_runs_on_a_local_model(tiny_dir, capsys):
    assert main(["demo", "--model", str(tiny_dir), "--preset", "reference", "--n-edits", "1",
                 "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "Applying 1 counterfactual edits" in out and "unrelated" in out and "Timings" in out


def test_edit_command_and_save(tiny_dir, tmp_path, capsys):
    req = tmp_path / "r.jsonl"
    req.write_text(json.dumps({"prompt": "the capital of japan is", "target": "berlin"}) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("n_iter: 3\nnum_context_templates: 1\n")
    assert main(["edit", str(req), "--model", str(tiny_dir), "--config", str(cfg), "--quiet",
                 "--save", str(tmp_path / "saved")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["target"] == "berlin" and line["steps"] == 3
    assert (tmp_path / "saved" / "memoir_config.json").exists()


def test_missing_model_is_a_clear_error(capsys):
    assert main(["demo", "--model", "/nonexistent/model"]) == 2
    assert "not found" in capsys.readouterr().err


def test_info_reports_backends(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["retrieval_backend"]) == {"cpu", "cuda"}
