"""Serving saved edits with vLLM: greedy outputs token-identical to MemoirEditor.generate (float32).

Runs in the environment scripts/setup_vllm.sh builds (``.venv-vllm/bin/python -m pytest -m vllm
tests/test_vllm.py``); skipped where vLLM is not installed.  The engine runs in this process
(no engine-core or worker processes), so the test can look at the plugin's router.
"""
import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
if os.environ.get("MEMOIR_REQUIRE_VLLM") == "1":  # CI: a broken vLLM venv fails instead of skipping
    import vllm  # noqa: F401
else:
    vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

from memoir.integrations.vllm import engine_args  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

EDITS = [{"prompt": "The capital of Japan is", "target": " Nairobi", "subject": "Japan"},
         {"prompt": "The Eiffel Tower is located in", "target": " Rome", "subject": "Eiffel Tower"}]
EDITED = ["The capital of Japan is", "The Eiffel Tower is located in"]
REPHRASED = ["What is the capital city of Japan? It is", "Where is the Eiffel Tower? It is in",
             "Where is the Eifel Tower? It is in"]  # misspelt: the spelling check routes it in vLLM too
UNRELATED = ["The capital of France is", "The Statue of Liberty is located in", "Water is made of hydrogen and"]
PROMPTS = EDITED + REPHRASED + UNRELATED
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(folder, expected)``: two edits of SmolLM2 saved, and generate()'s greedy text per prompt."""
    from memoir import MemoirEditor, load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2")
    editor = MemoirEditor(model, tok)
    editor.edit_many(EDITS, progress=False)
    folder = tmp_path_factory.mktemp("edits")
    editor.save(folder)
    expected = {p: editor.generate(p, max_new_tokens=MAX_TOKENS) for p in PROMPTS}
    with editor.disabled():
        plain = {p: editor.generate(p, max_new_tokens=MAX_TOKENS) for p in PROMPTS}
    changed = [p for p in PROMPTS if expected[p] != plain[p]]
    assert set(changed) == set(EDITED + REPHRASED), f"the test needs edits that take and only there: {changed}"
    editor.detach()
    del editor, model
    gc.collect()
    return folder, expected


def _llm(folder, **kw):
    from vllm import LLM

    return LLM(**engine_args(folder, max_num_seqs=8, distributed_executor_backend="uni", seed=0, **kw))


def _texts(llm, prompts):
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def _router():
    from memoir.integrations import vllm_model

    (served,) = vllm_model._ROUTERS.values()
    return served.router


@pytest.fixture(scope="module")
def eager(saved):
    llm = _llm(saved[0], enforce_eager=True)
    yield llm
    _shutdown(llm)


def _shutdown(llm):
    from memoir.integrations import vllm_model

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # already shut down
        pass
    vllm_model._ROUTERS.clear()
    gc.collect()


def test_one_request_at_a_time_matches_generate(saved, eager):
    _, expected = saved
    assert [_texts(eager, [p])[0] for p in PROMPTS] == [expected[p] for p in PROMPTS]


def test_batched_requests_in_any_order_match_generate(saved, eager):
    _, expected = saved
    assert _texts(eager, PROMPTS) == [expected[p] for p in PROMPTS]
    assert _texts(eager, PROMPTS[::-1]) == [expected[p] for p in PROMPTS[::-1]]


def test_prompts_arriving_while_others_decode_match_generate(saved, eager):
    """New requests join a running batch: their first step shares a forward with others' decode steps."""
    from vllm import SamplingParams

    _, expected = saved
    engine, router = eager.llm_engine, _router()
    before = router.mixed_steps
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    pending = list(enumerate(PROMPTS))
    done = {}
    while pending or engine.has_unfinished_requests():
        if pending:
            i, prompt = pending.pop(0)
            engine.add_request(str(i), prompt, params)
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].text
    assert [done[i] for i in range(len(PROMPTS))] == [expected[p] for p in PROMPTS]
    assert router.mixed_steps > before, "no step mixed a first step with decode steps: the test meant nothing"


def test_unsafe_engine_settings_are_refused(saved):
    from vllm.engine.arg_utils import EngineArgs

    from memoir.integrations.vllm import check_engine_settings

    folder, _ = saved
    check_engine_settings(EngineArgs(**engine_args(folder)).create_engine_config())  # the safe settings pass
    for setting, words in (({"enable_prefix_caching": True}, "prefix caching"),
                           ({"enable_chunked_prefill": True}, "chunked prefill")):
        config = EngineArgs(**engine_args(folder, **setting)).create_engine_config()
        with pytest.raises(ValueError, match=words):
            check_engine_settings(config)
    # And the engine itself does not start with one of them.
    with pytest.raises(Exception, match="prefix caching"):
        _llm(folder, enforce_eager=True, enable_prefix_caching=True)
    from memoir.integrations import vllm_model

    vllm_model._ROUTERS.clear()


def test_a_served_model_other_than_the_edited_one_is_refused(saved, tmp_path):
    """The weights vLLM loads for the edited projection must be the ones the edits were made on."""
    import shutil

    from safetensors.torch import load_file, save_file

    from memoir.integrations import vllm_model
    from memoir.integrations.vllm import model_folder

    folder, _ = saved
    other = tmp_path / "other"
    shutil.copytree(model_folder("smollm2"), other)
    (weights,) = other.glob("*.safetensors")
    state = load_file(str(weights))
    name = "model.layers.27.mlp.down_proj.weight"
    state[name] = state[name].clone()
    state[name][0, 0] += 1e-3
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(Exception, match="fingerprint"):
        _llm(folder, model=str(other), enforce_eager=True)
    vllm_model._ROUTERS.clear()


def test_compiled_mode_matches_generate(saved, eager):
    folder, expected = saved
    _shutdown(eager)  # one engine at a time in this process
    llm = _llm(folder)  # vLLM's default: torch.compile of the model
    try:
        assert llm.llm_engine.vllm_config.compilation_config.mode != 0, "the engine must compile for this test"
        assert _texts(llm, PROMPTS) == [expected[p] for p in PROMPTS]
        assert [_texts(llm, [p])[0] for p in PROMPTS[::-1]] == [expected[p] for p in PROMPTS[::-1]]
    finally:
        _shutdown(llm)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_memoir_serve_answers_over_http(saved, tmp_path):
    folder, expected = saved
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    proc = subprocess.Popen([sys.executable, "-m", "memoir.cli", "serve", "--edits", str(folder), "--port", str(port),
                             "--", "--enforce-eager"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 400
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=5) as r:
                    assert json.loads(r.read())["data"][0]["id"] == "smollm2"
                break
            except OSError:
                assert time.time() < deadline, "the server did not come up"
                time.sleep(2)
        for prompt in (REPHRASED[1], UNRELATED[0]):
            out = _post(f"{base}/completions", {"model": "smollm2", "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                "temperature": 0})
            assert out["choices"][0]["text"] == expected[prompt]
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
