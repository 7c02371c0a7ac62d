"""``other_questions``: an edit also trains other questions about its subject to keep their answers."""
import pytest
import torch
import torch.nn.functional as F

from memoir import MemoirConfig, MemoirEditor, editing
from memoir.batching import build_batch
from memoir.route import Route
from memoir.types import EditRequest

BACKGROUND = ["the city of paris is in france", "who wrote the book?", "the river nile is long",
              "what is the capital of japan?", "i live in london", "yes the answer is no"]
PROMPT, TARGET, SUBJECT = "The Eiffel Tower is located in the city of", "Rome", "Eiffel Tower"


def make_editor(model, tok, **overrides):
    cfg = MemoirConfig(**{"n_iter": 40, "num_context_templates": 0, "threshold": 0.0, "memory": "private",
                          "on_conflict": "keep", "lr": 1.0, **overrides})
    return MemoirEditor(model, tok, cfg, background_texts=BACKGROUND)


def next_token_logprobs(editor, prompts, row=None):
    """Last-position log-probabilities, routed to bank row ``row`` (None: the unedited model)."""
    batch = build_batch(editor.tokenizer, prompts)
    route = Route.unrouted(len(prompts)) if row is None else Route.to_row(row, len(prompts))
    with torch.no_grad(), editor.layer.using_route(route):
        logits = editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1]
    return F.log_softmax(logits.float(), dim=-1)


def test_off_by_default_and_for_edits_without_a_subject(eval_model, one_thread):
    model, tok = eval_model
    editor = make_editor(model, tok)
    request = EditRequest(PROMPT, TARGET, SUBJECT)
    assert editing.other_questions(editor, request, editing.encode_edit(editor, request)) is None
    editor.config.other_questions = 3
    bare = EditRequest(PROMPT, TARGET, None)
    assert editing.other_questions(editor, bare, editing.encode_edit(editor, bare)) is None
    assert len(editing.other_questions(editor, request, editing.encode_edit(editor, request)).prompts) == 3


def test_skips_the_wordings_most_like_the_edit_and_is_deterministic(eval_model, one_thread):
    model, tok = eval_model
    editor = make_editor(model, tok, other_questions=6, other_questions_skip=20)
    request = EditRequest(PROMPT, TARGET, SUBJECT)
    inputs = editing.encode_edit(editor, request)
    templates, keys = editor.relation_question_keys()
    assert keys.shape == (len(templates), editor.layer.in_features)
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(len(templates)))
    closest = {templates[i].format(SUBJECT) for i in (keys @ inputs.question).argsort(descending=True)[:20].tolist()}
    others = editing.other_questions(editor, request, inputs)
    assert len(others.prompts) == 6 and len(set(others.prompts)) == 6
    assert not closest & set(others.prompts)
    assert all(SUBJECT in p for p in others.prompts)
    assert editing.other_questions(editor, request, inputs).prompts == others.prompts
    # The reference is the unedited model's next token.
    torch.testing.assert_close(others.reference, next_token_logprobs(editor, others.prompts), atol=1e-4, rtol=1e-4)
    # Skipping all of them leaves none.
    editor.config.other_questions_skip = len(templates)
    assert editing.other_questions(editor, request, inputs) is None


@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_an_edit_keeps_its_other_questions_closer_to_the_unedited_model(eval_model, one_thread, gain):
    """Measured on the block as stored (with its gain, which the training of the other questions reads)."""
    model, tok = eval_model
    drift = {}
    for n in (0, 4):
        editor = make_editor(model, tok, other_questions=4, block_gain=gain)
        request = EditRequest(PROMPT, TARGET, SUBJECT)
        prompts = editing.other_questions(editor, request, editing.encode_edit(editor, request)).prompts
        editor.config.other_questions = n  # the same 4 questions are measured with and without the option
        before = next_token_logprobs(editor, prompts)
        result = editor.edit(PROMPT, TARGET, subject=SUBJECT)
        assert result.converged, n
        after = next_token_logprobs(editor, prompts, row=editor.layer.bank.edit_ids.index(result.edit_id))
        drift[n] = float(F.kl_div(after, before, log_target=True, reduction="batchmean"))
        editor.unload()
    assert drift[4] < 0.6 * drift[0], drift  # measured 0.037 vs 0.093 (gain 1), 0.047 vs 0.244 (gain 2)


def test_batched_editing_refuses_other_questions_instead_of_ignoring_them(eval_model, one_thread):
    model, tok = eval_model
    editor = make_editor(model, tok, other_questions=2)
    with pytest.raises(ValueError, match="other_questions"):
        editor.edit_many([(PROMPT, TARGET), ("The capital of Japan is", "Paris")], batch_size=2, progress=False)
    assert len(editor.layer.bank) == 0


def test_the_questions_read_the_memory_as_a_query_will_and_the_edit_rows_as_they_train(eval_model, one_thread):
    model, tok = eval_model
    editor = make_editor(model, tok, other_questions=3, block_gain=2.0, train_input_scale=0.5)
    request = EditRequest(PROMPT, TARGET, SUBJECT)
    inputs = editing.encode_edit(editor, request)
    others = editing.other_questions(editor, request, inputs)
    n = others.batch.input_ids.shape[0]
    assert others.n_edit_rows == inputs.batch.input_ids.shape[0] and n == others.n_edit_rows + 3
    a = torch.ones(n, 2, 5)
    read = editing.row_scales(editor.config, others, True, "cpu")(a)
    assert read[: others.n_edit_rows].eq(0.5).all() and read[others.n_edit_rows:].eq(2.0).all()
    assert editing.row_scales(editor.config, others, False, "cpu")(a)[others.n_edit_rows:].eq(1.0).all()
    # The joint batch keeps each edit row's tokens (left padded) and ends each question with its prompt.
    rows = editing.edit_rows(others.batch)
    assert rows[: others.n_edit_rows] == editing.edit_rows(inputs.batch)
    assert [tok.decode(p, skip_special_tokens=True).strip() for p, t in rows[others.n_edit_rows:]] == others.prompts
    assert all(t == [] for _, t in rows[others.n_edit_rows:])


def test_the_reference_loop_trains_other_questions_too(eval_model, one_thread):
    model, tok = eval_model
    cfg = MemoirConfig(n_iter=40, num_context_templates=0, threshold=0.0, memory="private", on_conflict="keep",
                       lr=1.0, other_questions=2)
    editor = MemoirEditor(model, tok, cfg, background_texts=BACKGROUND, full_forward=True)
    request = EditRequest(PROMPT, TARGET, SUBJECT)
    others = editing.other_questions(editor, request, editing.encode_edit(editor, request))
    assert others.replay_output is None  # the whole model runs at every step
    assert editor.edit(PROMPT, TARGET, subject=SUBJECT).converged

