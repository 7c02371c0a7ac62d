"""The evaluation runner: every paraphrase and neighbour measured; summaries after supersede."""
import pytest

from eval_helpers import CF_ROME, ScriptedMethod


def test_every_paraphrase_and_neighbour_is_measured(eval_tokenizer):
    from memoir.eval.datasets import _counterfact_rome, _Rec
    from memoir.eval.runner import evaluate, summarise

    rec = _counterfact_rome(_Rec(dict(CF_ROME, neighborhood_prompts=["max mosley originates from", "lita ford was native to",
                                                                      "the city of paris is in"]), 0, "t"))
    assert rec.paraphrases == CF_ROME["paraphrase_prompts"] and len(rec.neighbours) == 3
    fires = {"lita ford was native to"}
    unedited = ScriptedMethod(eval_tokenizer, len(eval_tokenizer), lambda p: [1, 2], lambda p: None)
    pre = evaluate(unedited, [rec], "qa", em=False)
    pre_nbr = {0: pre[0].pop("nbr_ids")}
    assert pre_nbr[0] == [[1, 2]] * 3
    # After editing: one neighbour fires an edit and changes its continuation, one changes without firing.
    edited = ScriptedMethod(eval_tokenizer, len(eval_tokenizer),
                             lambda p: [9] if p in fires or p.startswith("the city") else [1, 2],
                             lambda p: 0 if p in fires else None)
    rows = evaluate(edited, [rec], "qa", {}, em=False, pre_nbr=pre_nbr)
    assert rows[0]["nbr_spec"] == pytest.approx(1 / 3) and rows[0]["nbr_fire"] == pytest.approx(1 / 3)
    assert rows[0]["gen_all"] == pytest.approx(1.0)  # the oracle predicts every target token
    summary = summarise(rows)
    assert summary["nbr_spec"] == pytest.approx(1 / 3) and summary["gen_all"] == pytest.approx(1.0)


def test_summary_scores_the_edits_still_stored_after_supersede():
    from memoir.eval.runner import summarise

    rows = [{"position": 0, "rel": 0.0, "gen": 0.0, "loc": 1.0},
            {"position": 1, "rel": 1.0, "gen": 0.5, "loc": 1.0},
            {"position": 2, "rel": 1.0, "gen": 1.0, "loc": 1.0}]
    out = summarise(rows, [{}, {"replaced": [0]}, {}])
    assert out["rel"] == pytest.approx(2 / 3) and out["n_superseded"] == 1
    assert out["rel_live"] == 1.0 and out["gen_live"] == 0.75
    assert "n_superseded" not in summarise(rows, [{}, {}, {}])
