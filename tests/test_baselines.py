"""The FT-L and GRACE baselines on a tiny model."""
import pytest
import torch

from memoir.batching import build_batch
from memoir.eval import metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_grace_routes_exact_prompt_and_splits_conflicts(eval_model):
    from memoir.baselines import GraceConfig, GraceEditor

    model, tok = eval_model
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


def test_ft_changes_only_the_layer_and_restores(eval_model):
    from memoir.baselines import FTConfig, FTEditor

    model, tok = eval_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ft = FTEditor(model, tok, FTConfig(layer=1, n_iter=3, lr=1e-2))
    r = ft.edit("The capital of France is", "Rome")
    assert r.steps >= 1
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    ft.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["ft", "grace"])
def test_baselines_replay_equals_plain_training(eval_model, method, monkeypatch):
    """Replaying the frozen layers below the edit changes the speed, not the edit."""
    import copy

    from memoir.baselines import FTConfig, FTEditor, GraceConfig, GraceEditor
    from memoir.baselines import _train

    model, tok = eval_model
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
