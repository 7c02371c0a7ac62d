"""`memoir eval` end to end on a tiny model: every method, resumable runs, the shared pre-edit pass,
experiments/run_eval.sh."""
import json

import pytest
import torch

from eval_helpers import (CF_ROME, CLI_DATA, HALLU, TEMPORAL, ZSRE, Crash, crash_edits_at, eval_argv, run_cli,
                          write_json)

pytestmark = pytest.mark.usefixtures("one_thread", "private_pre_cache")


@pytest.mark.parametrize("method", ["memoir", "ft", "grace"])
def test_cli_eval_each_method(tmp_path, eval_model_dir, method):
    data = write_json(tmp_path, "zsre.json", CLI_DATA + [dict(ZSRE, src="Unused record")])
    res = run_cli(tmp_path, eval_model_dir, method, data)
    for key in ("method", "model", "n_edits", "rel", "gen", "loc", "rel_em", "gen_em", "mean", "edit_seconds_total",
                "eval_seconds", "config", "machine", "records", "data", "curve", "pre", "layer"):
        assert key in res, key
    assert res["method"] == method and res["n_edits"] == 3 and res["format"] == "zsre" and res["layer"] == 2
    assert res["config"]["n_iter"] == 3
    for key in ("rel", "gen", "loc", "rel_em", "gen_em"):
        assert 0.0 <= res[key] <= 1.0
    assert res["mean"] == pytest.approx((res["rel"] + res["gen"] + res["loc"]) / 3)
    assert [c["n_edits"] for c in res["curve"]] == [2, 3]
    assert len(res["records"]) == 3 and res["records"][1]["prompt"] == "The capital of France is"
    rec = res["records"][0]
    for key in ("rel", "gen", "loc", "rel_em", "gen_em", "rel_output", "edit", "pre_rel"):
        assert key in rec, key
    if method in ("memoir", "grace"):
        assert 0.0 <= res["route_rel"] <= 1.0 and "route_rel" in rec
    if method == "grace":
        assert res["route_rel"] == 1.0  # an edit prompt always finds its own key (distance 0)
    if method == "ft":
        assert res["config"]["lr"] == 0.001


def test_cli_eval_hallucination_and_temporal(tmp_path, eval_model_dir):
    data = write_json(tmp_path, "h.json", [HALLU, dict(HALLU, locality_ground_truth=""), dict(HALLU, prompt="Another one.")])
    res = run_cli(tmp_path, eval_model_dir, "memoir", data)
    assert res["kind"] == "ppl" and res["rel_ppl"] > 1.0 and res["gen"] is None and res["rel_em"] is None
    assert res["records"][1].get("loc") is None  # no locality ground truth: not scored
    assert "loc_skipped" in res["records"][1]
    assert res["mean"] == pytest.approx((res["rel"] + res["loc"]) / 2)
    data = write_json(tmp_path, "t.json", [TEMPORAL] * 3)
    res = run_cli(tmp_path, eval_model_dir, "grace", data)
    assert res["kind"] == "ood" and 0.0 <= res["ood_acc"] <= 1.0 and res["gen"] == res["ood_acc"]


def test_cli_plot(tmp_path, eval_model_dir):
    from memoir.eval.cli_eval import main

    data = write_json(tmp_path, "zsre.json", CLI_DATA)
    res = run_cli(tmp_path, eval_model_dir, "ft", data)
    # a second point at another N for the same method
    res2 = dict(res, n_edits=1, rel=0.5)
    (tmp_path / "ft1.json").write_text(json.dumps(res2))
    out = tmp_path / "plot.png"
    assert main(["plot", str(tmp_path / "ft.json"), str(tmp_path / "ft1.json"), "--output", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert main(["plot", str(tmp_path / "ft.json"), "--curve", "--output", str(tmp_path / "c.png")]) == 0
    assert main(["plot", str(tmp_path / "ft.json"), "--by-age", "2", "--output", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").stat().st_size > 1000
    assert main(["plot", str(tmp_path / "ft.json"), "--by-age", "2", "--curve", "--output", str(tmp_path / "x.png")]) == 2


def test_cli_reports_bad_input(tmp_path, eval_model_dir, capsys):
    from memoir.eval.cli_eval import main

    bad = write_json(tmp_path, "bad.json", [dict(ZSRE, alt="")])
    rc = main(["eval", "--model", str(eval_model_dir), "--data", str(bad), "--method", "ft", "--output",
               str(tmp_path / "o.json")])
    assert rc == 2 and "record 0: field 'alt'" in capsys.readouterr().err


def test_memoir_cli_wires_eval(tmp_path, eval_model_dir):
    from memoir import cli

    data = write_json(tmp_path, "zsre.json", CLI_DATA[:2])
    out = tmp_path / "r.json"
    rc = cli.main(["eval", "--model", str(eval_model_dir), "--data", str(data), "--method", "grace", "--n-iter", "2",
                   "--layer", "1", "--no-em", "--quiet", "--output", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n_edits"] == 2 and res["layer"] == 1 and res["rel_em"] is None and res["config"]["n_iter"] == 2


@pytest.mark.parametrize("method", ["memoir", "ft", "grace"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, eval_model_dir, method, monkeypatch, capsys):
    from memoir.eval import methods
    from memoir.eval.cli_eval import main

    data = write_json(tmp_path, "zsre.json", CLI_DATA + [dict(ZSRE, src="The tallest mountain is", alt="Mont Blanc")])
    whole = tmp_path / "whole.json"
    assert main(eval_argv(eval_model_dir, data, method, whole, "--checkpoint-every", "2")) == 0
    assert not (tmp_path / "whole.json.partial").exists()  # removed once the results are written

    cls = {"memoir": methods.MemoirMethod, "ft": methods.FTMethod, "grace": methods.GraceMethod}[method]
    out = tmp_path / "cut.json"
    real_edit = crash_edits_at(monkeypatch, cls, 3)
    with pytest.raises(Crash):
        main(eval_argv(eval_model_dir, data, method, out, "--checkpoint-every", "2"))
    monkeypatch.setattr(cls, "edit", real_edit)
    assert (tmp_path / "cut.json.partial").is_dir() and not out.exists()
    assert "2/4 edits" in capsys.readouterr().err  # the progress line of the last checkpoint

    # Starting over by accident is refused; a different run cannot pick the checkpoint up.
    assert main(eval_argv(eval_model_dir, data, method, out)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(eval_argv(eval_model_dir, data, method, out, "--resume", "--n-iter", "2")) == 2
    assert "differs in: config" in capsys.readouterr().err

    assert main(eval_argv(eval_model_dir, data, method, out, "--resume")) == 0
    a, b = json.loads(whole.read_text()), json.loads(out.read_text())
    assert b["resumed_at"] == [2] and a["resumed_at"] == []
    assert not (tmp_path / "cut.json.partial").exists()
    for ra, rb in zip(a["records"], b["records"]):
        assert ra["edit"]["loss"] == pytest.approx(rb["edit"]["loss"], rel=1e-4, abs=1e-6)
        assert ra["edit"]["steps"] == rb["edit"]["steps"]
        for key in ("rel", "gen", "loc", "rel_em", "gen_em", "pre_rel", "route_rel", "route_gen"):
            assert ra.get(key) == pytest.approx(rb.get(key)), key
    for key in ("rel", "gen", "loc", "rel_em", "gen_em", "mean"):
        assert a[key] == pytest.approx(b[key]), key


def test_pre_edit_pass_is_shared_between_methods(tmp_path, eval_model_dir, caplog):
    from memoir.eval.cli_eval import main

    data = write_json(tmp_path, "zsre.json", CLI_DATA)
    cache = tmp_path / "pre"

    def run(method, name, *extra):
        out = tmp_path / f"{name}.json"
        assert main(eval_argv(eval_model_dir, data, method, out, "--no-em", *extra)) == 0
        return json.loads(out.read_text())

    ft = run("ft", "ft", "--pre-cache", str(cache))
    assert ft["pre_eval_reused"] is False and len(list(cache.glob("*.json"))) == 1
    shared = run("memoir", "memoir_shared", "--pre-cache", str(cache))
    own = run("memoir", "memoir_own", "--no-pre-cache")
    assert shared["pre_eval_reused"] is True and own["pre_eval_reused"] is False
    # The unedited model is the same under every method: the shared pass gives MEMOIR's own numbers.
    for key in ("rel", "gen", "loc", "mean"):
        assert shared[key] == own[key], key
    for a, b in zip(shared["records"], own["records"]):
        assert (a["pre_rel"], a["pre_gen"], a.get("loc")) == (b["pre_rel"], b["pre_gen"], b.get("loc"))

    # Anything the pass depends on is part of the key: another batch size is a new entry.
    assert run("ft", "ft_b2", "--pre-cache", str(cache), "--batch-size", "2")["pre_eval_reused"] is False
    assert len(list(cache.glob("*.json"))) == 2
    # A damaged entry is recomputed (with a warning) and rewritten, not fatal.
    for f in cache.glob("*.json"):
        f.write_text("{not json")
    assert run("ft", "ft_again", "--pre-cache", str(cache))["pre_eval_reused"] is False
    assert "unreadable pre-edit cache entry" in caplog.text
    assert run("grace", "grace", "--pre-cache", str(cache))["pre_eval_reused"] is True


def test_model_digest_tracks_weights_and_records_key(eval_model_dir):
    from memoir.eval.datasets import EditRecord
    from memoir.eval.prepass import model_digest, pass_key
    from memoir.models import load_model

    model, tok = load_model(str(eval_model_dir))
    before = model_digest(model, tok)
    assert model_digest(model, tok) == before
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    after = model_digest(model, tok)
    assert after != before
    recs = [EditRecord(prompt="a", target="b")]
    other = [EditRecord(prompt="a", target="c")]
    assert pass_key(after, recs, "qa", 16) != pass_key(after, other, "qa", 16)
    assert pass_key(after, recs, "qa", 16) != pass_key(after, recs, "ppl", 16)
    assert pass_key(after, recs, "qa", 16) != pass_key(before, recs, "qa", 16)


def test_run_eval_script_names_runs_and_resumes(tmp_path, eval_model_dir, monkeypatch):
    """experiments/run_eval.sh end to end on the tiny model: MEMOIR outputs carry MEMOIR_NAME,
    existing outputs are skipped, and a run whose snapshot was left by a crash is resumed."""
    import os
    import pathlib
    import shutil
    import subprocess
    import sys

    from memoir.eval import methods
    from memoir.eval.cli_eval import main

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    repo = pathlib.Path(__file__).resolve().parents[1]
    zsre = tmp_path / "data" / "zsre" / "zsre_mend_eval_portability_gpt4.public.json"
    zsre.parent.mkdir(parents=True)
    zsre.write_text(json.dumps(CLI_DATA))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("n_iter: 2\nnum_context_templates: 0\nlayer: 2\nthreshold: 0.4\n")
    out = tmp_path / "out"
    config_args = ["--config", str(cfg), "--quiet", "--no-em"]
    env = dict(os.environ, PYTHON=sys.executable, MODEL=str(eval_model_dir), DATA_DIR=str(tmp_path / "data"),
               OUT=str(out), ONLY="zsre", METHODS="memoir ft", N_OVERRIDE="2", CONFIG_ARGS=" ".join(config_args),
               ZSRE_EVAL_EVERY="0", CHECKPOINT_EVERY="1", MEMOIR_CACHE=str(tmp_path / "cache"))
    env.pop("THREADS", None)

    def run_script():
        proc = subprocess.run(["bash", str(repo / "experiments" / "run_eval.sh")], env=env, cwd=repo,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    log = run_script()
    assert json.loads((out / "zsre_memoir-relgate_n2.json").read_text())["n_edits"] == 2
    assert json.loads((out / "zsre_ft_n2.json").read_text())["method"] == "ft"
    assert log.count("skip ") == 4  # N = 100 and 732 map to n2 under N_OVERRIDE: run once per method
    assert not list(out.glob("*.partial"))

    # Crash an FT-L run after its first edit, with the arguments the script passes ...
    target = out / "zsre_ft_n3.json"
    crash_edits_at(monkeypatch, methods.FTMethod, 1)
    monkeypatch.setenv("MEMOIR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(Crash):
        main(["eval", "--model", str(eval_model_dir), "--data", str(zsre), "--format", "zsre", "--n", "3",
              "--method", "ft", *config_args, "--checkpoint-every", "1", "--output", str(target)])
    assert (out / "zsre_ft_n3.json.partial").is_dir() and not target.exists()
    # ... and the script picks it up.
    env.update(METHODS="ft", N_OVERRIDE="3")
    log = run_script()
    assert "(resuming)" in log
    assert json.loads(target.read_text())["resumed_at"] == [1]
    assert not (out / "zsre_ft_n3.json.partial").exists()


def test_cli_eval_counterfact_reports_paraphrase_and_neighbour_columns(tmp_path, eval_model_dir):
    recs = [CF_ROME, dict(CF_ROME, case_id=8, requested_rewrite=dict(CF_ROME["requested_rewrite"], subject="Lita Ford"),
                          paraphrase_prompts=["Lita Ford is native to", "Lita Ford was born in"])]
    data = write_json(tmp_path, "cf.json", recs + [CF_ROME])
    for method in ("memoir", "grace"):
        res = run_cli(tmp_path, eval_model_dir, method, data)
        for key in ("gen_all", "route_gen_all", "nbr_spec", "nbr_fire"):
            assert 0.0 <= res[key] <= 1.0, (method, key)
        assert "nbr_ids" not in res["records"][0] and "nbr_spec" in res["records"][0]
        assert res["pre"]["nbr_fire"] == 0.0  # the unedited model routes nothing


def test_cli_eval_trains_edits_in_batches_under_private_memory(tmp_path, eval_model_dir):
    data = write_json(tmp_path, "zsre.json", CLI_DATA + [dict(ZSRE, src="Who is the fourth record?")])
    cfg = tmp_path / "private.yaml"
    cfg.write_text("n_iter: 5\nnum_context_templates: 1\nlayer: 2\nthreshold: 0.4\nmemory: private\n")
    from memoir.eval.cli_eval import main

    out = tmp_path / "batched.json"
    assert main(["eval", "--model", str(eval_model_dir), "--data", str(data), "--n", "4", "--method", "memoir",
                 "--config", str(cfg), "--edit-batch", "3", "--eval-every", "2", "--quiet",
                 "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    # Batches of 3 then 1: the curve point for 2 edits falls at the end of the first batch.
    assert [c["n_edits"] for c in res["curve"]] == [3, 4] and res["edit_batch"] == 3
    assert [r["edit"]["edit_id"] for r in res["records"]] == [0, 1, 2, 3]
    assert all(r["edit"]["steps"] <= 5 for r in res["records"])
    with pytest.raises(SystemExit, match="edit-batch"):
        main(["eval", "--model", str(eval_model_dir), "--data", str(data), "--n", "2", "--method", "ft",
              "--config", str(cfg), "--edit-batch", "2", "--quiet", "--output", str(tmp_path / "ft.json")])


def test_cli_eval_no_subject_gives_every_edit_without_its_subject(tmp_path, eval_model_dir, monkeypatch):
    from memoir.eval.methods import MemoirMethod

    recs = [CF_ROME, dict(CF_ROME, case_id=8, requested_rewrite=dict(CF_ROME["requested_rewrite"], subject="Lita Ford"))]
    data = write_json(tmp_path, "cf.json", recs + [CF_ROME])
    seen, real_edit = [], MemoirMethod.edit

    def recording_edit(self, prompt, target, pos, subject=None):
        seen.append(subject)
        return real_edit(self, prompt, target, pos, subject=subject)

    monkeypatch.setattr(MemoirMethod, "edit", recording_edit)
    assert run_cli(tmp_path, eval_model_dir, "memoir", data)["subjects"] is True
    assert seen[:2] == [CF_ROME["requested_rewrite"]["subject"], "Lita Ford"]
    seen.clear()
    assert run_cli(tmp_path, eval_model_dir, "memoir", data, extra=["--no-subject"])["subjects"] is False
    assert seen == [None, None, None]
