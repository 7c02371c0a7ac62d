"""What `memoir serve` and engine_args hand to vLLM (no vLLM needed: tests/test_vllm.py runs it)."""
import pytest

from memoir import MemoirConfig, MemoirEditor
from memoir.cli import main
from memoir.integrations import vllm as plugin
from test_subject_router import BACKGROUND
from tiny import tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(model folder, edits folder)``: a tiny Llama saved as a HF folder and one edit made on it."""
    root = tmp_path_factory.mktemp("serve")
    model, tok = tiny_model("llama")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    editor = MemoirEditor(model, tok, MemoirConfig(n_iter=5, num_context_templates=0), background_texts=BACKGROUND)
    editor.edit("the capital of japan is", "rome")
    editor.save(root / "edits")
    return root / "model", root / "edits"


def test_engine_args_turn_off_what_the_plugin_refuses_and_name_the_edits(saved):
    model, edits = saved
    args = plugin.engine_args(edits, str(model))
    assert args["enable_prefix_caching"] is False and args["enable_chunked_prefill"] is False
    assert args["max_num_batched_tokens"] >= args["max_model_len"]  # no chunking needed for any prompt
    assert args["hf_overrides"] == {"architectures": ["MemoirLlamaForCausalLM"], "memoir_edits": str(edits.resolve())}
    assert args["dtype"] == "float32" and args["model"] == str(model)
    assert plugin.engine_args(edits, str(model), enforce_eager=True)["enforce_eager"] is True


def test_serve_dry_run_prints_the_vllm_command(saved, capsys):
    model, edits = saved
    assert main(["serve", "--edits", str(edits), "--model", str(model), "--python", "/venv/bin/python", "--port",
                 "8123", "--dry-run", "--", "--enforce-eager"]) == 0
    command = capsys.readouterr().out.split()
    assert command[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    for flag in ("--no-enable-prefix-caching", "--no-enable-chunked-prefill", "--enforce-eager"):
        assert flag in command
    assert command[command.index("--port") + 1] == "8123"
    assert command[command.index("--served-model-name") + 1] == "model"


def test_serve_refuses_a_folder_without_saved_edits_and_an_unsupported_model(saved, tmp_path, capsys):
    model, edits = saved
    assert main(["serve", "--edits", str(tmp_path), "--model", str(model), "--dry-run"]) == 2
    assert "not a saved memoir memory" in capsys.readouterr().err
    gpt2, tok = tiny_model("gpt2")
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="serves"):
        plugin.engine_args(edits, str(tmp_path / "gpt2"))


def test_the_vllm_python_is_found_or_its_absence_explained(monkeypatch, tmp_path):
    assert plugin.vllm_python("/x/python") == "/x/python"
    monkeypatch.setenv("MEMOIR_VLLM_PYTHON", "/y/python")
    assert plugin.vllm_python() == "/y/python"
    monkeypatch.delenv("MEMOIR_VLLM_PYTHON")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setattr(plugin, "__file__", str(tmp_path / "memoir" / "integrations" / "vllm.py"))
    with pytest.raises(FileNotFoundError, match="setup_vllm.sh"):
        plugin.vllm_python()


def test_the_plugin_is_declared_as_a_vllm_general_plugin():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "memoir"]
    assert ep.value == "memoir.integrations.vllm:register"
