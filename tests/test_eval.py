"""Evaluation harness: metrics vs hand-computed values, loaders, baselines, and the eval CLI.

Everything runs on a tiny random Llama with a BPE tokenizer trained here (offline, seconds).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from memoir.batching import Batch, build_batch, target_ids
from memoir.eval import metrics
from memoir.eval.datasets import EditRecord, detect_format, load_records

SENTENCES = [
    "What university did Watts Humphrey attend? University of Michigan",
    "What university did Watts Humphrey take part in? University of Michigan",
    "nq question: who played desmond doss father in hacksaw ridge Hugo Weaving",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Which river flows through Vienna? The Danube flows through Vienna and Budapest.",
    "Who wrote the novel Moby Dick? Herman Melville wrote it in 1851.",
    "This is a Wikipedia passage about carole gist. She was the first contestant from Michigan.",
    "Tesla, Inc., originally known as Tesla Motors, is an American electric vehicle company.",
    "I think you should go because yes, it is a good idea. Q: what is the answer?",
]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: one thread avoids OpenMP overhead (10x faster on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.padding_side = "left"
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama")
    eos = tiny_tokenizer.eos_token_id
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, initializer_range=0.1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def tiny(tiny_model_dir):
    from memoir.models import load_model

    return load_model(str(tiny_model_dir))


class OracleScorer:
    """Fake model: one-hot logits predicting ``predict(batch)[b, t]`` at position t."""

    def __init__(self, tokenizer, vocab, predict=None):
        self.tokenizer, self.vocab = tokenizer, vocab
        self.predict = predict or (lambda batch: torch.roll(batch.input_ids, -1, dims=1))  # the true next token
        self.calls = []

    def logits(self, batch, keep):
        nxt = self.predict(batch)
        logits = torch.full((*nxt.shape, self.vocab), -10.0)
        logits.scatter_(-1, nxt.unsqueeze(-1), 10.0)
        self.calls.append((batch.input_ids.shape, keep))
        return logits if keep is None else logits[:, -keep:]


# ----------------------------------------------------------------------------- pure metric functions
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


# ----------------------------------------------------------------------------- batched drivers
def test_teacher_forced_alignment_padding_and_space_tokenisation(tiny_tokenizer):
    tok = tiny_tokenizer
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


def test_logit_budget_splits_batches(tiny_tokenizer):
    tok = tiny_tokenizer
    oracle = OracleScorer(tok, len(tok))
    prompts = ["What university did Watts Humphrey attend?"] * 5
    targets = ["University of Michigan"] * 5
    keep = len(target_ids(tok, targets[0])) + 1
    metrics.teacher_forced(oracle, prompts, targets, batch_size=16, logit_budget=2 * keep * len(tok))
    assert [c[0][0] for c in oracle.calls] == [2, 2, 1]


def test_ood_scores_and_generation_em(tiny_tokenizer):
    tok = tiny_tokenizer
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


# ----------------------------------------------------------------------------- loaders
def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


ZSRE = {"src": "What university did Watts Humphrey attend?", "alt": "University of Michigan",
        "rephrase": "What university did Watts Humphrey take part in?",
        "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving"}
KNOWEDIT = {"prompt": "What species is ZIC3 specific to?", "target_new": "male", "ground_truth": ["human"],
            "rephrase_prompt": "In which living being can you find ZIC3?",
            "locality": {"Relation_Specificity": [{"prompt": "The strand orientation of ZIC3 is",
                                                   "ground_truth": [["forward strand", "plus"]]}]}}
HALLU = {"prompt": "This is a Wikipedia passage about carole gist.", "target_new": "She was from Michigan.",
         "locality_prompt": "Description Map of South America.", "locality_ground_truth": "It has a scratch."}
TEMPORAL = {"prompt": "Tesla, Inc.,", "target_new": "originally known as Tesla Motors, is a company.",
            "ood_rephrase": "Tesla, Inc., an American company, makes cars.",
            "locality_prompt": "What can we learn?", "locality_ground_truth": "in digital banking"}
CF_ROME = {"case_id": 7, "requested_rewrite": {"prompt": "{} originates from", "subject": "Spike Hughes",
                                               "target_new": {"str": "Philadelphia"}, "target_true": {"str": "London"}},
           "paraphrase_prompts": ["Spike Hughes is native to", "Spike Hughes was born in"],
           "neighborhood_prompts": ["Max Mosley originates from", "Lita Ford was native to"]}
CF_FLAT = {"case_id": 1, "prompt": "The official religion of Edwin of Northumbria is", "target_new": "Islam",
           "rephrase_prompt": "Edwin of Northumbria is affiliated with the religion",
           "locality_prompt": "The official religion of Paul is", "locality_ground_truth": "Christianity"}


@pytest.mark.parametrize("record,fmt", [
    (ZSRE, "zsre"), (KNOWEDIT, "knowedit"), (HALLU, "hallucination"), (TEMPORAL, "temporal"),
    (CF_ROME, "counterfact_rome"), (CF_FLAT, "counterfact_flat"),
])
def test_loaders_auto_and_explicit(tmp_path, record, fmt):
    p = _write(tmp_path, "d.json", [record, record])
    recs, got = load_records(p)
    assert got == fmt and len(recs) == 2 and detect_format(record) == fmt
    explicit = "counterfact" if fmt.startswith("counterfact") else fmt
    assert load_records(p, explicit)[1] == fmt
    r = recs[0]
    assert isinstance(r, EditRecord) and r.prompt.strip() and r.target.strip()
    assert r.loc_prompt and r.loc_answer
    assert (r.rephrase is None) == (fmt == "hallucination")


def test_loader_field_mapping(tmp_path):
    r = load_records(_write(tmp_path, "k.json", [KNOWEDIT]))[0][0]
    assert (r.prompt, r.target, r.loc_answer) == (KNOWEDIT["prompt"], "male", "forward strand")
    r = load_records(_write(tmp_path, "c.json", [CF_ROME]))[0][0]
    assert (r.prompt, r.target, r.rephrase) == ("Spike Hughes originates from", "Philadelphia", "Spike Hughes is native to")
    assert (r.loc_prompt, r.loc_answer) == ("Max Mosley originates from", "London")
    assert r.extra["case_id"] == 7
    r = load_records(_write(tmp_path, "z.json", [ZSRE]), limit=1)[0][0]
    assert (r.prompt, r.target, r.rephrase, r.loc_answer) == (ZSRE["src"], ZSRE["alt"], ZSRE["rephrase"], "Hugo Weaving")


def test_empty_locality_answer_is_skipped(tmp_path):
    bad = dict(HALLU, locality_ground_truth="")
    recs, _ = load_records(_write(tmp_path, "h.json", [HALLU, bad]))
    assert recs[0].loc_prompt is not None
    assert recs[1].loc_prompt is None and recs[1].loc_answer is None and "loc_skipped" in recs[1].extra


@pytest.mark.parametrize("mutate,fmt,field", [
    (lambda r: r.pop("alt"), "zsre", "alt"),
    (lambda r: r.update(rephrase=""), "zsre", "rephrase"),
    (lambda r: r.update(src=3), "zsre", "src"),
    (lambda r: r.update(locality={"Relation_Specificity": []}), "knowedit", "locality.Relation_Specificity"),
    (lambda r: r.pop("target_new"), "hallucination", "target_new"),
    (lambda r: r.pop("ood_rephrase"), "temporal", "ood_rephrase"),
    (lambda r: r["requested_rewrite"].update(prompt="no placeholder"), "counterfact", "requested_rewrite.prompt"),
    (lambda r: r.update(neighborhood_prompts=[]), "counterfact", "neighborhood_prompts"),
])
def test_malformed_record_names_index_and_field(tmp_path, mutate, fmt, field):
    import copy

    base = {"zsre": ZSRE, "knowedit": KNOWEDIT, "hallucination": HALLU, "temporal": TEMPORAL, "counterfact": CF_ROME}[fmt]
    bad = copy.deepcopy(base)
    mutate(bad)
    p = _write(tmp_path, "bad.json", [base, base, bad])
    with pytest.raises(ValueError, match=rf"record 2: field '{field}'"):
        load_records(p, fmt)


def test_loader_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_records(tmp_path / "x.json")
    with pytest.raises(ValueError, match="record 0: unrecognised record fields"):
        load_records(_write(tmp_path, "u.json", [{"question": "q"}]))
    with pytest.raises(ValueError, match="record 1: expected a JSON object"):
        load_records(_write(tmp_path, "l.json", [ZSRE, ["not", "a", "dict"]]), "zsre")
    with pytest.raises(ValueError, match="unknown format"):
        load_records(_write(tmp_path, "z.json", [ZSRE]), "squad")


# ----------------------------------------------------------------------------- baselines
def test_grace_routes_exact_prompt_and_splits_conflicts(tiny):
    from memoir.baselines import GraceConfig, GraceEditor

    model, tok = tiny
    g = GraceEditor(model, tok, GraceConfig(layer=2, n_iter=20, eps=1e-3))
    r = g.edit("The capital of France is", "Rome")
    assert r.action == "new" and len(g.layer) == 1
    batch = build_batch(tok, ["The capital of France is", "Who wrote the novel Moby Dick?"], ["Rome", "Rome"])
    with g.prompt_span(batch.prompt_mask):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    assert g.layer.last_slots.tolist() == [0, -1]  # routed per row, no Python branching
    with g.disabled():
        plain = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    assert not torch.allclose(logits[0], plain[0]) and torch.equal(logits[1], plain[1])
    assert r.loss < metrics.score_targets(plain, batch)[0].nll  # the value was trained
    # Same key, different label: the newer fact overwrites the slot.
    r2 = g.edit("The capital of France is", "Paris")
    assert r2.action == "overwrite" and len(g.layer) == 1 and g.layer.labels == ["Paris"]
    # A near key (within eps_init + radius) with a different label: new key, both radii split.
    g.config.eps = 1e3
    r3 = g.edit("Who wrote the novel Moby Dick?", "Herman Melville")
    assert r3.action == "split" and len(g.layer) == 2
    d = float(torch.dist(g.layer.keys[0], g.layer.keys[1]))
    assert float(g.layer.radii[0]) == pytest.approx(d / 2 - 1e-5) and float(g.layer.radii[1]) == pytest.approx(d / 2)
    with g.prompt_span(batch.prompt_mask):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    assert g.layer.last_slots.tolist() == [0, 1]
    # same label again: the key is reused, no new entry
    assert g.edit("The capital of France is", "Paris").action in ("reuse", "expand") and len(g.layer) == 2
    one = build_batch(tok, ["The capital of France is"], ["Paris"])
    with g.prompt_span(one.prompt_mask):
        logits = model(input_ids=one.input_ids, attention_mask=one.attention_mask, use_cache=False).logits
    # generation routes at prefill (from the attention mask) like teacher forcing does
    out = metrics.greedy_generate_ids(model, tok, ["The capital of France is"], 2)
    assert g.layer.last_slots.tolist() == [0]
    first_target = int(one.target_mask[0].nonzero()[0])
    assert out[0][0] == int(logits[0, first_target - 1].argmax())


def test_ft_changes_only_the_layer_and_restores(tiny):
    from memoir.baselines import FTConfig, FTEditor

    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ft = FTEditor(model, tok, FTConfig(layer=1, n_iter=3, lr=1e-2))
    r = ft.edit("The capital of France is", "Rome")
    assert r.steps >= 1
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    ft.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["ft", "grace"])
def test_baselines_replay_equals_plain_training(tiny, method, monkeypatch):
    """Replaying the frozen layers below the edit changes the speed, not the edit."""
    import copy

    from memoir.baselines import FTConfig, FTEditor, GraceConfig, GraceEditor
    from memoir.baselines import _train

    model, tok = tiny
    make = {"ft": lambda m: FTEditor(m, tok, FTConfig(layer=2, n_iter=6, lr=1e-2)),
            "grace": lambda m: GraceEditor(m, tok, GraceConfig(layer=2, n_iter=6))}[method]
    fast_model, slow_model = copy.deepcopy(model), copy.deepcopy(model)
    fast = make(fast_model)
    real = _train.train_on_target
    seen_targets = []

    def plain(*args, target=None, **kwargs):  # the same loop without the shortcuts
        seen_targets.append(target)
        return real(*args, **kwargs)

    rf = fast.edit("The capital of France is", "Rome")
    monkeypatch.setattr(_train, "train_on_target", plain)
    monkeypatch.setattr(f"memoir.baselines.{method if method == 'ft' else 'grace'}.train_on_target", plain)
    slow = make(slow_model)
    rs = slow.edit("The capital of France is", "Rome")
    assert seen_targets and seen_targets[0] is not None  # the editor asks for the shortcut
    assert rf.steps == rs.steps and rf.loss == pytest.approx(rs.loss, rel=1e-4, abs=1e-6)
    for (k, a), b in zip(fast_model.state_dict().items(), slow_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)
    if method == "grace":
        torch.testing.assert_close(fast.layer.values, slow.layer.values, rtol=1e-4, atol=1e-6)
    assert all(type(l).__name__ != "_Replay" for l in fast.target.layers)


# ----------------------------------------------------------------------------- the CLI, end to end
CLI_DATA = [
    dict(ZSRE),
    {"src": "The capital of France is", "alt": "Rome", "rephrase": "France has its capital in",
     "loc": "Who wrote the novel Moby Dick?", "loc_ans": "Herman Melville"},
    {"src": "Which river flows through Vienna?", "alt": "The Rhine", "rephrase": "Vienna lies on which river?",
     "loc": "The capital of Italy is", "loc_ans": "Rome"},
]


@pytest.fixture(autouse=True)
def _private_pre_cache(tmp_path, monkeypatch):
    """CLI runs share the unedited pass through a cache; keep each test's to itself."""
    from memoir.eval import prepass

    monkeypatch.setattr(prepass, "default_dir", lambda: tmp_path / "pre-edit-cache")


def _run_cli(tmp_path, model_dir, method, data, extra=()):
    from memoir.eval.cli_eval import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("n_iter: 3\nnum_context_templates: 2\nlayer: 2\nthreshold: 0.4\nft:\n  lr: 0.001\ngrace:\n  eps: 1.0\n")
    out = tmp_path / f"{method}.json"
    rc = main(["eval", "--model", str(model_dir), "--data", str(data), "--n", "3", "--method", method,
               "--config", str(cfg), "--eval-every", "2", "--quiet", "--output", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("method", ["memoir", "ft", "grace"])
def test_cli_eval_each_method(tmp_path, tiny_model_dir, method):
    data = _write(tmp_path, "zsre.json", CLI_DATA + [dict(ZSRE, src="Unused record")])
    res = _run_cli(tmp_path, tiny_model_dir, method, data)
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


def test_cli_eval_hallucination_and_temporal(tmp_path, tiny_model_dir):
    data = _write(tmp_path, "h.json", [HALLU, dict(HALLU, locality_ground_truth=""), dict(HALLU, prompt="Another one.")])
    res = _run_cli(tmp_path, tiny_model_dir, "memoir", data)
    assert res["kind"] == "ppl" and res["rel_ppl"] > 1.0 and res["gen"] is None and res["rel_em"] is None
    assert res["records"][1]["loc"] is None if "loc" in res["records"][1] else True
    assert "loc_skipped" in res["records"][1]
    assert res["mean"] == pytest.approx((res["rel"] + res["loc"]) / 2)
    data = _write(tmp_path, "t.json", [TEMPORAL] * 3)
    res = _run_cli(tmp_path, tiny_model_dir, "grace", data)
    assert res["kind"] == "ood" and 0.0 <= res["ood_acc"] <= 1.0 and res["gen"] == res["ood_acc"]


def test_cli_plot(tmp_path, tiny_model_dir):
    from memoir.eval.cli_eval import main

    data = _write(tmp_path, "zsre.json", CLI_DATA)
    res = _run_cli(tmp_path, tiny_model_dir, "ft", data)
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


def test_cli_reports_bad_input(tmp_path, tiny_model_dir, capsys):
    from memoir.eval.cli_eval import main

    bad = _write(tmp_path, "bad.json", [dict(ZSRE, alt="")])
    rc = main(["eval", "--model", str(tiny_model_dir), "--data", str(bad), "--method", "ft", "--output",
               str(tmp_path / "o.json")])
    assert rc == 2 and "record 0: field 'alt'" in capsys.readouterr().err


def test_memoir_cli_wires_eval(tmp_path, tiny_model_dir):
    cli = pytest.importorskip("memoir.cli")
    data = _write(tmp_path, "zsre.json", CLI_DATA[:2])
    out = tmp_path / "r.json"
    rc = cli.main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--method", "grace", "--n-iter", "2",
                   "--layer", "1", "--no-em", "--quiet", "--output", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n_edits"] == 2 and res["layer"] == 1 and res["rel_em"] is None and res["config"]["n_iter"] == 2


# ----------------------------------------------------------------------------- resumable runs
class _Crash(RuntimeError):
    pass


def _crash_edits_at(monkeypatch, cls, position):
    """Make ``cls.edit`` raise at edit ``position`` (a killed run); returns the real method to put back."""
    real_edit = cls.edit

    def crashing_edit(self, prompt, target, pos, subject=None):
        if pos == position:
            raise _Crash("killed")
        return real_edit(self, prompt, target, pos, subject=subject)

    monkeypatch.setattr(cls, "edit", crashing_edit)
    return real_edit


def _eval_argv(model_dir, data, method, out, *extra):
    return ["eval", "--model", str(model_dir), "--data", str(data), "--n", "4", "--method", method, "--n-iter", "3",
            "--layer", "2", "--threshold", "0.4", "--quiet", "--output", str(out), *extra]


@pytest.mark.parametrize("method", ["memoir", "ft", "grace"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, tiny_model_dir, method, monkeypatch, capsys):
    from memoir.eval import methods
    from memoir.eval.cli_eval import main

    data = _write(tmp_path, "zsre.json", CLI_DATA + [dict(ZSRE, src="The tallest mountain is", alt="Mont Blanc")])
    whole = tmp_path / "whole.json"
    assert main(_eval_argv(tiny_model_dir, data, method, whole, "--checkpoint-every", "2")) == 0
    assert not (tmp_path / "whole.json.partial").exists()  # removed once the results are written

    cls = {"memoir": methods.MemoirMethod, "ft": methods.FTMethod, "grace": methods.GraceMethod}[method]
    out = tmp_path / "cut.json"
    real_edit = _crash_edits_at(monkeypatch, cls, 3)
    with pytest.raises(_Crash):
        main(_eval_argv(tiny_model_dir, data, method, out, "--checkpoint-every", "2"))
    monkeypatch.setattr(cls, "edit", real_edit)
    assert (tmp_path / "cut.json.partial").is_dir() and not out.exists()
    assert "2/4 edits" in capsys.readouterr().err  # the progress line of the last checkpoint

    # Starting over by accident is refused; a different run cannot pick the checkpoint up.
    assert main(_eval_argv(tiny_model_dir, data, method, out)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(_eval_argv(tiny_model_dir, data, method, out, "--resume", "--n-iter", "2")) == 2
    assert "differs in: config" in capsys.readouterr().err

    assert main(_eval_argv(tiny_model_dir, data, method, out, "--resume")) == 0
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


def test_plot_series_separates_variants_of_one_method():
    from memoir.eval.plot import series

    def result(n, source, config, method="memoir", rel=0.9):
        return {"method": method, "n_edits": n, "data": "d/zsre.json", "config_source": source,
                "config": config, "rel": rel, "_path": f"{method}_{n}.json"}

    runs = [result(10, "preset:smollm2", {"k": 1}), result(100, "preset:smollm2", {"k": 1}),
            result(10, "cfg/energy90.yaml", {"k": 2}),
            # the preset changed between runs: same label, different config -> two lines
            result(732, "preset:smollm2", {"k": 3}),
            result(10, "preset:smollm2", {"lr": 1}, method="ft"), result(100, "default", {"lr": 1}, method="ft")]
    data = series(runs)
    labels = sorted(label for label, _ in data)
    assert "memoir (energy90)" in labels and "ft" in labels
    preset_lines = [k for k in data if k[0].startswith("memoir (preset smollm2) #")]
    assert len(preset_lines) == 2
    assert sorted(len(data[k]) for k in preset_lines) == [1, 2]
    assert [n for n, _ in data[("ft", "zsre")]] == [10, 100]  # the MEMOIR preset name does not split a baseline
    # one config reached under two names: one line (labelled by the first run)
    same = series([result(50, "cfg/other.yaml", {"k": 4}), result(600, "preset:smollm2", {"k": 4})])
    assert len(same) == 1 and len(next(iter(same.values()))) == 2


def test_age_profile_averages_records_by_edit_position():
    from memoir.eval.plot import age_profile

    records = [{"rel": 0.0, "gen": 1.0, "loc": 1.0}, {"rel": 1.0, "gen": None, "loc": 1.0},
               {"rel": 0.5, "gen": 0.5, "loc": 0.0, "rel_ppl": 4.0}]
    prof = age_profile({"records": records}, 2)
    assert [x for x, _ in prof] == [0.5, 2.0]  # middle position of each block, oldest first
    first, last = prof[0][1], prof[1][1]
    assert first["rel"] == 0.5 and first["gen"] == 1.0 and first["loc"] == 1.0 and first["rel_ppl"] is None
    assert first["mean"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert last["rel_ppl"] == 4.0 and last["mean"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no per-edit records"):
        age_profile({"records": []}, 2)
    with pytest.raises(ValueError, match="block"):
        age_profile({"records": records}, 0)


# ----------------------------------------------------------------------------- shared pre-edit pass
def test_pre_edit_pass_is_shared_between_methods(tmp_path, tiny_model_dir, caplog):
    from memoir.eval.cli_eval import main

    data = _write(tmp_path, "zsre.json", CLI_DATA)
    cache = tmp_path / "pre"

    def run(method, name, *extra):
        out = tmp_path / f"{name}.json"
        assert main(_eval_argv(tiny_model_dir, data, method, out, "--no-em", *extra)) == 0
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


def test_model_digest_tracks_weights_and_records_key(tiny_model_dir):
    from memoir.eval.datasets import EditRecord
    from memoir.eval.prepass import model_digest, pass_key
    from memoir.models import load_model

    model, tok = load_model(str(tiny_model_dir))
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


def test_run_eval_script_names_runs_and_resumes(tmp_path, tiny_model_dir, monkeypatch):
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
    env = dict(os.environ, PYTHON=sys.executable, MODEL=str(tiny_model_dir), DATA_DIR=str(tmp_path / "data"),
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
    _crash_edits_at(monkeypatch, methods.FTMethod, 1)
    monkeypatch.setenv("MEMOIR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(_Crash):
        main(["eval", "--model", str(tiny_model_dir), "--data", str(zsre), "--format", "zsre", "--n", "3",
              "--method", "ft", *config_args, "--checkpoint-every", "1", "--output", str(target)])
    assert (out / "zsre_ft_n3.json.partial").is_dir() and not target.exists()
    # ... and the script picks it up.
    env.update(METHODS="ft", N_OVERRIDE="3")
    log = run_script()
    assert "(resuming)" in log
    assert json.loads(target.read_text())["resumed_at"] == [1]
    assert not (out / "zsre_ft_n3.json.partial").exists()


class _ScriptedMethod(OracleScorer):
    """A method whose continuations and routes are scripted per prompt (no model)."""

    name = "scripted"

    def __init__(self, tokenizer, vocab, continuation, route):
        super().__init__(tokenizer, vocab)
        self.model = None
        self.continuation, self.route = continuation, route
        self._last = []

    def logits(self, batch, keep):
        self._last = [None] * batch.input_ids.shape[0]
        return super().logits(batch, keep)

    def generate_ids(self, prompts, max_new_tokens):
        self._last = [self.route(p) for p in prompts]
        return [self.continuation(p) for p in prompts]

    def routes(self):
        return self._last


def test_every_paraphrase_and_neighbour_is_measured(tiny_tokenizer):
    from memoir.eval.datasets import _counterfact_rome, _Rec
    from memoir.eval.runner import evaluate, summarise

    rec = _counterfact_rome(_Rec(dict(CF_ROME, neighborhood_prompts=["max mosley originates from", "lita ford was native to",
                                                                      "the city of paris is in"]), 0, "t"))
    assert rec.paraphrases == CF_ROME["paraphrase_prompts"] and len(rec.neighbours) == 3
    fires = {"lita ford was native to"}
    unedited = _ScriptedMethod(tiny_tokenizer, len(tiny_tokenizer), lambda p: [1, 2], lambda p: None)
    pre = evaluate(unedited, [rec], "qa", em=False)
    pre_nbr = {0: pre[0].pop("nbr_ids")}
    assert pre_nbr[0] == [[1, 2]] * 3
    # After editing: one neighbour fires an edit and changes its continuation, one changes without firing.
    edited = _ScriptedMethod(tiny_tokenizer, len(tiny_tokenizer),
                             lambda p: [9] if p in fires or p.startswith("the city") else [1, 2],
                             lambda p: 0 if p in fires else None)
    rows = evaluate(edited, [rec], "qa", {}, em=False, pre_nbr=pre_nbr)
    assert rows[0]["nbr_spec"] == pytest.approx(1 / 3) and rows[0]["nbr_fire"] == pytest.approx(1 / 3)
    assert rows[0]["gen_all"] == pytest.approx(1.0)  # the oracle predicts every target token
    summary = summarise(rows)
    assert summary["nbr_spec"] == pytest.approx(1 / 3) and summary["gen_all"] == pytest.approx(1.0)


def test_cli_eval_counterfact_reports_paraphrase_and_neighbour_columns(tmp_path, tiny_model_dir):
    recs = [CF_ROME, dict(CF_ROME, case_id=8, requested_rewrite=dict(CF_ROME["requested_rewrite"], subject="Lita Ford"),
                          paraphrase_prompts=["Lita Ford is native to", "Lita Ford was born in"])]
    data = _write(tmp_path, "cf.json", recs + [CF_ROME])
    for method in ("memoir", "grace"):
        res = _run_cli(tmp_path, tiny_model_dir, method, data)
        for key in ("gen_all", "route_gen_all", "nbr_spec", "nbr_fire"):
            assert 0.0 <= res[key] <= 1.0, (method, key)
        assert "nbr_ids" not in res["records"][0] and "nbr_spec" in res["records"][0]
        assert res["pre"]["nbr_fire"] == 0.0  # the unedited model routes nothing


def test_summary_scores_the_edits_still_stored_after_supersede():
    from memoir.eval.runner import summarise

    rows = [{"position": 0, "rel": 0.0, "gen": 0.0, "loc": 1.0},
            {"position": 1, "rel": 1.0, "gen": 0.5, "loc": 1.0},
            {"position": 2, "rel": 1.0, "gen": 1.0, "loc": 1.0}]
    out = summarise(rows, [{}, {"replaced": [0]}, {}])
    assert out["rel"] == pytest.approx(2 / 3) and out["n_superseded"] == 1
    assert out["rel_live"] == 1.0 and out["gen_live"] == 0.75
    assert "n_superseded" not in summarise(rows, [{}, {}, {}])
