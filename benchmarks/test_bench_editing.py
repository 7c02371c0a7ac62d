"""Seconds per edit on SmolLM2-135M with the shipped preset: the engine (frozen layers replayed, only
the target logits computed) against the reference loop (``full_forward=True``: the whole model and
every logit at every step, the same steps and the same memory), with 0, 100 and 1,000 edits already
stored (synthetic beyond the real ones, as in test_bench_generation). Each round makes one of the
same 8 counterfactual edits again (it replaces its earlier copy), so N stays constant.
"""
import itertools

import pytest
import torch

from conftest import pedantic, sizes
from memoir import MemoirConfig, MemoirEditor
from test_bench_generation import PROMPTS, add_synthetic, smollm2  # noqa: F401  (fixture)

STORED = sizes([0, 100], [0, 100, 1000])


@pytest.mark.parametrize("loop", ["reference", "engine"])
@pytest.mark.parametrize("stored", STORED)
def test_edit(benchmark, smollm2, stored, loop):  # noqa: F811
    model, tok = smollm2
    editor = MemoirEditor(model, tok, MemoirConfig.preset("smollm2"), full_forward=loop == "reference")
    try:
        add_synthetic(editor, stored)
        facts = itertools.cycle(PROMPTS)

        def one_edit():
            prompt, target, subject = next(facts)
            return editor.edit(prompt, target, subject=subject, on_conflict="keep")

        benchmark.group = f"edit with {stored} stored"
        pedantic(benchmark, one_edit, rounds=sizes(3, 8), warmup=1)
        steps = [r.steps for r in editor.edits()]
        benchmark.extra_info.update(impl=loop, baseline=loop == "reference", stored=stored,
                                    mean_steps=sum(steps) / len(steps))
    finally:
        editor.unload()
