"""What every engine computation shares: a frozen model, precision, tokenising and batching."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from .encoding import Batch, Encoded, SkipPrompt, collate, encode, max_positions
from .loading import LoadedModel, module_device
from .precision import resolve_precision

CPU_BATCH_PROMPTS = 32  # prompts per batch on a CPU (rows of all of them share each pass)
AUTO_MAX_PROMPTS = 1024  # a GPU batch's bound: the clean pass caches every layer's input per prompt


class ModelRunner:
    """Holds a LoadedModel and runs batched, padded forward passes over (prompt, target) pairs."""

    def __init__(
        self,
        model: LoadedModel | torch.nn.Module,
        tokenizer=None,
        *,
        precision: str = "auto",
        max_batch_tokens: int | None = None,
        max_batch_prompts: int | None = None,
    ):
        self.lm = model if isinstance(model, LoadedModel) else LoadedModel.from_objects(model, tokenizer)
        self.model, self.adapter, self.tokenizer = self.lm.model, self.lm.adapter, self.lm.tokenizer
        self.device = self.lm.device
        self.precision = resolve_precision(precision, self.device, self.lm.dtype)
        self.max_batch_tokens = max_batch_tokens or self._default_batch_tokens()
        self.max_batch_prompts = max_batch_prompts  # a cap; None: `batch_size` sizes batches to the device
        self.max_length = max_positions(self.model.config)
        self.pad_id = next((int(t) for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if t is not None), 0)

    def encode(self, prompt: str, target: str) -> Encoded:
        """Tokenise one (prompt, target); raises SkipPrompt with a reason if it cannot be scored."""
        return encode(self.tokenizer, prompt, target, masked=self.adapter.masked, max_length=self.max_length)

    def _prepare(self, prompts, targets) -> tuple[list[str], list[str], list[tuple[int, Encoded]], dict[int, str]]:
        """Encode all pairs: (prompts, targets, [(index, encoded)] sorted by length, {index: skip reason})."""
        prompts, targets = _as_list(prompts), _as_list(targets)
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        ready, skipped = [], {}
        for i, (prompt, target) in enumerate(zip(prompts, targets)):
            try:
                ready.append((i, self.encode(prompt, target)))
            except SkipPrompt as skip:
                skipped[i] = str(skip)
        ready.sort(key=lambda item: (len(item[1].object_ids), item[1].length))  # see `batches`
        return prompts, targets, ready, skipped

    def _collate(self, encs: list[Encoded]) -> Batch:
        return collate(encs, masked=self.adapter.masked, pad_id=self.pad_id).to(self.device)

    def _inputs(self, batch: Batch, rows: torch.Tensor, start: int = 0) -> dict:
        """Model inputs for `rows` of the batch, from column `start` on (earlier columns come from a cache)."""
        inputs = dict(input_ids=batch.input_ids[rows, start:], attention_mask=batch.attention_mask[rows])
        if batch.position_ids is not None:
            inputs["position_ids"] = batch.position_ids[rows, start:]
        return inputs

    def _full_cache(self) -> dict:
        """Causal LMs: a cache that keeps every position of every layer. A sliding-window layer's
        own cache keeps only the last window - 1 keys, but the scaled rows need the whole prefix
        (`_prefix_cache` hands it to a cache that applies the window again)."""
        if self.adapter.masked:
            return dict(use_cache=False)
        from transformers import DynamicCache

        return dict(past_key_values=DynamicCache(), use_cache=True)

    def _prefix_cache(self, kv, pi, layer=0, repeat: int = 1):
        """A fresh cache holding the clean prefix for the rows `pi` (layers below `layer` are never
        read); `repeat` > 1 repeats grouped-query keys/values per query head."""
        from transformers import DynamicCache

        def rows(t):
            t = t[pi.to(t.device)]
            return t if repeat == 1 else t.repeat_interleave(repeat, dim=1)

        data = [(rows(k), rows(v)) if i >= layer else (k[:1], v[:1]) for i, (k, v) in enumerate(kv)]
        return DynamicCache(ddp_cache_data=data, config=self.model.config)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Readable text of each token id; ids past the tokenizer's vocabulary (padded embedding
        tables) read as `<id N>` instead of failing."""
        texts = []
        for i, token in zip(ids, self.tokenizer.convert_ids_to_tokens(ids)):
            texts.append(f"<id {i}>" if token is None else self.tokenizer.convert_tokens_to_string([token]))
        return texts

    def _check_layers(self, layers: Sequence[int] | None) -> list[int]:
        n = self.lm.num_layers
        if layers is None:
            return list(range(n))
        layers = sorted({int(layer) for layer in layers})
        bad = [layer for layer in layers if not 0 <= layer < n]
        if bad or not layers:
            raise ValueError(f"layers must be a non-empty subset of 0..{n - 1}; got {bad or 'none'}")
        return layers

    def batch_size(self, rows_per_prompt: int = 1, *, suffix_rows: bool = False):
        """Prompts per batch, as a function of a group of (index, Encoded) of one object length
        (`batches`): on a CPU, CPU_BATCH_PROMPTS or the cap `max_batch_prompts`; on a GPU, as many
        prompts as make one pass of `max_batch_tokens` row-tokens (each prompt brings
        `rows_per_prompt` rows of its length, or with `suffix_rows` of its object's length: causal
        rows start at the target), at most AUTO_MAX_PROMPTS and the cap."""
        cap = self.max_batch_prompts

        def size(group) -> int:
            if not any(d.type == "cuda" for d in self.lm.devices):
                return cap or CPU_BATCH_PROMPTS
            per_row = len(group[0][1].object_ids) if suffix_rows else max(e.length for _, e in group)
            fit = max(1, min(AUTO_MAX_PROMPTS, self.max_batch_tokens // (rows_per_prompt * per_row)))
            return min(fit, cap or fit)

        return size

    def _default_batch_tokens(self) -> int:
        """Row-tokens per forward/backward, sized to the free memory of every GPU the model runs
        on: the device whose share of blocks (and LM head) needs most per row-token bounds it."""
        cuda = [d for d in self.lm.devices if d.type == "cuda"]
        if not cuda:
            return 2048
        blocks, head = block_devices(self.lm), self.lm.head_device
        fits = []
        for device in cuda:
            need = row_token_bytes(self.model.config, blocks.count(device), head == device, self._act_bytes())
            free, _ = torch.cuda.mem_get_info(device)
            fits.append(0.5 * free / need)
        return int(max(256, min(65536, min(fits))))

    def _act_bytes(self) -> int:
        """Bytes per activation element: 2 under half-precision compute, else 4."""
        return 2 if self.precision in ("bf16", "fp16") else 4

    def _back_off(self) -> None:
        """Halve the batch after an out-of-memory error."""
        self.max_batch_tokens = max(1, self.max_batch_tokens // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def block_devices(lm: LoadedModel) -> list[torch.device]:
    """The execution device of each transformer block."""
    return [module_device(block) for block in lm.adapter.blocks(lm.model)]


def row_token_bytes(config, layers: int, head: bool, act_bytes: int) -> int:
    """Memory one row-token of an attribution pass keeps on a device holding `layers` blocks
    (and the LM head if `head`): saved activations per block ~ (16 d + 6 F) elements (norms,
    q/k/v/attention, the FFN's gate/up/act products and their grads), the row's copy of the
    prompt-prefix key/value cache (~32 positions), fp32 logits and their gradient over V."""
    d = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 768)
    f = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 12)
    kv_dim = (getattr(config, "num_key_value_heads", None) or heads) * (getattr(config, "head_dim", None) or d // heads)
    per_block = act_bytes * (16 * d + 6 * f) + act_bytes * 2 * kv_dim * 32
    return layers * per_block + (16 * getattr(config, "vocab_size", 50000) if head else 0) + 1


def gold_prob(logits: torch.Tensor, gold: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Teacher-forced probability of the whole object: prod_k P(o_k | prompt, o_<k).

    `logits` [R, K, V]; cross-entropy fuses log-softmax and the gold pick (and its backward),
    computed in fp32 whatever the autocast dtype.
    """
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), gold.flatten(), reduction="none")
    return (-nll.view_as(gold) * valid).sum(-1).exp()


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


def batches(ready: list[tuple[int, Encoded]], size):
    """Batches of at most `size` prompts (an int, or a function of the group, `batch_size`) whose
    objects have the same number of tokens.

    Every row of a batch is padded to its longest object, so mixing a 1-token object with
    a 3-token one would triple the work of the short one's rows.
    """
    for _, group in itertools.groupby(ready, key=lambda item: len(item[1].object_ids)):
        group = list(group)
        n = size(group) if callable(size) else size
        for lo in range(0, len(group), n):
            yield group[lo : lo + n]


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)
