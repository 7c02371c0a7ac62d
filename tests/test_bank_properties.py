"""Property-based tests: the mask bank against a plain Python model of it (a list of (set of bits, id)).

Hypothesis drives random sequences of add / set_owner / remove_row / snapshot-restore / save-load
and checks every best_match, index_of and dense view against the model after each step.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from safetensors.torch import load_file, save_file

from memoir import ops
from memoir.bank import MaskBank

D = 70  # two words, the second one partly used: exercises the padding bits
K = 6
# Between the possible scores (multiples of 1/K), so float32 and float64 rounding agree.
THRESHOLDS = [0.0, 0.2, 0.34, 0.5, 0.66, 0.84, 1.0]
masks = st.sets(st.integers(0, D - 1), min_size=K, max_size=K).map(frozenset)


def packed(bits) -> torch.Tensor:
    dense = torch.zeros(D, dtype=torch.bool)
    dense[list(bits)] = True
    return ops.pack_bits(dense)


def model_best(rows, query, threshold):
    """The plain model of best_match: largest overlap / |query|, first row on ties, -1 below tau."""
    if not rows:
        return 0.0, -1
    counts = [len(query & bits) for bits, _ in rows]
    best = max(counts)
    score = best / max(1, len(query))
    return score, (counts.index(best) if score >= threshold else -1)


class BankMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bank = MaskBank(D)
        self.rows: list[tuple[frozenset, int]] = []
        self.next_id = 0
        self.saved = None

    @rule(bits=masks)
    def add(self, bits):
        row = self.bank.add(packed(bits), self.next_id)
        assert row == len(self.rows)
        self.rows.append((bits, self.next_id))
        self.next_id += 1

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def set_owner(self, data):
        row = data.draw(st.integers(0, len(self.rows) - 1))
        self.bank.set_owner(row, self.next_id)
        self.rows[row] = (self.rows[row][0], self.next_id)
        self.next_id += 1

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def remove_row(self, data):
        row = data.draw(st.integers(0, len(self.rows) - 1))
        self.bank.remove_row(row)
        del self.rows[row]

    @rule()
    def snapshot_then_change_then_restore(self):
        snap, rows = self.bank.snapshot(), list(self.rows)
        self.bank.add(packed(range(K)), 10_000)
        if len(self.bank) > 1:
            self.bank.remove_row(0)
        self.bank.restore(snap)
        self.rows = rows

    @rule()
    def save_and_load(self):
        path = self.tmp / "bank.safetensors"
        save_file({"words": self.bank.words.contiguous(), "ids": self.bank.ids.contiguous()}, str(path))
        state = load_file(str(path))
        fresh = MaskBank(D)
        fresh.load(state["words"], state["ids"])
        self.bank = fresh

    @rule(query=masks, threshold=st.sampled_from(THRESHOLDS))
    def best_match(self, query, threshold):
        scores, rows = self.bank.best_match(packed(query)[None], threshold)
        want_score, want_row = model_best(self.rows, query, threshold)
        assert float(scores[0]) == pytest.approx(want_score) and int(rows[0]) == want_row

    @rule(query=masks)
    def index_of(self, query):
        want = next((i for i, (bits, _) in enumerate(self.rows) if bits == query), None)
        assert self.bank.index_of(packed(query)) == want

    @invariant()
    def same_rows(self):
        assert self.bank.edit_ids == [i for _, i in self.rows]
        assert len(self.bank) == len(self.rows)
        if self.rows:
            assert ops.popcounts(self.bank.words).tolist() == [K] * len(self.rows)
            dense = self.bank.rows_to_dense(torch.tensor([-1, *range(len(self.rows))]))
            assert dense[0].sum() == 0
            assert [frozenset(d.nonzero().flatten().tolist()) for d in dense[1:]] == [b for b, _ in self.rows]


@pytest.fixture
def bank_machine(tmp_path):
    BankMachine.tmp = tmp_path
    return BankMachine


def test_bank_matches_a_plain_python_model(bank_machine):
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(bank_machine, settings=settings(max_examples=60, stateful_step_count=25,
                                                              deadline=None,
                                                              suppress_health_check=[HealthCheck.too_slow]))


@settings(max_examples=200, deadline=None)
@given(query=masks, bank=st.lists(masks, max_size=12), threshold=st.sampled_from(THRESHOLDS))
def test_best_match_native_and_reference_agree_with_the_model(query, bank, threshold):
    words = torch.stack([packed(b) for b in bank]) if bank else torch.zeros((0, ops.num_words(D)), dtype=torch.int64)
    q = packed(query)[None]
    want_score, want_row = model_best([(b, i) for i, b in enumerate(bank)], query, threshold)
    for scores, rows in (ops.best_match(q, words, threshold), ops.best_match_reference(q, words, threshold)):
        assert float(scores[0]) == pytest.approx(want_score) and int(rows[0]) == want_row
