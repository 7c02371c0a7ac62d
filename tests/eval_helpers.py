"""Data and helpers shared by the evaluation tests (records of every supported format, a CLI runner,
scripted fake methods).  Fixtures live in conftest.py."""
from __future__ import annotations

import json

import torch

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


def write_json(tmp_path, name, data):
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


CLI_DATA = [
    dict(ZSRE),
    {"src": "The capital of France is", "alt": "Rome", "rephrase": "France has its capital in",
     "loc": "Who wrote the novel Moby Dick?", "loc_ans": "Herman Melville"},
    {"src": "Which river flows through Vienna?", "alt": "The Rhine", "rephrase": "Vienna lies on which river?",
     "loc": "The capital of Italy is", "loc_ans": "Rome"},
]


def run_cli(tmp_path, model_dir, method, data, extra=()):
    from memoir.eval.cli_eval import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("n_iter: 3\nnum_context_templates: 2\nlayer: 2\nthreshold: 0.4\nft:\n  lr: 0.001\ngrace:\n  eps: 1.0\n")
    out = tmp_path / f"{method}.json"
    rc = main(["eval", "--model", str(model_dir), "--data", str(data), "--n", "3", "--method", method,
               "--config", str(cfg), "--eval-every", "2", "--quiet", "--output", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


class Crash(RuntimeError):
    pass


def crash_edits_at(monkeypatch, cls, position):
    """Make ``cls.edit`` raise at edit ``position`` (a killed run); returns the real method to put back."""
    real_edit = cls.edit

    def crashing_edit(self, prompt, target, pos, subject=None):
        if pos == position:
            raise Crash("killed")
        return real_edit(self, prompt, target, pos, subject=subject)

    monkeypatch.setattr(cls, "edit", crashing_edit)
    return real_edit


def eval_argv(model_dir, data, method, out, *extra):
    return ["eval", "--model", str(model_dir), "--data", str(data), "--n", "4", "--method", method, "--n-iter", "3",
            "--layer", "2", "--threshold", "0.4", "--quiet", "--output", str(out), *extra]


class ScriptedMethod(OracleScorer):
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
