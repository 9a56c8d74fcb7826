"""Tokenising (prompt, target) pairs and laying batches out for attribution.

Causal LMs: the row is `prompt + object[:-1]`, left-padded so every prompt's last token
(the target position) sits in the same column; object token k is predicted at target+k
(teacher forcing), and the gold probability is the product over the object's tokens.
Masked LMs: the prompt holds exactly one mask token; the object must be one token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK_PLACEHOLDER = "[MASK]"


class SkipPrompt(ValueError):
    """A prompt the model cannot score; the message is the user-facing reason."""


@dataclass(frozen=True)
class Encoded:
    prompt_ids: tuple[int, ...]
    object_ids: tuple[int, ...]
    target_index: int  # index in prompt_ids of the position that predicts the object

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.object_ids) - 1


def max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode(tokenizer, prompt: str, target: str, *, masked: bool, max_length: int | None = None) -> Encoded:
    if not isinstance(prompt, str) or not prompt.strip():
        raise SkipPrompt("empty prompt")
    if not isinstance(target, str) or not target.strip():
        raise SkipPrompt("empty target")
    enc = _encode_masked(tokenizer, prompt, target) if masked else _encode_causal(tokenizer, prompt, target)
    if max_length is not None and enc.length > max_length:
        raise SkipPrompt(f"prompt is {enc.length} tokens, over the model's limit of {max_length}")
    return enc


def _ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _encode_masked(tokenizer, prompt: str, target: str) -> Encoded:
    mask = tokenizer.mask_token
    if mask is None:
        raise SkipPrompt("tokenizer has no mask token")
    if mask != MASK_PLACEHOLDER:
        prompt = prompt.replace(MASK_PLACEHOLDER, mask)
    ids = _ids(tokenizer, prompt)
    hits = [i for i, t in enumerate(ids) if t == tokenizer.mask_token_id]
    if len(hits) != 1:
        raise SkipPrompt(f"prompt must contain exactly one mask token, found {len(hits)}")
    obj = _ids(tokenizer, target, special=False)
    if len(obj) != 1:
        pieces = tokenizer.convert_ids_to_tokens(obj)
        raise SkipPrompt(f"object {target.strip()!r} is {len(obj)} tokens {pieces} for this masked LM; it must be one")
    if obj[0] == tokenizer.unk_token_id:
        raise SkipPrompt(f"object {target.strip()!r} is the unknown token for this vocabulary")
    return Encoded(tuple(ids), tuple(obj), hits[0])


def _encode_causal(tokenizer, prompt: str, target: str) -> Encoded:
    prompt_ids = _ids(tokenizer, prompt)
    eos = tokenizer.eos_token_id
    if prompt_ids and prompt_ids[-1] == eos and len(prompt_ids) > 1:  # tokenizers that append EOS
        prompt_ids = prompt_ids[:-1]
    full = _ids(tokenizer, prompt + target)
    if full and full[-1] == eos:
        full = full[:-1]
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        obj = full[len(prompt_ids) :]  # joint tokenisation, as the model reads it
    else:
        obj = _ids(tokenizer, target, special=False)
    if not prompt_ids:
        raise SkipPrompt("prompt tokenises to nothing")
    if not obj:
        raise SkipPrompt("target tokenises to nothing")
    return Encoded(tuple(prompt_ids), tuple(obj), len(prompt_ids) - 1)


@dataclass
class Batch:
    """A padded batch. Columns >= `start_col` are recomputed when a layer is scaled;
    columns before it (causal LMs: the prompt prefix) are unchanged and come from the KV cache."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor | None  # [B, T] (causal LMs; left padding needs explicit positions)
    target_col: torch.Tensor  # [B] column of the scaled (target) position
    pred_cols: torch.Tensor  # [B, K] columns whose logits predict object tokens
    gold_ids: torch.Tensor  # [B, K]
    gold_valid: torch.Tensor  # [B, K] bool
    start_col: int

    def to(self, device) -> "Batch":
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def collate(items: list[Encoded], *, masked: bool, pad_id: int) -> Batch:
    return _collate_masked(items, pad_id) if masked else _collate_causal(items, pad_id)


def _collate_masked(items: list[Encoded], pad_id: int) -> Batch:
    B, T = len(items), max(len(e.prompt_ids) for e in items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(items):
        ids[i, : len(e.prompt_ids)] = torch.tensor(e.prompt_ids)
        mask[i, : len(e.prompt_ids)] = 1
    target = torch.tensor([e.target_index for e in items])
    gold = torch.tensor([[e.object_ids[0]] for e in items])
    return Batch(ids, mask, None, target, target[:, None], gold, torch.ones_like(gold, dtype=torch.bool), 0)


def _collate_causal(items: list[Encoded], pad_id: int) -> Batch:
    B = len(items)
    P = max(len(e.prompt_ids) for e in items)
    K = max(len(e.object_ids) for e in items)
    T = P + K - 1
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    gold = torch.full((B, K), pad_id, dtype=torch.long)
    valid = torch.zeros((B, K), dtype=torch.bool)
    for i, e in enumerate(items):
        row = list(e.prompt_ids) + list(e.object_ids[:-1])
        begin = P - len(e.prompt_ids)  # left pad the prompt, right pad the object
        ids[i, begin : begin + len(row)] = torch.tensor(row)
        mask[i, begin : begin + len(row)] = 1
        gold[i, : len(e.object_ids)] = torch.tensor(e.object_ids)
        valid[i, : len(e.object_ids)] = True
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    target = torch.full((B,), P - 1, dtype=torch.long)
    pred = (P - 1 + torch.arange(K))[None].expand(B, K).clone()
    return Batch(ids, mask, positions, target, pred, gold, valid, P - 1)
