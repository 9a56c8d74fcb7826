"""Tiny random models of every supported family, built offline from configs."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BertTokenizer,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    RobertaConfig,
)

WORDS = (
    "the capital of france is paris berlin london rome madrid germany italy spain city country "
    "was born in located native language speaks english french german official religion "
    "new york san francisco los angeles works for plays instrument piano guitar , . a an and"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIALS + sorted(set(WORDS))

SIZES = dict(hidden=32, layers=3, heads=4, ffn=48, positions=64)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: ' paris' is one token, 'new york' two."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]", eos_token="[SEP]"
    )


def bert_tokenizer(tmp_path) -> BertTokenizer:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizer(vocab=str(path))  # transformers 5 ignores vocab_file=


def _common(cfg_cls, **kw):
    s = SIZES
    return cfg_cls(vocab_size=len(VOCAB), initializer_range=0.3, **kw)


CONFIGS = {
    "bert": lambda: BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                               intermediate_size=48, max_position_embeddings=64, initializer_range=0.3),
    "roberta": lambda: RobertaConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=70, initializer_range=0.3,
                                     pad_token_id=0, bos_token_id=2, eos_token_id=3),
    "gpt2": lambda: GPT2Config(vocab_size=len(VOCAB), n_embd=32, n_layer=3, n_head=4, n_inner=48, n_positions=64,
                               initializer_range=0.3),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=64, initializer_range=0.3),
    "llama": lambda: LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                 initializer_range=0.3, pad_token_id=0),
    "mistral": lambda: MistralConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                     initializer_range=0.3, pad_token_id=0),
    "qwen2": lambda: Qwen2Config(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                 initializer_range=0.3, pad_token_id=0),
    "gemma": lambda: GemmaConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=64,
                                 initializer_range=0.3, pad_token_id=0),
    # Gemma 3: sliding-window and global layers (a window of 3 tokens, shorter than most test
    # prompts), pre/post-FFN norms, a sqrt(hidden)-scaled tied embedding, q/k norms; a smaller
    # init than the others (0.3 makes the scaled embedding so peaked that gold P is ~1e-4)
    "gemma3_text": lambda: Gemma3TextConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=3,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            intermediate_size=48, max_position_embeddings=64, sliding_window=3,
                                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                            query_pre_attn_scalar=8, initializer_range=0.1, pad_token_id=0),
}
MASKED = {"bert", "roberta"}

CAUSAL_CASES = (
    ["the capital of france is", "rome is located in", "the city of", "paris was born in the city of"],
    [" paris", " italy", " new york", " san francisco"],  # single- and multi-token objects, ragged lengths
)
MASKED_CASES = (
    ["the capital of france is [MASK] .", "[MASK] is the capital of italy", "paris is located in [MASK] ."],
    ["paris", "rome", "france"],
)


def cases(family):
    """(prompts, targets) in the tiny vocabulary for a family."""
    return MASKED_CASES if family in MASKED else CAUSAL_CASES


def tiny_model(family: str, tmp_path=None, seed: int = 0):
    """(model, tokenizer) for a family, random weights, eval mode."""
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    auto = AutoModelForMaskedLM if family in MASKED else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager").eval()
    tok = bert_tokenizer(tmp_path) if family == "bert" else word_tokenizer()
    return model, tok
