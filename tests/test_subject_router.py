"""router: subject: an edit is eligible only for queries whose hidden states carry its subject."""
import pytest
import torch

from memoir import MemoirConfig, MemoirEditor
from memoir.types import EditRequest
from tiny import tiny_model

BACKGROUND = ["the city of paris is in france", "who wrote the book ?", "the river nile is long",
              "what is the capital of japan ?", "i live in london", "yes the answer is no"]
EDIT = ("the capital of japan is", "rome", "japan")
NEIGHBOUR = "the capital of spain is"  # same wording, another subject


def editor_with(router, **overrides):
    model, tok = tiny_model("llama")
    cfg = MemoirConfig(**{"n_iter": 30, "num_context_templates": 0, "threshold": 0.3, "router": router,
                          "subject_layer": 2, "subject_threshold": 0.9, **overrides})
    return MemoirEditor(model, tok, cfg, background_texts=BACKGROUND)


def test_subject_router_rejects_a_same_wording_neighbour_the_mask_router_accepts():
    mask, subject = editor_with("mask"), editor_with("subject")
    for ed in (mask, subject):
        ed.edit(*EDIT)
    assert mask.retrieve([NEIGHBOUR])[0].edit_id == 0, "the mask router must confuse them for the test to mean anything"
    got = [r.edit_id for r in subject.retrieve([EDIT[0], "what is the capital of japan ?", NEIGHBOUR])]
    assert got == [0, 0, None]
    # generate() routes the same way: the neighbour keeps the unedited continuation.
    with subject.disabled():
        plain = subject.generate([NEIGHBOUR], max_new_tokens=3)
    assert subject.generate([NEIGHBOUR], max_new_tokens=3) == plain
    assert subject.generate([EDIT[0]], max_new_tokens=1)[0].strip() == "rome"


def test_edit_without_subject_still_routes_its_prompt():
    ed = editor_with("subject")
    ed.edit_many([EditRequest("the eiffel tower is located in the city of", "rome")], progress=False)
    assert ed.retrieve(["the eiffel tower is located in the city of"])[0].edit_id == 0
    assert ed.layer.subject.keys.shape[0] == 3  # one group of the prompt's three most specific tokens
    assert ed.layer.subject.groups.unique().numel() == 1


def test_two_edits_on_one_subject_are_told_apart_by_the_mask():
    ed = editor_with("subject", on_conflict="keep")
    ed.edit("the capital of japan is", "rome", "japan")
    ed.edit("japan is located in", "spain", "japan")
    got = [r.edit_id for r in ed.retrieve(["the capital of japan is", "japan is located in"])]
    assert got == [0, 1]


def test_subject_keys_are_saved_restored_and_rolled_back(tmp_path, monkeypatch):
    from memoir import editing

    ed = editor_with("subject")
    ed.edit(*EDIT)
    ed.save(tmp_path / "e")
    ed.detach()
    model, tok = tiny_model("llama")
    again = MemoirEditor.load(model, tok, tmp_path / "e")
    assert torch.equal(again.layer.subject.keys, ed.layer.subject.keys)
    assert [r.edit_id for r in again.retrieve([EDIT[0], NEIGHBOUR])] == [0, None]
    keys = again.layer.subject.keys.clone()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(editing, "optimise", boom)
    with pytest.raises(KeyboardInterrupt):
        again.edit("who wrote the book ?", "paris", "book")
    assert torch.equal(again.layer.subject.keys, keys)


def test_subject_router_config_is_validated():
    with pytest.raises(ValueError, match="router"):
        MemoirConfig(router="nearest")
    with pytest.raises(ValueError, match="subject_layer"):
        editor_with("subject", subject_layer=3, layer=2)


def test_an_eligible_edit_still_needs_the_mask_overlap_threshold():
    loose, strict = editor_with("subject"), editor_with("subject", threshold=1.0)
    for ed in (loose, strict):
        ed.edit(*EDIT)
    rephrase = "what is the capital of japan ?"
    assert loose.retrieve([rephrase])[0].edit_id == 0
    score = loose.retrieve([rephrase])[0].score
    assert score < 1.0, "the rephrase's mask must differ from the edit's for the test to mean anything"
    assert [r.edit_id for r in strict.retrieve([EDIT[0], rephrase])] == [0, None]


def test_a_teacher_forced_target_cannot_make_its_prompt_eligible():
    from memoir.batching import build_batch

    ed = editor_with("subject")
    ed.edit(*EDIT)
    assert ed.retrieve([NEIGHBOUR])[0].edit_id is None
    # The neighbour with " japan" as its teacher-forced answer: only the prompt part may name the subject.
    batch = build_batch(ed.tokenizer, [NEIGHBOUR], " japan")
    with ed.layer.calls.overriding(), ed.prompt_span(batch.prompt_mask):
        ed.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        assert ed.layer.last_route.rows.tolist() == [-1]
    with ed.layer.calls.overriding():  # the same tokens as a prompt do mention it
        ed.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        eligible = ed.layer.last_route.rows.tolist()
    assert eligible == [0], "with the answer inside the prompt the subject must be found"


def test_a_repeated_question_supersedes_its_edit_and_keep_keeps_both():
    # Relation overlaps on this tiny random model: capital / capital city 0.67, capital / located 0.41.
    ed = editor_with("subject", conflict_threshold=0.5)
    first = ed.edit("the capital of japan is", "rome", "japan")
    other = ed.edit("japan is located in", "spain", "japan")  # same subject, another relation
    assert first.replaced == () and other.replaced == ()
    again = ed.edit("the capital city of japan is", "paris", "japan")
    assert again.replaced == (first.edit_id,)
    assert sorted(r.edit_id for r in ed.edits()) == [other.edit_id, again.edit_id]
    assert ed.retrieve(["the capital of japan is"])[0].edit_id == again.edit_id
    assert ed.generate(["the capital of japan is"], max_new_tokens=1)[0].strip() == "paris"
    kept = editor_with("subject", conflict_threshold=0.5)
    kept.edit("the capital of japan is", "rome", "japan")
    assert kept.edit("the capital city of japan is", "paris", "japan", on_conflict="keep").replaced == ()
    assert len(kept.layer.bank) == 2


def test_remove_forgets_an_edit():
    ed = editor_with("subject")
    r = ed.edit(*EDIT)
    with pytest.raises(KeyError, match="no stored edit 7"):
        ed.remove(7)
    ed.remove(r.edit_id)
    assert ed.retrieve([EDIT[0]])[0].edit_id is None and len(ed.layer.subject) == 0 and not ed.edits()


@pytest.mark.parametrize("casefold", [True, False])
def test_a_query_in_capitals_scores_its_better_reading_under_casefold(casefold):
    ed = editor_with("subject", subject_casefold=casefold, subject_casefold_margin=0.05)
    ed.edit(*EDIT)
    ed.edit("who wrote the book ?", "paris", "book")
    upper, lower = "THE CAPITAL OF JAPAN IS", "the capital of japan is"
    with ed._nested.overriding(active=True):
        both = ed._subject_scores([upper, lower, NEIGHBOUR])
        alone = torch.cat([ed._subject_scores([t]) for t in (upper, lower)]) if casefold else None
        states, own = ed._subject_states(texts=[upper])
    plain = ed.layer.subject.scores(states, own, ed.layer.bank.ids)[0]
    assert not torch.equal(plain, both[1]), "the two readings must differ for the test to mean anything"
    if casefold:
        # batch shapes change float rounding (by CPU): equal up to it
        assert torch.allclose(both[0], torch.maximum(plain, both[1] - ed.config.subject_casefold_margin), atol=1e-5)
        assert torch.allclose(alone[0], both[0], atol=1e-5) and torch.allclose(alone[1], both[1], atol=1e-5)
    else:
        assert torch.allclose(both[0], plain, atol=1e-6)


def test_eligibility_reads_a_query_lower_cased_only_when_it_names_no_subject_as_written(monkeypatch):
    ed = editor_with("subject")
    ed.edit(*EDIT)
    named, shouted = "The capital of japan is", "THE CAPITAL OF JAPAN IS"
    read = []
    real = ed._subject_states
    monkeypatch.setattr(ed, "_subject_states", lambda texts: read.append(list(texts)) or real(texts=texts))
    with ed._nested.overriding(active=True):
        full = ed._subject_scores([named, shouted, NEIGHBOUR])
    assert read == [[named, shouted, NEIGHBOUR, named.lower(), shouted.lower()]]  # without a floor: every reading
    read.clear()
    eligible = ed.eligibility([named, shouted, NEIGHBOUR])
    assert read == [[named, shouted, NEIGHBOUR], [shouted.lower()]]  # named as written: no second reading
    assert eligible.tolist() == [[True], [True], [False]]
    assert torch.equal(eligible, full >= ed.config.subject_threshold)


def test_subject_scores_match_a_per_edit_loop():
    from memoir.subject_router import SubjectKeys

    g = torch.Generator().manual_seed(0)
    keys = SubjectKeys(8)
    for edit_id in (5, 2, 9, 7):  # ids out of order; each edit with one or two groups of 1-3 keys
        keys.add(edit_id, [torch.randn(int(torch.randint(1, 4, (1,), generator=g)), 8, generator=g)
                           for _ in range(1 + edit_id % 2)])
    bank_ids = torch.tensor([9, 5, 3, 2])  # 7 is no longer stored, 3 has no keys
    states, own = torch.randn(3, 6, 8, generator=g), torch.rand(3, 6, generator=g) > 0.3
    got = keys.scores(states, own, bank_ids)
    q = torch.nn.functional.normalize(states - keys.mean, dim=-1)
    for b in range(3):
        for row, edit in enumerate(bank_ids.tolist()):
            best = -1.0
            for grp in keys.groups[keys.edit_ids == edit].unique().tolist():
                k = keys.keys[keys.groups == grp]
                sim = (q[b][own[b]] @ k.T).amax(0) if own[b].any() else torch.full((k.shape[0],), -1.0)
                best = max(best, float(sim.mean()))
            assert abs(float(got[b, row]) - best) < 1e-5, (b, row, got[b, row], best)


def test_scores_follow_the_bank_when_its_ids_change():
    """The sorted bank ids are cached per ids tensor; a new tensor or an in-place change re-sorts them."""
    from memoir.subject_router import SubjectKeys

    g = torch.Generator().manual_seed(1)
    keys = SubjectKeys(8)
    for edit_id in (4, 1, 6):
        keys.add(edit_id, [torch.randn(2, 8, generator=g)])
    states, own = torch.randn(2, 5, 8, generator=g), torch.ones(2, 5, dtype=torch.bool)
    bank = torch.tensor([4, 1, 6])
    first = keys.scores(states, own, bank)
    swapped = torch.tensor([6, 4, 1])  # a new tensor: the same edits in other rows
    torch.testing.assert_close(keys.scores(states, own, swapped), first[:, [2, 0, 1]])
    swapped[0] = 9  # in place: edit 6 is gone, its row has no keys
    got = keys.scores(states, own, swapped)
    assert got[:, 0].eq(-1).all()
    torch.testing.assert_close(got[:, 1:], first[:, [0, 1]])


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["prefilter-float32", "prefilter-bfloat16"])
def prefilter(request, monkeypatch):
    """Both precisions of the floor's prefilter, whichever this machine would pick."""
    from memoir import subject_router

    monkeypatch.setattr(subject_router, "_prefilter_dtype", lambda device: request.param)
    return request.param


@pytest.mark.parametrize("floor", [0.5, 0.8, 0.95])
def test_a_score_floor_keeps_every_score_that_reaches_it_exact(floor, prefilter):
    """Queries made of perturbed copies of some keys score close to the floor from both sides."""
    from memoir.subject_router import SubjectKeys

    g = torch.Generator().manual_seed(1)
    keys = SubjectKeys(16)
    for edit_id in range(40):
        keys.add(edit_id, [torch.randn(1 + edit_id % 3, 16, generator=g) for _ in range(1 + edit_id % 2)])
    bank_ids = torch.arange(40)
    picked = keys.keys[torch.randperm(len(keys), generator=g)[:24]].reshape(4, 6, 16)
    noise = torch.randn(4, 6, 16, generator=g) * torch.linspace(0.05, 0.6, 4)[:, None, None]
    states, own = picked + noise, torch.ones(4, 6, dtype=torch.bool)
    exact = keys.scores(states, own, bank_ids)
    floored = keys.scores(states, own, bank_ids, floor=floor)
    passing = exact >= floor
    assert passing.any() and (~passing).any(), "scores on both sides of the floor make the test mean something"
    assert torch.equal(floored >= floor, passing)
    torch.testing.assert_close(floored[passing], exact[passing])
    # Below the floor a row may read a lower score: its best group may have been skipped.
    assert (floored <= exact + 1e-6).all()
    assert (floored < exact - 1e-6).any(), "the bound must spare some groups"


@pytest.mark.parametrize("floor", [0.9, 0.958, 0.96])
@pytest.mark.parametrize("above", [1e-6, 1e-4, 1e-3])
def test_a_score_just_above_the_floor_survives_the_prefilter(prefilter, floor, above):
    """One-key groups whose query sits at cosine ``floor + above``: the prefilter's rounding (bfloat16
    inputs and output move a cosine by up to ~0.01) must never drop them."""
    from memoir.subject_router import SubjectKeys

    d = 64
    g = torch.Generator().manual_seed(2)
    keys = SubjectKeys(d)
    for edit_id in range(50):
        keys.add(edit_id, [torch.randn(1, d, generator=g)])
    k = keys.keys  # unit vectors (the background mean is zero)
    other = torch.nn.functional.normalize(torch.randn(50, d, generator=g), dim=-1)
    other = torch.nn.functional.normalize(other - (other * k).sum(-1, keepdim=True) * k, dim=-1)
    c = floor + above
    queries = c * k + (1 - c * c) ** 0.5 * other  # cosine c with its own key, unit length
    states, own = queries[:, None].double().float(), torch.ones(50, 1, dtype=torch.bool)
    exact = keys.scores(states, own, torch.arange(50))
    floored = keys.scores(states, own, torch.arange(50), floor=floor)
    diagonal = exact.diagonal()
    assert ((diagonal - c).abs() < 1e-5).all()
    passing = exact >= floor
    assert passing.diagonal().sum() >= 45, "most constructed cosines land above the floor in float32"
    assert torch.equal(floored >= floor, passing)


def test_the_score_floor_follows_keys_added_removed_and_restored():
    """The first keys the floor reads are cached: every change of the stored keys must reach them."""
    from memoir.subject_router import SubjectKeys

    g = torch.Generator().manual_seed(2)
    keys = SubjectKeys(16)
    for edit_id in range(10):
        keys.add(edit_id, [torch.randn(2, 16, generator=g)])
    bank_ids = torch.arange(12)
    own = torch.ones(1, 2, dtype=torch.bool)

    def passes(edit_id, states):
        return bool(keys.scores(states, own, bank_ids, floor=0.95)[0, edit_id] >= 0.95)

    before = keys.snapshot()
    keys.scores(torch.randn(1, 2, 16, generator=g), own, bank_ids, floor=0.95)  # builds the cache
    new = torch.randn(2, 16, generator=g)
    keys.add(11, [new])
    assert passes(11, new[None])  # a key added after the cache was built
    keys.pop(11)
    assert not passes(11, new[None])
    old = keys.keys[keys.edit_ids == 3].clone()
    keys.pop(3)
    assert not passes(3, old[None])
    keys.restore(before)
    assert passes(3, old[None])


def test_prefixed_states_reuse_the_prefix_and_match_the_plain_pass():
    from memoir import subject_router as sr

    ed = editor_with("subject")
    texts = ["the capital of japan is", "who wrote the book ?", "x", "tell me about spain . the capital of japan is"]
    ps = sr.PrefixedStates(ed.model, ed.target.layers, 2, ed.tokenizer)
    assert ps.usable
    cached, own = ps(texts)
    ids, attn, plain_own = sr.prefixed_batch(ed.tokenizer, texts)
    plain = sr.token_states(ed.model, ed.target.layers, 2, ids, attn)
    assert ps._kv is not None and cached.shape[1] < plain.shape[1]  # the prefix's tokens were not run again
    assert torch.equal(own.sum(1), plain_own.sum(1))
    torch.testing.assert_close(cached[own], plain[plain_own], rtol=1e-4, atol=1e-4)
    ps.usable = False  # a model without a cache argument takes the plain pass
    again, again_own = ps(texts)
    assert torch.equal(again, plain) and torch.equal(again_own, plain_own)


def test_aliases_reach_the_edit_by_their_keys_and_spelling_and_are_saved(tmp_path):
    for spellings in (True, False):
        ed = editor_with("subject", subject_spellings=spellings)
        ed.edit("the capital of japan is", "rome", "japan", aliases=["tokyo"])
        assert ed.edits()[0].aliases == ("tokyo",)
        assert ed.layer.subject.groups.unique().numel() == 2  # the subject's keys and the alias's
        assert ed.eligibility(["what is the capital of tokyo ?", NEIGHBOUR]).tolist() == [[True], [False]]
    ed.save(tmp_path / "e")
    ed.detach()
    model, tok = tiny_model("llama")
    again = MemoirEditor.load(model, tok, tmp_path / "e")
    assert again.edits()[0].aliases == ("tokyo",)
    assert again.eligibility(["what is the capital of tokyo ?"]).tolist() == [[True]]
    with pytest.raises(ValueError, match="aliases must be a list"):
        again.edit("who wrote the book ?", "paris", "book", aliases="novel")


def test_spelled_subjects_follow_the_bank_rows_as_edits_come_and_go():
    ed = editor_with("subject", on_conflict="keep")
    ed.edit(*EDIT)
    ed.edit("who wrote the book ?", "paris", "book")
    ed.edit("the river nile is", "long", "nile")
    assert ed._spelled(["the nile and japan", "the book"]).tolist() == [[True, False, True], [False, True, False]]
    ed.remove(0)
    assert ed._spelled(["the nile and japan", "the book"]).tolist() == [[False, True], [True, False]]
    off = editor_with("subject", subject_spellings=False)
    off.edit(*EDIT)
    calls = []
    off._spelled = lambda texts: calls.append(texts)
    off.eligibility([EDIT[0]])
    assert calls == []  # subject_spellings false: the index is never consulted


def test_the_spelling_index_follows_the_records_through_rollback_and_reuse_of_an_id(monkeypatch):
    from memoir import editing

    ed = editor_with("subject")
    ed.edit(*EDIT)
    assert ed._spelled(["the book"]).tolist() == [[False]]

    def boom(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(editing, "optimise", boom)
        with pytest.raises(KeyboardInterrupt):
            ed.edit("who wrote the book ?", "paris", "book")
    assert ed._spelled(["the book"]).tolist() == [[False]]
    ed.edit("the river nile is", "long", "nile")  # takes the id the rolled-back edit had
    assert ed.edits()[-1].edit_id == 1
    assert ed._spelled(["the book", "the nile"]).tolist() == [[False, False], [False, True]]


def test_the_spelling_index_grows_with_new_edits_and_is_rebuilt_after_a_removal():
    ed = editor_with("subject", on_conflict="keep")
    ed.edit(*EDIT)
    ed._spelled(["japan"])
    first = ed._spellings[2]
    ed.edit("who wrote the book ?", "paris", "book")
    assert ed._spelled(["the book"]).tolist() == [[False, True]]
    assert ed._spellings[2] is first and len(first) == 2  # appended, not rebuilt
    ed.remove(0)
    assert ed._spelled(["japan", "the book"]).tolist() == [[False], [True]]
    assert ed._spellings[2] is not first and len(ed._spellings[2]) == 1
