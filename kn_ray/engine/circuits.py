"""Edge attribution (EAP-IG, Hanna et al. 2024) and circuit faithfulness on Hugging Face models.

For a fact, a clean prompt and a corrupted one (the same template with another subject of the
same relation, the same number of tokens) are run once each, recording what every sender
writes. The score of edge u -> v is

    (out_u(clean) - out_u(corrupted)) . sum_k w_k dM/d(input_v) at e(alpha_k)

summed over positions, where e(alpha) = e_corrupted + alpha (e_clean - e_corrupted) are the
input embeddings, (alpha_k, w_k) a quadrature rule (`quadrature`: Gauss-Legendre by default)
and the gradient runs through v's own copy of the residual stream (`receivers`). One
forward/backward per (prompt, alpha) row gives every receiver's gradient, so every edge;
rows of many prompts share a pass. The gradients are summed over alpha first and the dot
products taken once per prompt (one [senders, T d] x [T d, receivers] product), not once
per alpha.

The metric M is log P(gold object) (teacher forced over its tokens), or the logit difference
between the gold object's first token and the corrupted fact's at the target position.

The logits read the final residual stream R, the sum of every sender's output. Their
gradient is integrated along the straight line from R(corrupted) to R(clean) (integrated
gradients at the logits' own input; a cheap pass through the final norm and the LM head at
the predicting positions), so the edges into `logits` sum to M(clean) - M(corrupted) as the
rule gets finer (completeness; the residual is reported). Along the embedding path they
would not: the final residual does not move on a straight line when the embeddings do.
`input_residual` reports how well the rule integrates the embedding path that every other
receiver's gradient follows: |sum_v (e_clean - e_corrupted) . integrated dM/d(input_v) -
(M(clean) - M(corrupted))|, the logits' gradient taken along that path too.

Faithfulness of a circuit C (a set of edges): every receiver reads
input_v - sum_{u -> v not in C} (out_u - out_u(corrupted)) in one patched forward on the
clean prompt; (M(C) - M(corrupted)) / (M(clean) - M(corrupted)).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kn_ray.choices import CIRCUIT_RULE, CIRCUIT_STEPS  # the default rule (n_steps="auto" means it too)

from .adapters import attention_shape
from .encoding import Batch, SkipPrompt
from .graph import Graph
from .hooks import first_arg, gather_head_input
from .precision import autocast
from .quadrature import AUTO, quadrature
from .receivers import record_senders, require_circuits, split_receivers
from .model_runner import ModelRunner, batches, describe, is_oom

METRICS = ("logprob", "logit_diff")


@dataclass
class EdgeAttribution:
    """EAP-IG result for one (clean prompt, corrupted prompt, target)."""

    prompt: str
    target: str
    corrupted: str
    status: str = "ok"
    reason: str | None = None
    metric: str = "logprob"
    clean_metric: float = math.nan
    corrupted_metric: float = math.nan
    gold_prob: float = math.nan  # P(gold object | clean prompt)
    scores: np.ndarray | None = None  # [senders, receivers] float32; 0 where no edge exists
    completeness: float = math.nan  # |sum of the edges into the logits - (M(clean) - M(corrupted))|
    input_residual: float = math.nan  # the same for integrated gradients along the embedding path
    evaluations: int = 0  # forward/backward rows (quadrature nodes)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def max_score(self) -> float:
        """The largest |edge score|."""
        return float(np.abs(self.scores).max()) if self.scores is not None and self.scores.size else math.nan

    @property
    def change(self) -> float:
        return self.clean_metric - self.corrupted_metric

    def top_edges(self, graph: Graph, k: int) -> list[tuple[str, float]]:
        """The k edges of largest |score|, as ("u->v", score)."""
        flat = top_edge_indices(self.scores, graph, k)
        return list(zip(graph.edge_names(flat), self.scores.flat[flat].tolist()))


def top_edge_indices(scores: np.ndarray, graph: Graph, k: int) -> np.ndarray:
    """Flat indices of the k valid edges of largest |score| (ties: lower index first)."""
    flat_valid = np.flatnonzero(graph.valid)
    order = np.argsort(-np.abs(scores.flat[flat_valid]), kind="stable")
    return flat_valid[order[:k]]


@dataclass
class _Run:
    """What one prompt batch's plain forward gives: sender outputs [B, U, T, d] fp32, input
    embeddings [B, T, d], the final residual at the predicting positions [B, K, d], M [B], P(gold) [B]."""

    outputs: torch.Tensor
    embeds: torch.Tensor
    final: torch.Tensor
    metric: torch.Tensor
    gold: torch.Tensor
    kv: list | None = None  # (clean runs) per layer keys/values [B, kv heads, T, head_dim]


@dataclass
class _Pair:
    clean: Batch
    corrupted: Batch
    other_ids: torch.Tensor  # [B] the corrupted object's first token (logit_diff)


class EdgeAttributor(ModelRunner):
    """EAP-IG edge scores and circuit faithfulness for causal LMs with pre-LN blocks.

    >>> eap = EdgeAttributor(load_model("smollm2"))
    >>> [res] = eap.attribute_edges(["The capital of France is"], [" Paris"], ["The capital of Spain is"])
    >>> res.top_edges(eap.graph, 10)
    """

    def __init__(self, *args, precision: str = "auto", **kwargs):
        # precision auto: fp32 (edge scores are differences of near-equal gradients; bf16 autocast grows
        # the completeness residual ~4 orders of magnitude), unless the weights are half precision
        if precision == "auto" and _weights_dtype(args[0]) == torch.float32:
            precision = "fp32"
        super().__init__(*args, precision=precision, **kwargs)
        layout = require_circuits(self.model, self.adapter)
        if self.adapter.masked:
            raise ValueError("circuits are for causal LMs")
        self.heads = attention_shape(self.model.config)[0]
        self.graph = Graph(self.lm.num_layers, self.heads, parallel=layout == "parallel")
        self._valid = torch.from_numpy(self.graph.valid).to(self.device)
        self._final_norm = self.model.get_submodule(self.adapter.final_norm)

    # ---- public API -------------------------------------------------------------------
    def attribute_edges(
        self,
        prompts: str | Sequence[str],
        targets: str | Sequence[str],
        corrupted: str | Sequence[str],
        *,
        corrupted_targets: Sequence[str] | None = None,
        n_steps: int | str = CIRCUIT_STEPS,
        rule: str = CIRCUIT_RULE,
        metric: str = "logprob",
        progress: Callable[[int], None] | None = None,
    ) -> list[EdgeAttribution]:
        """Score every edge for each (prompt, target, corrupted prompt); `corrupted_targets`
        (the corrupted facts' objects) are needed for metric="logit_diff"."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if n_steps == AUTO:  # no adaptive rule for edges: the fixed default (the pipeline's n_steps default is auto)
            n_steps, rule = CIRCUIT_STEPS, CIRCUIT_RULE
        alphas, weights = quadrature(n_steps, rule)
        items = self._pairs(prompts, targets, corrupted, corrupted_targets, metric)
        results: list[EdgeAttribution | None] = [None] * len(items[0])
        for i, reason in items[3].items():
            results[i] = EdgeAttribution(items[0][i], items[1][i], items[2][i], status="skipped", reason=reason, metric=metric)
        for chunk in _batches(items[4], self.batch_size(len(alphas))):
            for i, res in self._safely(chunk, items, alphas, weights, metric):
                results[i] = res
            if progress:
                progress(len(chunk))
        if progress and items[3]:
            progress(len(items[3]))
        return results  # type: ignore[return-value]

    def faithfulness(self, result: EdgeAttribution, circuits: np.ndarray, corrupted_target: str | None = None) -> np.ndarray:
        """Faithfulness of each circuit [n, senders, receivers] (bool: the edges kept clean) for
        the fact of `result`: (M(C) - M(corrupted)) / (M(clean) - M(corrupted))."""
        _, _, _, skipped, ready = self._pairs([result.prompt], [result.target], [result.corrupted],
                                              None if corrupted_target is None else [corrupted_target], result.metric)
        if skipped:
            raise ValueError(f"cannot patch {result.prompt!r}: {skipped[0]}")
        pair = self._collate_pair([ready[0][1]])
        keep = torch.as_tensor(circuits, device=self.device).bool()
        clean_m, corr_m, values = self._patched(pair, keep, result.metric)
        return ((values - corr_m) / (clean_m - corr_m)).cpu().numpy()

    # ---- inputs -----------------------------------------------------------------------
    def _pairs(self, prompts, targets, corrupted, corrupted_targets, metric):
        prompts, targets, corrupted = ([x] if isinstance(x, str) else list(x) for x in (prompts, targets, corrupted))
        if not len(prompts) == len(targets) == len(corrupted):
            raise ValueError(f"{len(prompts)} prompts, {len(targets)} targets, {len(corrupted)} corrupted prompts")
        if metric == "logit_diff" and (corrupted_targets is None or len(corrupted_targets) != len(prompts)):
            raise ValueError("metric='logit_diff' needs one corrupted target per prompt")
        ready, skipped = [], {}
        for i, (p, t, c) in enumerate(zip(prompts, targets, corrupted)):
            try:
                enc, enc_c = self.encode(p, t), self.encode(c, t)
                if len(enc.prompt_ids) != len(enc_c.prompt_ids) or enc.object_ids != enc_c.object_ids:
                    raise SkipPrompt(f"corrupted prompt is {len(enc_c.prompt_ids)} tokens, the clean one "
                                     f"{len(enc.prompt_ids)}: positions must match")
                other = self.encode(c, corrupted_targets[i]).object_ids[0] if metric == "logit_diff" else 0
                if metric == "logit_diff" and other == enc.object_ids[0]:
                    raise SkipPrompt(f"the corrupted object {corrupted_targets[i].strip()!r} starts with the gold's first "
                                     "token: logit_diff would be 0 (choose a partner whose object starts otherwise)")
                ready.append((i, (enc, enc_c, other)))
            except SkipPrompt as skip:
                skipped[i] = str(skip)
        ready.sort(key=lambda item: (len(item[1][0].object_ids), item[1][0].length))
        return prompts, targets, corrupted, skipped, ready

    def _collate_pair(self, encs) -> _Pair:
        clean = self._collate([e for e, _, _ in encs])
        corr = self._collate([c for _, c, _ in encs])
        return _Pair(clean, corr, torch.tensor([o for _, _, o in encs], device=self.device))

    # ---- batches ----------------------------------------------------------------------
    def _safely(self, chunk, items, alphas, weights, metric):
        prompts, targets, corrupted = items[0], items[1], items[2]
        start = time.perf_counter()
        try:
            outs = self._batch([e for _, e in chunk], alphas, weights, metric)
        except Exception as error:  # noqa: BLE001 - isolated and reported per prompt below
            if len(chunk) == 1:
                i = chunk[0][0]
                return [(i, EdgeAttribution(prompts[i], targets[i], corrupted[i], status="error", reason=describe(error), metric=metric))]
            warnings.warn(f"kn-ray: a batch of {len(chunk)} prompts failed ({describe(error)}); retrying them one by one")
            return [pair for item in chunk for pair in self._safely([item], items, alphas, weights, metric)]
        seconds = (time.perf_counter() - start) / len(chunk)
        return [(i, EdgeAttribution(prompts[i], targets[i], corrupted[i], metric=metric, seconds=seconds, **out))
                for (i, _), out in zip(chunk, outs)]

    def _batch(self, encs, alphas, weights, metric) -> list[dict]:
        pair = self._collate_pair(encs)
        clean = self._run_senders(pair.clean, pair, metric, keep_cache=True)
        corr = self._run_senders(pair.corrupted, pair, metric)
        alphas, weights = alphas.float().to(self.device), weights.float().to(self.device)
        real = pair.clean.attention_mask[:, None, :, None].to(clean.outputs.dtype)
        delta = (clean.outputs - corr.outputs) * real  # [B, U, T, d]
        grads = self._integrate(pair, clean, corr.embeds, alphas, weights, metric)  # [B, T, V, d]
        change = clean.metric - corr.metric
        valid = self._valid.to(grads.dtype)
        input_residual = (torch.einsum("btd,btvd,v->b", delta[:, 0], grads, valid[0]) - change).abs()
        grads[:, :, -1] = 0  # the logits: along the straight line at their own input instead
        cols = pair.clean.pred_cols[:, :, None].expand(-1, -1, grads.shape[-1])
        grads[:, :, -1].scatter_(1, cols, self._final_line(pair, clean.final, corr.final, alphas, weights, metric))
        scores = torch.einsum("butd,btvd->buv", delta, grads) * valid
        completeness = (scores[:, :, -1].sum(-1) - change).abs()
        scores, completeness, input_residual, m_clean, m_corr, gold = (
            t.cpu() for t in (scores, completeness, input_residual, clean.metric, corr.metric, clean.gold))
        return [dict(clean_metric=float(m_clean[b]), corrupted_metric=float(m_corr[b]), gold_prob=float(gold[b]),
                     scores=scores[b].numpy(), completeness=float(completeness[b]),
                     input_residual=float(input_residual[b]), evaluations=len(alphas))
                for b in range(pair.clean.size)]

    @torch.no_grad()
    def _run_senders(self, batch: Batch, pair: _Pair, metric: str, keep_cache: bool = False) -> _Run:
        outputs: list[torch.Tensor] = []
        embeds: list[torch.Tensor] = []
        final: list[torch.Tensor] = []

        def sink(kind, _layer, out):
            outputs.append(out.float().to(self.device) if kind == "heads" else out.float().to(self.device).unsqueeze(-2))

        def keep_final(_m, args, kwargs):
            hidden = first_arg(args, kwargs)
            final.append(hidden.gather(1, batch.pred_cols.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])))

        rows = torch.arange(batch.size, device=self.device)
        handles = [self.model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: embeds.append(out.detach())),
                   self._final_norm.register_forward_pre_hook(keep_final, with_kwargs=True)]
        try:
            with autocast(self.precision, self.device), record_senders(self.model, self.adapter, sink), \
                    gather_head_input(self.model, self.adapter, batch.pred_cols):
                out = self.model(**self._inputs(batch, rows), **(self._full_cache() if keep_cache else {}))
        finally:
            for handle in handles:
                handle.remove()
        logits = out.logits.to(self.device)
        kv = [(lay.keys, lay.values) for lay in out.past_key_values.layers] if keep_cache else None
        gold = self._metric(logits, pair, rows, "logprob").exp()
        return _Run(torch.cat(outputs, -2).transpose(1, 2), embeds[0], final[0].to(self.device),
                    self._metric(logits, pair, rows, metric), gold, kv)

    def _final_line(self, pair, r_clean, r_corr, alphas, weights, metric) -> torch.Tensor:
        """sum_k w_k dM/dR at R = R(corrupted) + alpha_k (R(clean) - R(corrupted)), R the final
        residual stream at the predicting positions [B, K, d]: the final norm and LM head only."""
        B, A = len(r_clean), len(alphas)
        pi = torch.arange(B, device=self.device).repeat_interleave(A)
        alpha = alphas.repeat(B)[:, None, None]
        with torch.enable_grad(), autocast(self.precision, self.device):
            x = (r_corr[pi].float() + alpha * (r_clean[pi].float() - r_corr[pi].float())).requires_grad_(True)
            head = self.adapter.head_module(self.model)
            logits = head(self._final_norm(x.to(r_clean.dtype))).to(self.device)
            (grad,) = torch.autograd.grad(self._metric(logits, pair, pi, metric).sum(), x)
        return (grad.float() * weights.repeat(B)[:, None, None]).view(B, A, *grad.shape[1:]).sum(1)

    def _metric(self, logits, pair: _Pair, rows, metric) -> torch.Tensor:
        logp_or_logits = logits.float()
        if metric == "logit_diff":
            first = logp_or_logits[:, 0]
            return first.gather(1, pair.clean.gold_ids[rows, :1])[:, 0] - first.gather(1, pair.other_ids[rows, None])[:, 0]
        logp = logp_or_logits.log_softmax(-1).gather(2, pair.clean.gold_ids[rows, :, None])[..., 0]
        return (logp * pair.clean.gold_valid[rows]).sum(-1)

    # ---- gradients ----------------------------------------------------------------------
    def _integrate(self, pair, clean: _Run, e_corr, alphas, weights, metric) -> torch.Tensor:
        """sum_k w_k dM/d(input_v) for every receiver v: [B, T, V, d] fp32, zero where a prompt's
        clean and corrupted tokens have not differed yet.

        Those columns (the template before the subject) are the same on the whole path, so
        their keys and values come from the clean run's cache and every sender's difference is
        zero there: rows start at the prompt's first differing column (prompts that start at
        the same column share passes)."""
        B, A, T = pair.clean.size, len(alphas), pair.clean.input_ids.shape[1]
        H, V, d = self.heads, self.graph.num_receivers, clean.embeds.shape[-1]
        grads = torch.zeros(B, T, V, d, device=self.device)
        for start, prompts in _start_groups(pair).items():
            prompt_of = prompts.repeat_interleave(A)
            step_of = torch.arange(A, device=self.device).repeat(len(prompts))
            lo = 0
            while lo < len(prompt_of):
                n_rows = max(1, self.max_batch_tokens // ((T - start) * max(1, H // 2)))
                pi, si = prompt_of[lo: lo + n_rows], step_of[lo: lo + n_rows]
                try:
                    g = self._rows(pair, pi, alphas[si], clean, e_corr, metric, start)
                except Exception as error:  # noqa: BLE001
                    if not is_oom(error) or n_rows == 1:
                        raise
                    self._back_off()
                    continue
                grads[:, start:].index_add_(0, pi, g * weights[si][:, None, None, None])
                lo += len(pi)
        return grads * pair.clean.attention_mask[:, :, None, None]

    def _rows(self, pair, pi, alpha, clean: _Run, e_corr, metric, start: int) -> torch.Tensor:
        """One forward/backward over rows (prompt, alpha) from column `start`: dM/d(input_v) as [R, T - start, V, d]."""
        e_clean = clean.embeds
        R, T, d = len(pi), e_clean.shape[1] - start, e_clean.shape[-1]
        H, L = self.heads, self.lm.num_layers
        # one zero leaf per receiver group: slices of one [R, T, V, d] leaf would each backpropagate
        # into a zero tensor of the full size (2 L + 1 of them per pass)
        leaves = [torch.zeros((R, T, H, d) if i % 2 == 0 and i < 2 * L else (R, T, d), device=self.device,
                              requires_grad=True) for i in range(2 * L + 1)]
        mixed = e_corr[pi, start:] + alpha[:, None, None].to(e_clean.dtype) * (e_clean[pi, start:] - e_corr[pi, start:])
        inputs = self._inputs(pair.clean, pi, start)
        if start:
            prefix = [(k[:, :, :start], v[:, :, :start]) for k, v in clean.kv]
            inputs.update(past_key_values=self._prefix_cache(prefix, pi, repeat=H // prefix[0][0].shape[1]), use_cache=True)
        handle = self.model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: mixed.to(out.dtype))
        try:
            with torch.enable_grad(), autocast(self.precision, self.device), \
                    split_receivers(self.model, self.adapter, _by_group(leaves)), \
                    gather_head_input(self.model, self.adapter, pair.clean.pred_cols[pi] - start):
                logits = self.model(**inputs).logits.to(self.device)
                values = self._metric(logits, pair, pi, metric)
                grads = torch.autograd.grad(values.sum(), leaves)
        finally:
            handle.remove()
        return torch.cat([g if g.dim() == 4 else g.unsqueeze(2) for g in grads], 2).float()

    # ---- patching -----------------------------------------------------------------------
    @torch.no_grad()
    def _patched(self, pair: _Pair, keep: torch.Tensor, metric: str):
        """(M(clean), M(corrupted), M with only `keep`'s edges clean [n]) for a one-prompt pair."""
        clean = self._run_senders(pair.clean, pair, metric)
        corr = self._run_senders(pair.corrupted, pair, metric)
        corrupted_edges = (self._valid & ~keep).float()  # [n, U, V]
        values = []
        T = pair.clean.input_ids.shape[1]
        step = max(1, self.max_batch_tokens // (T * max(1, self.heads // 2)))
        for lo in range(0, len(keep), step):
            values.append(self._patched_rows(pair, corr.outputs[0], corrupted_edges[lo: lo + step], metric))
        return clean.metric[0], corr.metric[0], torch.cat(values)

    def _patched_rows(self, pair, corr_out, corrupted_edges, metric):
        R = len(corrupted_edges)
        H, L = self.heads, self.lm.num_layers
        T, d = corr_out.shape[1:]
        correction = torch.zeros(R, T, self.graph.num_receivers, d, device=self.device)
        offset = [0]

        def sink(kind, layer, out):  # what changed from the corrupted run, sent down the corrupted edges
            out = out.float() if kind == "heads" else out.float().unsqueeze(-2)
            lo = offset[0]
            offset[0] += out.shape[-2]
            diff = out - corr_out[lo: offset[0]].transpose(0, 1)  # [R, T, g, d]
            correction.sub_(torch.einsum("rtgd,rgv->rtvd", diff, corrupted_edges[:, lo: offset[0]]))

        rows = torch.zeros(R, dtype=torch.long, device=self.device)
        with autocast(self.precision, self.device), record_senders(self.model, self.adapter, sink), \
                split_receivers(self.model, self.adapter, _by_group(_groups(correction, H, L))), \
                gather_head_input(self.model, self.adapter, pair.clean.pred_cols[rows]):
            logits = self.model(**self._inputs(pair.clean, rows)).logits.to(self.device)
        return self._metric(logits, pair, rows, metric)


def _by_group(parts: list[torch.Tensor]):
    """extra(kind, layer) for `split_receivers` from one tensor per receiver group, in the
    graph's order: layer l's heads [R, T, heads, d] at 2 l, its MLP [R, T, d] at 2 l + 1, the
    logits [R, T, d] last."""

    def extra(kind, layer):
        return parts[2 * layer] if kind == "heads" else parts[2 * layer + 1] if kind == "mlp" else parts[-1]

    return extra


def _groups(per_receiver: torch.Tensor, heads: int, layers: int) -> list[torch.Tensor]:
    """A [R, T, receivers, d] tensor as `_by_group`'s parts (views)."""
    parts = []
    for layer in range(layers):
        base = layer * (heads + 1)
        parts += [per_receiver[:, :, base: base + heads], per_receiver[:, :, base + heads]]
    return parts + [per_receiver[:, :, -1]]


def _start_groups(pair: _Pair) -> dict[int, torch.Tensor]:
    """{column: the prompts whose clean and corrupted tokens first differ there} (at most the
    first predicting column)."""
    same = pair.clean.input_ids == pair.corrupted.input_ids
    first = torch.where(same.all(1), same.shape[1], (~same).int().argmax(1))
    first = torch.minimum(first, pair.clean.pred_cols[:, 0])
    return {int(c): (first == c).nonzero()[:, 0] for c in first.unique()}


def _batches(ready, size):
    """`runner.batches` over (index, (clean, corrupted, other)) items: same object length per batch."""
    keyed = [(i, encs[0]) for i, encs in ready]
    by_index = dict(ready)
    for chunk in batches(keyed, size):
        yield [(i, by_index[i]) for i, _ in chunk]


def _weights_dtype(model) -> torch.dtype:
    module = getattr(model, "model", model)  # a LoadedModel or the module itself
    return next(module.parameters()).dtype
