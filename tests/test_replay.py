"""MemoirLayer.run_until_input: passes that read the layer input skip the layers above and the head."""
import threading

import torch

from memoir import MemoirConfig, MemoirEditor
from memoir.batching import build_batch

BACKGROUND = ["the city of paris is in france", "who wrote the book?", "i live in london"]
PROMPT = "The Eiffel Tower is located in the city of"


def make_editor(model, tok):
    return MemoirEditor(model, tok, MemoirConfig(num_context_templates=0, threshold=0.0), background_texts=BACKGROUND)


def test_the_pass_stops_after_the_layer_saw_its_input(eval_model, one_thread):
    model, tok = eval_model
    editor = make_editor(model, tok)
    batch = build_batch(tok, [PROMPT, "Paris is in"])
    ran = []
    head = model.get_output_embeddings().register_forward_hook(lambda m, i, o: ran.append("head"))
    try:
        with editor.disabled(), editor.layer.capturing() as partial:
            editor.layer.run_until_input(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        with editor.disabled(), editor.layer.capturing() as whole:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        head.remove()
    assert ran == ["head"]  # only the whole pass reached the output head
    torch.testing.assert_close(partial[0], whole[0])


def test_the_stop_is_private_to_the_calling_thread(eval_model, one_thread):
    """Another thread's whole pass, made while this one is stopped early, runs to the end."""
    model, tok = eval_model
    editor = make_editor(model, tok)
    batch = build_batch(tok, [PROMPT])
    out, errors = [], []
    inside = threading.Event()

    def whole():
        inside.wait(10)
        try:
            out.append(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    worker = threading.Thread(target=whole)
    worker.start()

    def capture(a):
        inside.set()
        worker.join(10)  # the other thread's pass runs while this pass is inside the layer
    with editor.layer.calls.overriding(capture=capture):
        editor.layer.run_until_input(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    worker.join(10)
    assert not errors and len(out) == 1 and out[0].shape[:2] == batch.input_ids.shape
