"""Routing is per call: concurrent generate / retrieve calls in threads see only their own route."""
import threading

import pytest

import torch

from memoir import MemoirConfig, MemoirEditor
from tiny import tiny_model

BACKGROUND = ["the city of paris is in france", "who wrote the book ?", "the river nile is long",
              "what is the capital of japan ?", "i live in london", "yes the answer is no"]
EDITS = [("the eiffel tower is located in the city of", "rome"),
         ("the great wall is located in the country of", "spain")]
BATCH_A = ["the eiffel tower is located in the city of", "who wrote the book ?",
           "the eiffel tower is located in which city ?", "i live in london"]
BATCH_B = ["the great wall is located in the country of", "the river nile is long", "yes the answer is no",
           "the eiffel tower is located in the city of", "what is the capital of japan ?",
           "the great wall is located in which country ?"]
ROUNDS = 20
TIMEOUT_S = 240  # a deadlock fails the test instead of hanging the suite


def edited():
    model, tok = tiny_model("llama")
    editor = MemoirEditor(model, tok, MemoirConfig(n_iter=40, num_context_templates=0, threshold=0.6),
                          background_texts=BACKGROUND)
    for prompt, target in EDITS:
        editor.edit(prompt, target)
    return editor


def run_threads(workers):
    errors, threads = [], []

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
        return run

    for fn in workers:
        t = threading.Thread(target=guard(fn), daemon=True)
        threads.append(t)
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), f"threads still running after {TIMEOUT_S} s (deadlock?)"
    if errors:
        raise errors[0]


def test_two_generating_threads_and_a_retrieving_one_match_sequential_calls():
    editor = edited()
    torch.set_num_threads(1)  # the threads interleave on the Python side; keep the test light
    want_a = editor.generate(BATCH_A, max_new_tokens=4)
    want_b = editor.generate(BATCH_B, max_new_tokens=4)
    want_r = [r.edit_id for r in editor.retrieve(BATCH_B + BATCH_A)]
    with editor.disabled():
        plain_a = editor.generate(BATCH_A, max_new_tokens=4)
    assert want_r[0] is not None and want_r[1] is None, "the edits must route for the test to mean anything"
    assert want_a[0] != plain_a[0], "the edit must change the edited prompt's answer"
    assert want_a[1] == plain_a[1]

    got_a, got_b, got_r = [], [], []
    run_threads([
        lambda: got_a.extend(editor.generate(BATCH_A, max_new_tokens=4) for _ in range(ROUNDS)),
        lambda: got_b.extend(editor.generate(BATCH_B, max_new_tokens=4) for _ in range(ROUNDS)),
        lambda: got_r.extend([r.edit_id for r in editor.retrieve(BATCH_B + BATCH_A)] for _ in range(ROUNDS)),
    ])
    assert got_a == [want_a] * ROUNDS
    assert got_b == [want_b] * ROUNDS
    assert got_r == [want_r] * ROUNDS


def test_plain_model_calls_in_threads_keep_their_own_route():
    """Without the editor's wrappers (``model.generate`` directly) each thread routes its own batch."""
    editor = edited()
    tok = editor.tokenizer

    def gen(prompts):
        enc = tok(prompts, return_tensors="pt", padding=True)
        out = editor.model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        return out[:, enc["input_ids"].shape[1]:].tolist()

    want = [gen(BATCH_A), gen(BATCH_B)]
    got = [[], []]
    run_threads([lambda: got[0].extend(gen(BATCH_A) for _ in range(8)),
                 lambda: got[1].extend(gen(BATCH_B) for _ in range(8))])
    assert got == [[want[0]] * 8, [want[1]] * 8]


def test_route_is_an_input_of_the_layer():
    """A route computed once can be passed back: the layer then does not route again."""
    editor = edited()
    route = editor.route(BATCH_A)
    assert route.rows.tolist()[:2] == [0, -1]
    want = editor.generate(BATCH_A, max_new_tokens=4)
    with editor.layer.using_route(route):
        assert editor.generate(BATCH_A, max_new_tokens=4) == want
    # Pinned to "no edit", the edited prompt gets the unedited answer.
    with editor.layer.using_route(type(route).unrouted(len(BATCH_A))):
        pinned_off = editor.generate(BATCH_A, max_new_tokens=4)
    with editor.disabled():
        assert pinned_off == editor.generate(BATCH_A, max_new_tokens=4)


NEW_EDITS = [("the river nile is located in the country of", "japan"),
             ("the capital of japan is the city of", "paris"),
             ("i live in the city of", "tokyo")]


def test_edits_in_one_thread_while_others_generate_are_serialised_and_published_whole():
    editor = edited()
    torch.set_num_threads(1)
    probe = [EDITS[0][0], NEW_EDITS[0][0], "who wrote the book ?"]
    before = editor.generate(probe, max_new_tokens=3)
    seen, results, started = [], [], threading.Event()

    def generating():
        started.set()
        for _ in range(ROUNDS):
            seen.append(editor.generate(probe, max_new_tokens=3))

    def editing():
        started.wait(TIMEOUT_S)
        results.extend(editor.edit(p, t) for p, t in NEW_EDITS)

    run_threads([generating, generating, editing])
    after = editor.generate(probe, max_new_tokens=3)
    assert [r.edit_id for r in results] == [2, 3, 4] and all(r.kept for r in results)
    assert after[1] != before[1], "the new edit must change its prompt's answer for the test to mean anything"
    # Each generation saw the memory between two whole edits: the probe's answers are those of
    # one of the four states the three edits pass through, never of a half-trained memory.
    states = [before]
    check = edited()
    for p, t in NEW_EDITS:
        check.edit(p, t)
        states.append(check.generate(probe, max_new_tokens=3))
    assert states[-1] == after
    assert all(out in states for out in seen), [out for out in seen if out not in states]


def test_a_reader_cannot_start_an_edit_inside_its_own_read():
    editor = edited()
    with editor._lock.reading(), pytest.raises(RuntimeError, match="wait for itself"):
        editor.edit("i live in the city of", "tokyo")
