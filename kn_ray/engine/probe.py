"""Forward-only probes: the gold object's probability, optionally with neurons scaled.

Suppressing (factor 0) or amplifying (factor 2) knowledge neurons at the target position
and reading how the gold probability moves is the paper's evidence that they matter.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .hooks import edit_neurons, gather_head_input
from .precision import autocast
from .model_runner import ModelRunner, batches, gold_prob

Neurons = Sequence[tuple[int, int]]  # (layer, neuron) pairs


@dataclass
class Probe:
    prompt: str
    target: str
    status: str = "ok"  # ok | skipped
    reason: str | None = None
    gold_prob: float = math.nan  # teacher-forced P(target | prompt)
    n_target_tokens: int = 0
    top_token: str | None = None
    top_id: int = -1
    top_prob: float = math.nan
    first_target_id: int = -1  # the target's first token (top-1 accuracy compares it to top_id)
    gold_rank: int = -1  # rank of the target's first token at the target position (1 = the top prediction)

    @property
    def correct(self) -> bool:
        return self.top_id == self.first_target_id

    @property
    def perplexity(self) -> float:
        """exp(-mean log P) over the target's tokens."""
        if not self.n_target_tokens or not self.gold_prob > 0:
            return math.inf
        return math.exp(-math.log(self.gold_prob) / self.n_target_tokens)


class Prober(ModelRunner):
    """Batched forward passes that read P(target), with optional neuron scaling."""

    def probe(
        self,
        prompts: str | Sequence[str],
        targets: str | Sequence[str],
        *,
        neurons: Sequence[Neurons] | None = None,
        factor: float = 1.0,
    ) -> list[Probe]:
        """P(target | prompt) per pair; `neurons` holds one list of (layer, neuron) per prompt,
        whose activations at the target position are multiplied by `factor`."""
        prompts, targets, ready, skipped = self._prepare(prompts, targets)
        per_prompt = _per_prompt(neurons, len(prompts))
        results: list[Probe | None] = [None] * len(prompts)
        for i, reason in skipped.items():
            results[i] = Probe(prompts[i], targets[i], status="skipped", reason=reason)
        for chunk in batches(ready, self.batch_size()):
            for (i, enc), out in zip(chunk, self._probe_batch(chunk, per_prompt, factor)):
                results[i] = Probe(prompts[i], targets[i], n_target_tokens=len(enc.object_ids), first_target_id=enc.object_ids[0], **out)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _probe_batch(self, chunk, per_prompt, factor) -> list[dict]:
        batch = self._collate([enc for _, enc in chunk])
        rows = torch.arange(batch.size, device=self.device)
        scales = self._scales([per_prompt[i] for i, _ in chunk], factor, batch.size)
        with contextlib.ExitStack() as stack:
            stack.enter_context(autocast(self.precision, self.device))
            stack.enter_context(gather_head_input(self.model, self.adapter, batch.pred_cols))
            for layer, scale in scales.items():
                stack.enter_context(edit_neurons(self.model, self.adapter, layer, _scaler(rows, batch.target_col, scale)))
            logits = self.model(**self._inputs(batch, rows)).logits.to(self.device)
        gold = gold_prob(logits, batch.gold_ids, batch.gold_valid)
        first = logits[:, 0].float()
        top_prob, top_ids = first.softmax(-1).max(-1)
        ranks = gold_rank(first, batch.gold_ids[:, 0])
        tokens = self.token_texts(top_ids.tolist())
        return [
            dict(
                gold_prob=float(gold[b]),
                top_token=tokens[b],
                top_id=int(top_ids[b]),
                top_prob=float(top_prob[b]),
                gold_rank=int(ranks[b]),
            )
            for b in range(batch.size)
        ]

    def _scales(self, neuron_lists: list[Neurons], factor: float, size: int) -> dict[int, torch.Tensor]:
        """Per layer, a [B, neurons] multiplier (1 where untouched)."""
        scales: dict[int, torch.Tensor] = {}
        for b, pairs in enumerate(neuron_lists):
            for layer, neuron in pairs:
                if layer not in scales:
                    scales[layer] = torch.ones(size, self.lm.num_neurons, device=self.device)
                scales[layer][b, neuron] = factor
        return scales


def gold_rank(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """1 + the number of tokens scored strictly above the gold token (`logits` [B, V], `gold` [B]):
    1 when the greedy prediction is the gold token (a tie counts for the gold)."""
    return 1 + (logits > logits.gather(1, gold[:, None])).sum(-1)


def _scaler(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor):
    def edit(inputs: torch.Tensor) -> torch.Tensor:  # on the layer's device (a device map may split the model)
        r, c = rows.to(inputs.device), cols.to(inputs.device)
        return inputs.index_put((r, c), inputs[r, c] * scale.to(inputs.device, inputs.dtype))

    return edit


def _per_prompt(neurons, n: int) -> list[list[tuple[int, int]]]:
    if neurons is None:
        return [[] for _ in range(n)]
    if len(neurons) != n:
        raise ValueError(f"neurons has {len(neurons)} lists for {n} prompts (one list of (layer, neuron) per prompt)")
    return [[(int(layer), int(i)) for layer, i in pairs] for pairs in neurons]
