"""Helpers for pipeline tests: tiny models whose vocabulary covers given texts, and PARAREL slices."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertTokenizer, PreTrainedTokenizerFast

from kn_ray.pipeline.known import ProbePolicy
from tests.tiny_models import CONFIGS, MASKED, SPECIALS

# Random models know nothing: tests of the pipeline's mechanics attribute every prompt (the paper's rule).
EVERY_PROMPT = ProbePolicy(known="any")
EVERY_PROMPT_FLAGS = ("--known", "any")

# A PARAREL sample shipped with the tests (3 relations x 10 facts, all templates; MIT, see its LICENSE).
PARAREL = Path(__file__).resolve().parent / "fixtures" / "pararel"
WORD = re.compile(r"\w+|[^\w\s]")


def words_of(texts) -> list[str]:
    return sorted({w for t in texts for w in WORD.findall(t)})


def save_tiny_model(family: str, texts, path: Path, seed: int = 0) -> Path:
    """A tiny random `family` model whose word-level vocabulary covers `texts`, saved to `path`."""
    vocab = SPECIALS + [w for w in words_of(texts) if w not in SPECIALS]
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    config.vocab_size = len(vocab)
    auto = AutoModelForMaskedLM if family in MASKED else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager").eval()
    path.mkdir(parents=True, exist_ok=True)
    if family == "bert":
        (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tokenizer = BertTokenizer(vocab=str(path / "vocab.txt"), do_lower_case=False)
    else:
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                            mask_token="[MASK]", eos_token="[SEP]")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def pararel_slice(dest: Path, relations=("P17", "P19", "P1412"), facts=4, templates=None) -> Path:
    """A copy of the first `facts` facts (and first `templates` templates) of some relations."""
    for sub in ("facts", "templates"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for rel in relations:
        fact_lines = (PARAREL / "facts" / f"{rel}.jsonl").read_text().splitlines()[:facts]
        template_lines = (PARAREL / "templates" / f"{rel}.jsonl").read_text().splitlines()[:templates]
        (dest / "facts" / f"{rel}.jsonl").write_text("\n".join(fact_lines) + "\n")
        (dest / "templates" / f"{rel}.jsonl").write_text("\n".join(template_lines) + "\n")
    return dest


def texts_of_pararel(root: Path) -> list[str]:
    texts = []
    for path in sorted((root / "facts").glob("*.jsonl")) + sorted((root / "templates").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            texts.extend(str(v) for v in json.loads(line).values())
    return texts


# (JSON Lines record, the reason it must be reported with; None: a good record)
BAD_LINES = [
    (b'{"id": "ok1", "relation": "r", "subject": "France", "object": "Paris", "templates": ["[X] capital [Y] ."]}', None),
    (b'{"id": "bad-json", "relation": ', "malformed JSON"),
    (b'["a", "list"]', "expected a JSON object"),
    (b'{"id": "nosubj", "relation": "r", "object": "Paris", "templates": ["[X] [Y]"]}', "missing field 'subject'"),
    (b'{"id": "empty", "relation": "r", "subject": "  ", "object": "Paris", "templates": ["[X] [Y]"]}', "empty 'subject'"),
    (b'{"id": "both", "relation": "r", "subject": "a", "object": "b"}', "exactly one of 'templates' or 'prompts'"),
    (b'{"id": "noY", "relation": "r", "subject": "a", "object": "b", "templates": ["[X] is here"]}', "[Y] exactly once"),
    (b'{"id": "noX", "relation": "r", "subject": "a", "object": "b", "templates": ["it is [Y]"]}', "[X] exactly once"),
    (b'{"id": "ok1", "relation": "r", "subject": "Italy", "object": "Rome", "templates": ["[X] capital [Y] ."]}', "duplicate id 'ok1'"),
    (b'{"id": "bytes", "relation": "r", "subject": "\xff\xfe", "object": "b", "templates": ["[X] [Y]"]}', "broken unicode: invalid"),
    (b'{"id": "surrogate", "relation": "r", "subject": "\\ud800x", "object": "b", "templates": ["[X] [Y]"]}', "lone surrogate"),
    (b'{"id": "emptytpl", "relation": "r", "subject": "a", "object": "b", "templates": [""]}', "empty 'template'"),
    (b'{"id": "ok2", "relation": "r", "subject": "Japan", "object": "Tokyo", "prompts": ["Japan capital [MASK] ."]}', None),
]

