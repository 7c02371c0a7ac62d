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
    req.write_text(json.dumps({"prompt": "the capital of japan is", "target": "berlin", "subject": "japan",
                               "aliases": ["tokyo"]}) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("n_iter: 3\nnum_context_templates: 1\n")
    assert main(["edit", str(req), "--model", str(tiny_dir), "--config", str(cfg), "--quiet",
                 "--save", str(tmp_path / "saved")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["target"] == "berlin" and line["steps"] == 3
    assert (tmp_path / "saved" / "memoir_config.json").exists()
    saved = json.loads((tmp_path / "saved" / "memoir_config.json").read_text())
    assert [(e["subject"], e["aliases"]) for e in saved["edits"]] == [("japan", ["tokyo"])]


def test_edit_command_trains_batches_under_private_memory(tiny_dir, tmp_path, capsys):
    req = tmp_path / "r.jsonl"
    facts = [("the capital of japan is", "berlin"), ("i live in the city of", "rome"), ("the sky is", "green")]
    req.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in facts))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("n_iter: 3\nnum_context_templates: 1\nmemory: private\n")
    assert main(["edit", str(req), "--model", str(tiny_dir), "--config", str(cfg), "--quiet", "--batch-size", "2",
                 "--save", str(tmp_path / "saved")]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["edit_id"] for x in lines] == [0, 1, 2] and all(x["steps"] <= 3 for x in lines)
    shared = tmp_path / "shared.yaml"
    shared.write_text("n_iter: 3\nnum_context_templates: 1\n")
    with pytest.raises(SystemExit, match="memory: private"):
        main(["edit", str(req), "--model", str(tiny_dir), "--config", str(shared), "--quiet", "--batch-size", "2"])


def test_missing_model_is_a_clear_error(capsys):
    assert main(["demo", "--model", "/nonexistent/model"]) == 2
    assert "not found" in capsys.readouterr().err


def test_info_reports_backends(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["retrieval_backend"]) == {"cpu", "cuda"}


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("lines, where", [
    (['{"prompt": "the capital of japan is", "target": "berlin"}', "", '{"prompt": "i live in", "target": '],
     "r.jsonl:3: not JSON"),
    (['{"prompt": "the capital of japan is", "target": "berlin"}', '["i live in", null]'], "line 2: edit request"),
    (['[{"prompt": "the capital of japan is", "target": "berlin"}, {"prompt": "i live in"}]'], "item 1: edit request"),
    (['{"prompt": "the capital of japan is", "target": "berlin", "subject": "japan", "aliases": "nippon"}'],
     "line 1: edit request .*aliases must be a list"),
])
def test_edit_command_checks_the_whole_file_before_loading_the_model(tmp_path, lines, where, monkeypatch):
    import memoir

    monkeypatch.setattr(memoir, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    req = _write_lines(tmp_path / "r.jsonl", lines)
    with pytest.raises(SystemExit, match=where):
        main(["edit", str(req), "--model", "unused", "--quiet"])


def test_edit_command_saves_finished_edits_when_interrupted(tiny_dir, tmp_path, monkeypatch, capsys):
    from memoir import MemoirEditor

    req = _write_lines(tmp_path / "r.jsonl", [json.dumps({"prompt": p, "target": t}) for p, t in
                                              [("the capital of japan is", "berlin"), ("i live in", "rome"),
                                               ("the river nile is", "short")]])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("n_iter: 2\nnum_context_templates: 0\n")
    real_edit, calls = MemoirEditor.edit, []

    def edit_then_interrupt(self, *a, **k):
        calls.append(a)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_edit(self, *a, **k)

    monkeypatch.setattr(MemoirEditor, "edit", edit_then_interrupt)
    saved = tmp_path / "saved"
    assert main(["edit", str(req), "--model", str(tiny_dir), "--config", str(cfg), "--quiet",
                 "--save", str(saved)]) == 130
    meta = json.loads((saved / "memoir_config.json").read_text())
    assert [e["prompt"] for e in meta["edits"]] == ["the capital of japan is", "i live in"]
    assert "interrupted after 2 of 3 edits" in capsys.readouterr().err


def test_eval_refuses_a_negative_offset(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--data", "unused.json", "--offset", "-1"])
    assert "negative" in capsys.readouterr().err


def test_inspect_shows_a_saved_memory_and_refuses_a_tampered_one(tiny_dir, tmp_path, capsys):
    req = _write_lines(tmp_path / "r.jsonl", [json.dumps({"prompt": "the capital of japan is", "target": "berlin"})])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("n_iter: 3\nnum_context_templates: 0\n")
    saved = tmp_path / "saved"
    assert main(["edit", str(req), "--model", str(tiny_dir), "--config", str(cfg), "--quiet", "--save", str(saved)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "1 edits" in out and "'the capital of japan is' -> 'berlin'" in out and "checks passed" in out
    assert main(["inspect", str(saved), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [e["target"] for e in info["edits"]] == ["berlin"] and info["memory"]["columns_written"] > 0
    meta = json.loads((saved / "memoir_config.json").read_text())
    meta["edits"][0]["target"] = "paris"
    (saved / "memoir_config.json").write_text(json.dumps(meta))
    assert main(["inspect", str(saved)]) == 2
    assert "changed after it was saved" in capsys.readouterr().err
