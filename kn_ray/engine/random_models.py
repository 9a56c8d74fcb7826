"""Randomly initialised models of real sizes, for timing where no checkpoint can be downloaded.

Timing does not depend on the weights, only on shapes and on how many tokens a prompt
becomes, so the tokenizer is a real subword tokenizer (WordPiece for BERT, byte-level BPE
for GPT-2) trained on the benchmark's own text.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .loading import LoadedModel

PRESETS = {
    # name: (family, config kwargs); sizes of bert-base-cased and gpt2 (small)
    "bert-base-random": ("bert", dict(vocab_size=28996)),
    "gpt2-small-random": ("gpt2", dict(vocab_size=50257)),
}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def random_model(name: str, texts: Iterable[str], device: str | torch.device = "cpu", seed: int = 0) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, GPT2Config

    if name not in PRESETS:
        raise ValueError(f"unknown random preset {name!r}; known: {', '.join(PRESETS)}")
    family, kwargs = PRESETS[name]
    texts = list(texts)
    torch.manual_seed(seed)
    if family == "bert":
        model = AutoModelForMaskedLM.from_config(BertConfig(**kwargs))
        tokenizer = _wordpiece(texts, kwargs["vocab_size"])
    else:
        model = AutoModelForCausalLM.from_config(GPT2Config(**kwargs))
        tokenizer = _byte_bpe(texts, kwargs["vocab_size"])
    return LoadedModel.from_objects(model.to(device), tokenizer, name=name)


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
