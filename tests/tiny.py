"""Tiny random-initialised models of every supported family, and an offline tokenizer."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
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


def _config(family: str, vocab: int):
    common = dict(vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    if family in ("llama", "mistral", "qwen2", "gemma"):
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "gemma": GemmaConfig}[family]
        extra = {"head_dim": 16} if family == "gemma" else {}
        return cls(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, **extra, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=128, **common)
    if family == "gptj":
        return GPTJConfig(n_embd=64, n_layer=4, n_head=4, n_positions=128, rotary_dim=8, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                             max_position_embeddings=128, **common)
    if family == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=4, num_attention_heads=4,
                         max_position_embeddings=128, word_embed_proj_dim=64, **common)
    if family == "phi":
        return PhiConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                         max_position_embeddings=128, **common)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gpt2", "gptj", "gpt_neox", "opt", "phi")


def tiny_model(family: str = "llama", seed: int = 0):
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, len(tok)))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok
