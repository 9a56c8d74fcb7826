"""Randomly initialised models of real sizes, for timing where no checkpoint can be downloaded.

Timing does not depend on the weights, only on shapes and on how many tokens a prompt
becomes, so the tokenizer is a real subword tokenizer (WordPiece for BERT, byte-level BPE
for the causal LMs) trained on the benchmark's own text.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .loading import LoadedModel

_LLAMA3 = dict(vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)
PRESETS = {
    # name: (family, config kwargs), the published configs written out (no hub access needed)
    "bert-base-random": ("bert", dict(vocab_size=28996)),  # bert-base-cased
    "gpt2-small-random": ("gpt2", dict(vocab_size=50257)),  # gpt2
    "llama3.2-1b-random": ("llama", dict(  # meta-llama/Llama-3.2-1B: 1.24B parameters
        _LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192))),
    "llama3-8b-random": ("llama", dict(  # meta-llama/Meta-Llama-3-8B: 8.03B parameters
        _LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=False)),
    "qwen2.5-7b-random": ("qwen2", dict(  # Qwen/Qwen2.5-7B: 7.62B parameters
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, use_sliding_window=False, bos_token_id=151643, eos_token_id=151643)),
}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def random_model(name: str, texts: Iterable[str], device: str | torch.device = "cpu", seed: int = 0,
                 dtype: torch.dtype = torch.float32, sizes: dict | None = None) -> LoadedModel:
    """A preset's model with random weights, built directly on `device` in `dtype` (an 8B model
    never exists in fp32 on the host), and a tokenizer trained on `texts`. `sizes` overrides
    config keys (benchmarks/gpu_check.py --smoke shrinks the presets this way)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    if name not in PRESETS:
        raise ValueError(f"unknown random preset {name!r}; known: {', '.join(PRESETS)}")
    family, kwargs = PRESETS[name]
    kwargs = {**kwargs, **(sizes or {})}
    texts = list(texts)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **kwargs)
    auto = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    with torch.device(device):
        model = auto.from_config(config, dtype=dtype)
    tokenizer = _wordpiece(texts, kwargs["vocab_size"]) if family == "bert" else _byte_bpe(texts, kwargs["vocab_size"])
    return LoadedModel.from_objects(model, tokenizer, name=name)


def _wordpiece(texts: list[str], vocab_size: int):
    from tokenizers import BertWordPieceTokenizer
    from transformers import PreTrainedTokenizerFast

    tok = BertWordPieceTokenizer(lowercase=False)
    tok.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok._tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def _byte_bpe(texts: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
