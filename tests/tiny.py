"""Tiny random-initialised models of every supported family, and an offline tokenizer."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers import (
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PhiConfig,
    Qwen2Config,
)

WORDS = (
    "the a of in is was who what where which when did does city capital country university river "
    "france paris rome italy london england japan tokyo berlin germany madrid spain attend attended "
    "wrote write author book play song sang team plays football music born live lives located tower "
    "eiffel great wall china river nile longest largest planet jupiter saturn mars water made "
    "hydrogen oxygen answer question nq yes no i you because q : ? . , -"
).split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.padding_side = "left"
    return fast


def bpe_tokenizer(sentences, vocab_size: int = 420) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``sentences`` (offline, well under a second): it encodes
    any text, with GPT-2-style space handling, for tests of tokenisation-sensitive evaluation code."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(sentences) * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.padding_side = "left"
    return fast


def _config(family: str, vocab: int, **overrides):
    def make(cls, **kw):
        kw.update(vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=1)
        kw.update(overrides)
        return cls(**kw)

    if family in ("llama", "mistral", "qwen2", "gemma"):
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "gemma": GemmaConfig}[family]
        extra = {"head_dim": 16} if family == "gemma" else {}
        return make(cls, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, **extra)
    if family == "gpt2":
        return make(GPT2Config, n_embd=64, n_layer=4, n_head=4, n_positions=128)
    if family == "gptj":
        return make(GPTJConfig, n_embd=64, n_layer=4, n_head=4, n_positions=128, rotary_dim=8)
    if family == "gpt_neox":
        return make(GPTNeoXConfig, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                    max_position_embeddings=128)
    if family == "opt":
        return make(OPTConfig, hidden_size=64, ffn_dim=160, num_hidden_layers=4, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=64)
    if family == "phi":
        return make(PhiConfig, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                    max_position_embeddings=128)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gpt2", "gptj", "gpt_neox", "opt", "phi")


def tiny_model(family: str = "llama", seed: int = 0, tokenizer=None, **config):
    """A random model of ``family`` (frozen, eval mode) and its tokenizer (default: the word-level
    one); ``config`` overrides fields of the model config."""
    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, len(tok), **config))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok
