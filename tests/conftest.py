"""Test configuration.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any
module that defines kernels is imported: without CUDA, kernels run in the interpreter.
"""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import memoir._C  # noqa: F401

    HAS_EXT = True
except Exception:  # pragma: no cover - depends on the build
    HAS_EXT = False

# CI sets MEMOIR_REQUIRE_EXT=1: there a missing native extension fails the tests that compare it
# with the reference (without it they would compare the reference with itself) instead of skipping.
REQUIRE_EXT = os.environ.get("MEMOIR_REQUIRE_EXT", "0") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_ext = pytest.mark.skip(reason="memoir._C is not built")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)
        if "needs_ext" in item.keywords and not HAS_EXT and not REQUIRE_EXT:
            item.add_marker(skip_ext)


@pytest.fixture(autouse=True)
def _extension_present_where_required(request):
    if request.node.get_closest_marker("needs_ext") is not None and not HAS_EXT:
        pytest.fail("memoir._C is not built but MEMOIR_REQUIRE_EXT=1 (this test compares it with the reference)")


@pytest.fixture(autouse=True)
def _kernel_mode_follows_env():
    """memoir reads MEMOIR_KERNELS once; a test that changed it leaves the next test the original."""
    yield
    from memoir import backends

    backends.kernel_mode.cache_clear()


@pytest.fixture()
def one_thread():
    """Tiny ops: one thread avoids OpenMP overhead (10x faster on a busy 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def private_pre_cache(tmp_path, monkeypatch):
    """`memoir eval` runs share the unedited pass through a cache; keep each test's to itself."""
    from memoir.eval import prepass

    monkeypatch.setattr(prepass, "default_dir", lambda: tmp_path / "pre-edit-cache")


@pytest.fixture(scope="session")
def eval_tokenizer():
    """A BPE tokenizer that encodes any evaluation text (tests/tiny.py)."""
    from eval_helpers import SENTENCES
    from tiny import bpe_tokenizer

    return bpe_tokenizer(SENTENCES)


@pytest.fixture(scope="session")
def eval_model_dir(tmp_path_factory, eval_tokenizer):
    """A tiny random Llama with the BPE tokenizer, saved as a model folder (what `--model` takes)."""
    from tiny import tiny_model

    eos = eval_tokenizer.eos_token_id
    model, tok = tiny_model("llama", seed=0, tokenizer=eval_tokenizer, intermediate_size=128,
                            max_position_embeddings=512, initializer_range=0.1,
                            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture()
def eval_model(eval_model_dir):
    """``(model, tokenizer)`` loaded from :func:`eval_model_dir` the way the eval CLI loads it."""
    from memoir.models import load_model

    return load_model(str(eval_model_dir))
