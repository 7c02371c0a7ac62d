"""Evaluation metrics against hand-computed values, and the batched teacher-forced / generation drivers."""
import math

import pytest
import torch

from eval_helpers import OracleScorer
from memoir.batching import Batch, target_ids
from memoir.eval import metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def _hand_batch():
    # row 0: [pad, p, p, t1=5, t2=6]; row 1: [p, p, p, p, t1=7]
    ids = torch.tensor([[0, 1, 2, 5, 6], [1, 2, 3, 4, 7]])
    attn = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    pmask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    tmask = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    return Batch(ids, attn, pmask, tmask)


def test_score_targets_hand_computed():
    batch = _hand_batch()
    v = 10
    logits = torch.zeros(2, 5, v)
    logits[0, 2, 5] = 5.0  # row 0 predicts t1 right
    logits[0, 3, 9] = 5.0  # ... and t2 wrong (9 != 6)
    logits[1, 3, 7] = 5.0  # row 1 predicts its only target right
    scores = metrics.score_targets(logits, batch)
    assert [s.acc for s in scores] == [0.5, 1.0]
    assert scores[0].argmax == [5, 9] and scores[1].argmax == [7]
    assert [s.n_tokens for s in scores] == [2, 1]
    # NLL: log-softmax of a row with one logit 5 and nine zeros
    z = math.log(math.exp(5) + 9)
    nll_hit, nll_miss = z - 5, z  # target has the 5 / target has a 0
    assert scores[0].nll == pytest.approx((nll_hit + nll_miss) / 2, rel=1e-5)
    assert scores[1].nll == pytest.approx(nll_hit, rel=1e-5)
    assert scores[1].ppl == pytest.approx(math.exp(nll_hit), rel=1e-5)
    # the same from the last 3 positions only (logits_to_keep = longest target + 1)
    kept = metrics.score_targets(logits[:, -3:], batch)
    assert [s.acc for s in kept] == [0.5, 1.0] and kept[0].nll == pytest.approx(scores[0].nll)
    with pytest.raises(ValueError, match="miss target positions"):
        metrics.score_targets(logits[:, -2:], batch)


def test_uniform_logits_give_vocab_perplexity():
    batch = _hand_batch()
    scores = metrics.score_targets(torch.zeros(2, 5, 10), batch)
    assert all(s.ppl == pytest.approx(10.0, rel=1e-5) for s in scores)


def test_ood_accuracy_hand_computed():
    ids = torch.tensor([[0, 3, 4, 5]])
    attn = torch.tensor([[0, 1, 1, 1]])  # left pad: tokens 4 and 5 are scored (3 is the first real token)
    logits = torch.zeros(1, 4, 6)
    logits[0, 1, 4] = 10.0  # p(4) ~ 0.9998 > 0.8
    logits[0, 2, 5] = 1.0  # p(5) = e / (e + 5) ~ 0.35 < 0.8
    logits[0, 0, 3] = 10.0  # would predict the first real token from a pad: not counted
    assert metrics.ood_accuracy(logits, ids, attn) == [0.5]
    assert metrics.ood_accuracy(logits, ids, attn, threshold=0.3) == [1.0]


def test_agreement_and_exact_match():
    assert metrics.agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    with pytest.raises(ValueError):
        metrics.agreement([1, 2], [1])
    assert metrics.exact_match("  university of Michigan, in Ann Arbor", "University of Michigan")
    assert not metrics.exact_match("The University of Michigan", "University of Michigan")
    assert metrics.mean([1.0, None, float("nan"), 0.0]) == 0.5 and metrics.mean([None]) is None


def test_teacher_forced_alignment_padding_and_space_tokenisation(eval_tokenizer):
    tok = eval_tokenizer
    # A target that tokenises differently after a space than alone.
    assert target_ids(tok, "Michigan") != tok("Michigan", add_special_tokens=False)["input_ids"]
    prompts = ["What university did Watts Humphrey attend?", "Q:", "The capital of France is"]
    targets = ["University of Michigan", "Hugo Weaving", "Paris"]
    oracle = OracleScorer(tok, len(tok))
    scores = metrics.teacher_forced(oracle, prompts, targets, batch_size=2)
    assert [s.acc for s in scores] == [1.0, 1.0, 1.0]
    assert [s.n_tokens for s in scores] == [len(target_ids(tok, t)) for t in targets]
    assert [s.argmax for s in scores] == [target_ids(tok, t) for t in targets]
    assert len(oracle.calls) == 2  # 2 + 1 rows

    # A model that predicts the space-less tokenisation of the target gets partial credit only.
    def no_space(batch):
        nxt = torch.roll(batch.input_ids, -1, dims=1).clone()
        for r in range(batch.input_ids.shape[0]):
            pos = batch.target_mask[r].nonzero().flatten()
            alone = tok("Michigan", add_special_tokens=False)["input_ids"]
            if len(pos) == len(target_ids(tok, "Michigan")):
                nxt[r, pos[0] - 1] = alone[0]
        return nxt

    s = metrics.teacher_forced(OracleScorer(tok, len(tok), no_space), ["Watts Humphrey attended"], ["Michigan"])[0]
    n = len(target_ids(tok, "Michigan"))
    assert s.acc == pytest.approx((n - 1) / n)


def test_logit_budget_splits_batches(eval_tokenizer):
    tok = eval_tokenizer
    oracle = OracleScorer(tok, len(tok))
    prompts = ["What university did Watts Humphrey attend?"] * 5
    targets = ["University of Michigan"] * 5
    keep = len(target_ids(tok, targets[0])) + 1
    metrics.teacher_forced(oracle, prompts, targets, batch_size=16, logit_budget=2 * keep * len(tok))
    assert [c[0][0] for c in oracle.calls] == [2, 2, 1]


def test_ood_scores_and_generation_em(eval_tokenizer):
    tok = eval_tokenizer
    oracle = OracleScorer(tok, len(tok))
    assert metrics.ood_scores(oracle, ["The capital of France is Paris.", "Q: what"]) == [1.0, 1.0]

    class Gen:
        tokenizer = tok

        def generate_ids(self, prompts, max_new_tokens):
            self.max_new = max_new_tokens
            return [target_ids(tok, "Paris is nice") for _ in prompts]

    g = Gen()
    out = metrics.generation_em(g, ["a", "b"], ["Paris", "Rome"])
    assert [m for m, _ in out] == [True, False]
    assert out[0][1].strip().startswith("Paris")
    assert g.max_new == max(len(target_ids(tok, t)) for t in ["Paris", "Rome"]) + 2
