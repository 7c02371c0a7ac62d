"""Neighbour preservation: projected edits leave the protected edits' memory outputs unchanged."""
import pytest
import torch

from memoir import MemoirConfig, MemoirEditor
from memoir.ops import overlap_counts
from memoir.preserve import KeyStore, project_out
from tiny import tiny_model

BACKGROUND = ["the city of paris is in france", "who wrote the book ?", "the river nile is long",
              "what is the capital of japan ?", "i live in london", "yes the answer is no"]
# Two edits about one subject (their masks share most columns), then an unrelated one.
EDITS = [("the eiffel tower is located in the city of", "rome"),
         ("the eiffel tower is found in the city of", "berlin"),
         ("who wrote the book ?", "london")]


def _editor(**overrides):
    model, tok = tiny_model("llama")
    cfg = MemoirConfig(**{"n_iter": 20, "num_context_templates": 2, "threshold": 0.6, "layer": 2,
                          "decay_scope": "active", "weight_decay": 1e-3, **overrides})
    return MemoirEditor(model, tok, cfg, background_texts=BACKGROUND)


def _memory_out(editor, edit_id):
    return editor.layer.memory.detach() @ editor.keys.dense(edit_id).T


def test_keystore_neighbours_and_basis():
    store = KeyStore()
    d = 8
    store.add(0, torch.eye(d)[:2] * 3)  # aligned with the query inside the columns
    store.add(1, torch.eye(d)[4:5])  # lives in the columns, orthogonal to the query
    store.add(2, torch.eye(d)[6:7])  # outside the columns: never picked
    cols = torch.tensor([0, 1, 4, 5])
    query = torch.zeros(d)
    query[0] = 1.0
    assert store.neighbours(query, cols, 5) == [0]
    assert store.neighbours(query, cols, 0) == [] and KeyStore().neighbours(query, cols, 3) == []
    q = store.basis([0, 1], cols)
    assert q.shape == (4, 3)
    torch.testing.assert_close(q.T @ q, torch.eye(3))
    g = torch.randn(5, 4)
    projected = project_out(g, q)
    torch.testing.assert_close(projected @ q, torch.zeros(5, 3), atol=1e-6, rtol=0)
    assert store.basis([], cols) is None
    # Round trip through the saved state, order and counts kept.
    again = KeyStore()
    again.load(store.state())
    assert again.ids() == [0, 1, 2] and all(torch.equal(again.dense(i), store.dense(i)) for i in store.ids())
    empty = KeyStore()
    empty.load({})
    assert len(empty) == 0 and KeyStore().state() == {}


def _dense_reference_neighbours(rows: dict, key, cols, m):
    """The dense computation sparse storage replaces: mean rows [N, D] restricted to ``cols``."""
    ids = list(rows)
    means = torch.stack([rows[i].mean(0) for i in ids])
    q = key[cols]
    scores = (means[:, cols] @ q).abs() / (means.norm(dim=1) * q.norm() + 1e-12)
    order = torch.argsort(scores, descending=True, stable=True)[:m].tolist()
    return [ids[i] for i in order if float(scores[i]) > 0]


def test_sparse_keys_match_the_dense_computation():
    """Masked keys with random (odd-sized) masks: neighbours, basis and dense rows as if stored dense."""
    g = torch.Generator().manual_seed(0)
    d, k = 37, 9
    store, rows = KeyStore(), {}
    for i in range(12):
        cols = torch.randperm(d, generator=g)[:k]
        mask = torch.zeros(d)
        mask[cols] = 1
        rows[i] = torch.randn(int(torch.randint(1, 5, (1,), generator=g)), d, generator=g) * mask
        store.add(i, rows[i])
        torch.testing.assert_close(store.dense(i), rows[i], rtol=0, atol=0)
    assert store.state()["key_values"].numel() == sum(r.shape[0] for r in rows.values()) * k  # D / k smaller
    for trial in range(5):
        cols = torch.randperm(d, generator=g)[:k]
        key = torch.randn(d, generator=g)
        assert store.neighbours(key, cols, 4) == _dense_reference_neighbours(rows, key, cols, 4)
        picked = store.neighbours(key, cols, 3, candidates=[1, 5, 7, 99])
        assert set(picked) <= {1, 5, 7}
        ref = torch.linalg.svd(torch.cat([rows[i] for i in picked])[:, cols].double())[2]
        basis = store.basis(picked, cols)
        # Same spanned subspace: the projector onto it is basis-independent.
        r = basis.shape[1]
        torch.testing.assert_close(basis @ basis.T, (ref[:r].T @ ref[:r]).float(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="features"):
        store.add(99, torch.zeros(2, d + 1))


def test_within_rank_keeps_the_longest_prefix_that_fits():
    store = KeyStore()
    d = 10
    store.add(0, torch.eye(d)[:3])  # 3 directions
    store.add(1, torch.eye(d)[2:5])  # 2 new ones (index 2 is shared)
    store.add(2, torch.eye(d)[5:9])  # 4 more
    cols = torch.arange(d)
    assert store.within_rank([0, 1, 2], cols, 9)[0] == [0, 1, 2]
    ids, basis = store.within_rank([0, 1, 2], cols, 8)
    assert ids == [0, 1] and basis.shape == (d, 5)  # rank 5 <= 8; adding edit 2 would need 9
    assert store.within_rank([0, 1, 2], cols, 2) == ([], None)  # not even the first edit fits
    assert store.within_rank([], cols, 4) == ([], None)


def test_rank_cap_limits_the_protected_directions():
    editor = _editor(preserve_neighbours=2, preserve_max_rank=1e-3)  # budget: 1 direction
    editor.edit(EDITS[0][0], "rome in italy")
    n_keys = editor.keys.dense(0).shape[0]
    assert n_keys > 1, "one key only: the cap cannot bind"
    assert editor.edit(*EDITS[1]).preserved == ()  # edit 0's keys span more than the budget
    roomy = _editor(preserve_neighbours=2)
    roomy.edit(EDITS[0][0], "rome in italy")
    assert roomy.edit(*EDITS[1]).preserved == (0,)  # the same stream without the cap
    with pytest.raises(ValueError, match="preserve_max_rank"):
        MemoirConfig(preserve_max_rank=0.0)


@pytest.mark.parametrize("protection", [0.0, 1.0])
def test_preserved_edit_output_is_unchanged(protection):
    editor = _editor(preserve_neighbours=2, column_protection=protection)
    first = editor.edit(*EDITS[0])
    assert first.preserved == ()
    before = _memory_out(editor, first.edit_id)
    second = editor.edit(*EDITS[1])
    assert second.preserved == (first.edit_id,) and second.steps > 0
    # Edit 0's memory output at its keys is kept although edit 1 wrote shared columns.
    torch.testing.assert_close(_memory_out(editor, first.edit_id), before, rtol=1e-4, atol=1e-5)
    shared = editor.layer.column_usage()
    assert int((shared == 2).sum()) > 0, "the two edits share no column: the test is vacuous"


def test_without_preservation_the_shared_columns_move():
    editor = _editor(preserve_neighbours=0)
    editor.edit(*EDITS[0])
    assert len(editor.keys) == 0  # keys are kept only when the option is on
    probe = _editor(preserve_neighbours=1)
    probe.edit(*EDITS[0])
    before = _memory_out(probe, 0)
    editor.layer.memory.data.copy_(probe.layer.memory.data)
    editor.edit(*EDITS[1])
    after = editor.layer.memory.detach() @ probe.keys.dense(0).T
    assert (after - before).abs().max() > 1e-3


def test_keys_survive_save_load(tmp_path):
    editor = _editor(preserve_neighbours=2)
    for p, t in EDITS[:2]:
        editor.edit(p, t)
    editor.save(tmp_path / "mem")
    model, tok = tiny_model("llama")
    loaded = MemoirEditor.load(model, tok, tmp_path / "mem")
    assert loaded.keys.ids() == editor.keys.ids()
    for i in editor.keys.ids():
        torch.testing.assert_close(loaded.keys.dense(i), editor.keys.dense(i))
    # Later edits on the reloaded memory still protect the earlier ones.
    before = _memory_out(loaded, 1)
    r = loaded.edit("the eiffel tower sits in the city of", "paris")
    assert 1 in r.preserved
    torch.testing.assert_close(_memory_out(loaded, 1), before, rtol=1e-4, atol=1e-5)


def test_replaced_edit_drops_its_keys():
    editor = _editor(preserve_neighbours=2)
    a = editor.edit(*EDITS[0])
    b = editor.edit(EDITS[0][0], "paris")  # the same prompt again: the new edit owns the mask
    assert a.edit_id not in editor.keys and b.edit_id in editor.keys
    assert b.preserved == () and b.steps > 0  # not held back by the edit it replaces
    assert editor.generate(EDITS[0][0], max_new_tokens=3).strip().startswith("paris")


def test_overlap_gate_picks_only_conflicting_edits():
    """preserve_min_overlap: an earlier edit is protected only if its mask shares enough columns."""
    probe = _editor(preserve_neighbours=3)
    for p, t in EDITS:
        probe.edit(p, t)
    words, bank_ids = probe.layer.bank.words, probe.layer.bank.edit_ids
    counts = overlap_counts(words[2:3], words)[0].float() / probe.layer.top_k
    shared = {bank_ids[i]: float(counts[i]) for i in range(2)}
    lo, hi = sorted(shared.values())
    assert hi > lo, "both earlier masks overlap the third equally: the gate cannot be tested"
    gate = (lo + hi) / 2
    # Same stream with a gate between the two overlaps: only the closer mask is a candidate.
    gated = _editor(preserve_neighbours=3, preserve_min_overlap=gate)
    for p, t in EDITS[:2]:
        gated.edit(p, t)
    last = gated.edit(*EDITS[2])
    closer = max(shared, key=shared.get)
    assert last.preserved == (closer,)
    # A gate above every overlap protects nothing; 0 keeps the ungated choice.
    none = _editor(preserve_neighbours=3, preserve_min_overlap=min(1.0, hi + 1e-3))
    for p, t in EDITS[:2]:
        none.edit(p, t)
    assert none.edit(*EDITS[2]).preserved == ()


def test_config_rejects_bad_preserve_neighbours():
    with pytest.raises(ValueError, match="preserve_neighbours"):
        MemoirConfig(preserve_neighbours=-1)
    with pytest.raises(ValueError, match="preserve_neighbours"):
        MemoirConfig(preserve_neighbours=1.5)
    with pytest.raises(ValueError, match="preserve_min_overlap"):
        MemoirConfig(preserve_min_overlap=1.5)


def test_principal_directions_capture_the_stored_keys_energy():
    d = 12
    cols = torch.arange(0, 10)
    store = KeyStore()
    plane = torch.zeros(2, d)
    plane[0, 1], plane[1, 3] = 1.0, 1.0
    g = torch.Generator().manual_seed(1)
    for i in range(6):  # keys in span(e1, e3), plus energy outside cols (weights the edit down, not up)
        rows = torch.randn(3, 2, generator=g) @ plane
        rows[:, 11] = 5.0
        store.add(i, rows)
    q = store.principal_directions(cols, 0.999, max_rank=8)
    assert q.shape == (10, 2)
    torch.testing.assert_close(q.T @ q, torch.eye(2), atol=1e-5, rtol=0)
    for i in store.ids():  # projecting a gradient off q leaves every stored key's output unchanged
        k = store.dense(i)[:, cols]
        torch.testing.assert_close(project_out(torch.randn(4, 10), q) @ k.T, torch.zeros(4, 3), atol=1e-5, rtol=0)
    assert store.principal_directions(cols, 0.999, max_rank=1).shape == (10, 1)  # the budget binds
    assert store.principal_directions(cols, 0.0, max_rank=8) is None
    assert store.principal_directions(torch.tensor([0, 5, 7]), 0.9, max_rank=8) is None  # no energy in cols
    assert KeyStore().principal_directions(cols, 0.9, max_rank=8) is None
    # With the e1 direction already taken, what is left extends it: orthogonal, e3 only.
    e1 = torch.zeros(10, 1)
    e1[1] = 1.0
    rest = store.principal_directions(cols, 0.999, max_rank=8, exclude=e1)
    assert rest.shape == (10, 1)
    torch.testing.assert_close(rest.abs()[3, 0], torch.tensor(1.0), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="preserve_energy"):
        MemoirConfig(preserve_energy=1.0)


def test_principal_directions_match_the_dense_covariance_and_skip_disjoint_edits():
    """The stacked product equals the per-edit sum of the docstring; an edit outside cols changes nothing."""
    d, g = 16, torch.Generator().manual_seed(3)
    cols = torch.tensor([2, 3, 5, 7, 11, 13])
    store = KeyStore()
    for i in range(5):
        rows = torch.zeros(1 + i % 3, d)
        mask = torch.randperm(d, generator=g)[:6]
        rows[:, mask] = torch.randn(rows.shape[0], 6, generator=g)
        store.add(i, rows)
    cov = torch.zeros(cols.numel(), cols.numel(), dtype=torch.float64)
    for i in store.ids():
        dense = store.dense(i).double()
        u = dense[:, cols] / dense.pow(2).sum().sqrt()
        cov += u.T @ u
    evals, evecs = torch.linalg.eigh(cov)
    q = store.principal_directions(cols, 0.95, max_rank=6)
    share = evals.flip(0).cumsum(0) / evals.sum()
    r = int((share >= 0.95).nonzero()[0]) + 1
    assert q.shape == (cols.numel(), r)
    top = evecs.flip(1)[:, :r].float()
    torch.testing.assert_close(q @ q.T, top @ top.T, atol=1e-5, rtol=0)  # same subspace
    disjoint = torch.zeros(4, d)
    disjoint[:, [0, 1, 4]] = torch.randn(4, 3, generator=g)
    store.add(99, disjoint)
    again = store.principal_directions(cols, 0.95, max_rank=6)
    torch.testing.assert_close(again @ again.T, q @ q.T, atol=1e-5, rtol=0)


def test_energy_preservation_protects_every_earlier_edit():
    """Without neighbours, the principal directions of the earlier keys keep edit 0's output."""
    def drift(energy):
        editor = _editor(preserve_neighbours=0, preserve_energy=energy, preserve_max_rank=1.0)
        probe = _editor(preserve_neighbours=1)
        probe.edit(*EDITS[0])
        editor.edit(*EDITS[0])
        torch.testing.assert_close(editor.layer.memory, probe.layer.memory)
        before = editor.layer.memory.detach() @ probe.keys.dense(0).T
        r = editor.edit(*EDITS[1])
        assert r.steps > 0 and r.preserved == ()
        assert (len(editor.keys) == 2) == (energy > 0)
        return float((editor.layer.memory.detach() @ probe.keys.dense(0).T - before).abs().max())

    assert drift(0.0) > 1e-3
    assert drift(0.999) < 1e-4


def test_energy_preservation_starts_after_the_given_bank_size(monkeypatch):
    calls = []
    real = KeyStore.principal_directions

    def counting(self, *args, **kwargs):
        calls.append(len(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(KeyStore, "principal_directions", counting)
    editor = _editor(preserve_neighbours=0, preserve_energy=0.9, preserve_energy_after=2)
    for prompt, target in EDITS:
        editor.edit(prompt, target)
    assert calls == [2]  # only the third edit, with two earlier edits in the bank
    assert len(editor.keys) == 3  # keys are stored from the start, for when it switches on
    with pytest.raises(ValueError, match="preserve_energy_after"):
        MemoirConfig(preserve_energy_after=-1)
