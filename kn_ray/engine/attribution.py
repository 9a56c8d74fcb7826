"""Integrated gradients over FFN neurons (or attention heads), computed without redundant work.

For a prompt, layer l and step alpha, the published method runs the whole model forward
and backward on a copy of the prompt whose layer-l activation at the target position is
scaled by alpha. Almost all of that is recomputation. Here:

* one clean pass per batch of prompts caches every block's input, the activations at the
  target position and (causal LMs) the key/value cache of the prompt prefix;
* a scaled row starts at block l from the cached input (blocks below are unchanged);
* causal LMs recompute only the positions from the target on, attending to the cached
  prefix (scaling the last prompt position cannot change earlier positions);
* the LM head sees only the positions that predict the object;
* no parameter gradients: gradients flow only to the scaled activations;
* rows of many (prompt, step) pairs share each forward/backward, sized to memory, and the
  batch shrinks instead of failing on out-of-memory.

The same engine scores attention heads (`site="attn.hook_z"`): the scaled activation is then
the input of the attention output projection, and a head's score is the sum of its head_dim
units' scores (its summed contribution; completeness is unchanged).

The result equals the straightforward computation up to floating-point rounding (the tests
compare against a float64 one-layer-one-step reference).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kn_ray.choices import N_STEPS, POST_NORM, POST_NORMS, RULE, RULES, STDEVS, TOLERANCE, WEIGHT_STDEVS

from .encoding import Batch
from .adapters import attention_shape
from .hooks import (edit_site, first_arg, gather_head_input, norm_rms, output_hook, pre_hooks,
                    recompute_offloaded_blocks, start_at_layer)
from .precision import autocast
from .quadrature import AUTO, quadrature
from .adaptive import FIRST_LEVEL, integrate_adaptive
from .noisegrad import WeightNoise, check_noise, execution_order, modules_from
from .smoothing import smoothed
from .model_runner import ModelRunner, batches, describe, gold_prob, is_oom


@dataclass
class Attribution:
    """Integrated-gradients result for one (prompt, target)."""

    prompt: str
    target: str
    status: str = "ok"  # ok | skipped | error
    reason: str | None = None
    target_ids: tuple[int, ...] = ()
    gold_prob: float = math.nan  # P(target | prompt); the product over the target's tokens
    top_token: str | None = None  # the model's top prediction at the target position
    top_prob: float = math.nan
    layers: tuple[int, ...] = ()
    scores: np.ndarray | None = None  # [len(layers), neurons (or heads)] float32
    activations: np.ndarray | None = None  # [len(layers), neurons] clean activations at the target (heads: |z_h|)
    baseline_prob: np.ndarray | None = None  # [len(layers)] P with that layer's activation at the baseline
    completeness: np.ndarray | None = None  # [len(layers)] |sum(scores) - (P - P_baseline)|
    evaluations: np.ndarray | None = None  # [len(layers)] forward/backward rows spent per layer (quadrature nodes)
    # [len(layers)] n_steps="auto": the estimated relative L2 error of each layer's scores (`adaptive`); else NaN
    score_error: np.ndarray | None = None
    seconds: float = 0.0
    site: str = "mlp.hook_post"  # the attributed site (adapters.SITES): neurons or "attn.hook_z" heads

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def max_score(self) -> float:
        return float(self.scores.max()) if self.scores is not None and self.scores.size else math.nan

    def top_neurons(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The k highest-scoring (layer, neuron or head, score) triples."""
        if self.scores is None:
            return []
        flat = np.argsort(self.scores, axis=None)[::-1][:k]
        rows, cols = np.unravel_index(flat, self.scores.shape)
        return [(self.layers[r], int(c), float(self.scores[r, c])) for r, c in zip(rows, cols)]


@dataclass
class _Clean:
    gold_prob: torch.Tensor  # [B]
    top_ids: torch.Tensor  # [B]
    top_prob: torch.Tensor  # [B]
    hidden_in: dict[int, torch.Tensor]  # layer -> [B, T - start_col, d] block input
    acts: dict[int, torch.Tensor]  # layer -> [B, neurons] fp32 activation at the target
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer prefix keys/values [B, H, start_col, dh]
    ffn_rms: dict[int, torch.Tensor]  # layer -> [B] fp32 clean RMS of the FFN output at the target (frozen post-norm)


ATTRIBUTED_SITES = ("mlp.hook_post", "attn.hook_z")


class Attributor(ModelRunner):
    """Integrated gradients of the gold object's probability w.r.t. FFN neurons (or heads).

    >>> attr = Attributor(load_model("smollm2"))
    >>> [res] = attr.attribute(["The capital of France is"], [" Paris"], n_steps=20)
    >>> res.top_neurons(5)
    """

    _site = "mlp.hook_post"  # what `attribute` scores (ATTRIBUTED_SITES)
    _post_norm = POST_NORM  # POST_NORMS: how a post-FFN norm (adapter.post_ffn_norm) behaves along the path

    @property
    def _frozen_norm(self) -> bool:
        """True if the scaled rows hold the post-FFN norm's clean RMS fixed at the target."""
        return self._post_norm == "frozen" and self._site == "mlp.hook_post" and bool(self.adapter.post_ffn_norm)

    @property
    def _width(self) -> int:
        """Units per layer of the attributed site."""
        return self.adapter.site_width(self.model, self._site)

    # ---- public API -------------------------------------------------------------------
    def attribute(
        self,
        prompts: str | Sequence[str],
        targets: str | Sequence[str],
        *,
        n_steps: int | str = N_STEPS,
        rule: str = RULE,
        tolerance: float = TOLERANCE,
        layers: Sequence[int] | None = None,
        baselines: float = 0.0,
        nt_samples: int = 0,
        stdevs: float = STDEVS,
        nt_seed: int = 0,
        site: str = "mlp.hook_post",
        noise: str = "input",
        weight_stdevs: float = WEIGHT_STDEVS,
        noised_weights: str = "all",
        post_norm: str = POST_NORM,
        progress: Callable[[int], None] | None = None,
    ) -> list[Attribution]:
        """Score every neuron of `layers` (default: all) for each (prompt, target).

        Score_i = (a_i - b) * sum_k w_k dP/dx_i at x = b + alpha_k (a - b), the quadrature rule
        `rule` (see `quadrature`) over `n_steps` steps; b = `baselines` (the paper: 0).
        `n_steps="auto"` (the default): per prompt and layer, Romberg on nested trapezoid rules,
        doubled until the layer's estimated relative score error <= `tolerance` and its completeness
        residual <= `tolerance` x |P - P(layer at baseline)| (`adaptive`; `score_error` reports the
        estimate). `n_steps=20, rule="left"` is the paper's Riemann sum.
        `nt_samples` > 0: the mean over that many copies with noisy input embeddings, noise
        `stdevs` x each embedding's RMS, seeded by `nt_seed` (`smoothing`). `noise`: what the
        copies perturb: `input` (SmoothGrad), `weights` (NoiseGrad: each weight x N(1,
        `weight_stdevs`), the `noised_weights` `all`, or `above`: from the scaled layer's block up;
        `noisegrad`) or `both` (FusionGrad).
        `site="attn.hook_z"`: score every attention head instead (the sum over its units).
        `post_norm`: where the family normalises the FFN output before the residual add (Gemma 2/3,
        OLMo 2: `adapter.post_ffn_norm`), `frozen` holds that norm's clean RMS fixed at the target
        along the path, so the normed output is alpha x its clean value (linear in the neurons);
        `live` recomputes it (the output then hardly moves until alpha ~ 0; docs/quadrature.md).
        """
        if site not in ATTRIBUTED_SITES:
            raise ValueError(f"site must be one of {ATTRIBUTED_SITES}, got {site!r}")
        if rule not in RULES:  # checked even where n_steps="auto" ignores it
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if post_norm not in POST_NORMS:
            raise ValueError(f"post_norm must be one of {POST_NORMS}, got {post_norm!r}")
        self._site, self._post_norm = site, post_norm
        if nt_samples:
            if nt_samples < 1 or stdevs < 0:
                raise ValueError(f"nt_samples must be >= 1 and stdevs >= 0, got {nt_samples}, {stdevs}")
            check_noise(noise, noised_weights, weight_stdevs)
            results = smoothed(lambda group: self.attribute(prompts, targets, n_steps=n_steps, rule=rule,
                                                            tolerance=tolerance, layers=group, baselines=baselines,
                                                            site=site, post_norm=post_norm),
                               self.model, self._check_layers(layers), nt_samples, nt_seed,
                               stdevs=None if noise == "weights" else stdevs,
                               weights=None if noise == "input" else self._weight_noise(weight_stdevs, noised_weights))
            if progress:
                progress(len(results))
            return results
        if n_steps == AUTO:
            if not tolerance > 0:
                raise ValueError(f"tolerance must be > 0, got {tolerance}")
            rule = None  # no fixed rule: doubled per (prompt, layer) until `tolerance` holds
        else:
            rule = quadrature(n_steps, rule)
        layers = self._check_layers(layers)
        prompts, targets, ready, skipped = self._prepare(prompts, targets)
        results: list[Attribution | None] = [None] * len(prompts)
        for i, reason in skipped.items():
            results[i] = Attribution(prompts[i], targets[i], status="skipped", reason=reason)
        rows = 2**FIRST_LEVEL + 1 if rule is None else len(rule[0]) + 1  # per prompt and layer (+ P(baseline))
        for chunk in batches(ready, self.batch_size(rows, suffix_rows=not self.adapter.masked)):
            for i, res in self._attribute_safely(chunk, prompts, targets, rule, tolerance, layers, baselines):
                results[i] = res
            if progress:
                progress(len(chunk))
        if progress and skipped:
            progress(len(skipped))
        return results  # type: ignore[return-value]

    def _weight_noise(self, sigma: float, noised_weights: str) -> WeightNoise:
        if self.lm.offloaded:
            raise ValueError("weight noise needs every weight in memory; this model offloads some (CPU or disk)")
        if noised_weights == "all":
            every = list(self.model.modules())
            return WeightNoise(sigma, lambda _layer: every, per_layer=False)
        order = execution_order(self.model, torch.full((1, 2), self.pad_id, device=self.device))
        blocks = self.adapter.blocks(self.model)
        return WeightNoise(sigma, lambda layer: modules_from(order, blocks[layer]), per_layer=True)

    # ---- batches ----------------------------------------------------------------------
    def _attribute_safely(self, chunk, prompts, targets, rule, tolerance, layers, baseline):
        """Run a batch; if it fails, run its prompts one by one so a bad prompt is one error row."""
        start = time.perf_counter()
        try:
            outs = self._attribute_batch([e for _, e in chunk], rule, tolerance, layers, baseline)
        except Exception as error:  # noqa: BLE001 - isolated and reported per prompt below
            if len(chunk) == 1:
                i, enc = chunk[0]
                return [(i, Attribution(prompts[i], targets[i], status="error", reason=describe(error), target_ids=enc.object_ids))]
            warnings.warn(f"kn-ray: a batch of {len(chunk)} prompts failed ({describe(error)}); retrying them one by one")
            return [pair for item in chunk
                    for pair in self._attribute_safely([item], prompts, targets, rule, tolerance, layers, baseline)]
        seconds = (time.perf_counter() - start) / len(chunk)
        done = []
        for (i, enc), out in zip(chunk, outs):
            done.append((i, Attribution(prompts[i], targets[i], target_ids=enc.object_ids, layers=tuple(layers),
                                        seconds=seconds, site=self._site, **out)))
        return done

    def _attribute_batch(self, encs, rule, tolerance, layers, baseline) -> list[dict]:
        """`rule`: a fixed rule's (alphas, weights); None: adaptive to `tolerance` (n_steps="auto")."""
        batch = self._collate(encs)
        clean = self._clean_pass(batch, set(layers))
        adaptive = rule is None
        alphas, weights = rule or (None, None)
        if not adaptive and not bool((alphas == 0).any()):  # P(baseline) for completeness: one extra row
            alphas, weights = torch.cat([alphas, alphas.new_zeros(1)]), torch.cat([weights, weights.new_zeros(1)])
        if not adaptive:
            zero_step = int((alphas == 0).nonzero()[0])  # alphas live on the host: no device sync
            alphas, weights = alphas.float().to(self.device), weights.float().to(self.device)
        acts_d = torch.stack([clean.acts[layer] for layer in layers], 1)  # [B, L, F]
        if adaptive:  # every layer at once: open (prompt, layer) pairs share passes (`pass_plan`)
            grad_d, base_d, evaluations, error_d = integrate_adaptive(self, batch, clean, layers, baseline, tolerance)
        else:
            sums = [self._integrate(batch, clean, layer, alphas, weights, zero_step, baseline) for layer in layers]
            grad_d, base_d = torch.stack([g for g, _ in sums], 1), torch.stack([p for _, p in sums], 1)
            evaluations = torch.full((batch.size, len(layers)), len(alphas), dtype=torch.int32)
            error_d = torch.full((batch.size, len(layers)), float("nan"), device=self.device)
        scores_d = (acts_d - baseline) * grad_d  # everything stays on the device; one copy to the host per batch
        completeness_d = (scores_d.sum(-1) - (clean.gold_prob[:, None] - base_d)).abs()
        if self._site == "attn.hook_z":  # a head's score: the sum over its units
            heads = attention_shape(self.model.config)[0]
            scores_d = scores_d.unflatten(-1, (heads, -1)).sum(-1)
            acts_d = acts_d.unflatten(-1, (heads, -1)).norm(dim=-1)
        scores, acts, base_prob, completeness, gold, top_prob, score_error = (
            t.cpu() for t in (scores_d, acts_d, base_d, completeness_d, clean.gold_prob, clean.top_prob, error_d))
        tops = self.token_texts(clean.top_ids.tolist())
        return [
            dict(
                gold_prob=float(gold[b]),
                top_token=tops[b],
                top_prob=float(top_prob[b]),
                scores=scores[b].numpy(),
                activations=acts[b].numpy(),
                baseline_prob=base_prob[b].numpy(),
                completeness=completeness[b].numpy(),
                evaluations=evaluations[b].numpy(),
                score_error=score_error[b].numpy(),
            )
            for b in range(batch.size)
        ]

    @torch.no_grad()
    def _clean_pass(self, batch: Batch, layers: set[int]) -> _Clean:
        model, adapter, sc = self.model, self.adapter, batch.start_col
        rows = torch.arange(batch.size, device=self.device)
        hidden_in: dict[int, torch.Tensor] = {}
        acts: dict[int, torch.Tensor] = {}

        def save_hidden(i, args, kwargs):  # kept on the block's device (a device map spreads them)
            if i in layers:
                hidden_in[i] = first_arg(args, kwargs)[:, sc:].detach()

        def save_act(i, args, kwargs):  # gathered on the input device, in fp32
            inputs = first_arg(args, kwargs)
            acts[i] = inputs[rows.to(inputs.device), batch.target_col.to(inputs.device)].float().to(self.device)

        ffn_rms: dict[int, torch.Tensor] = {}
        norms = [adapter.post_ffn_norm_module(model, i) for i in sorted(layers)] if self._frozen_norm else []

        def save_rms(k, args, kwargs):  # the clean RMS the frozen path divides by
            inputs = first_arg(args, kwargs)
            at = inputs[rows.to(inputs.device), batch.target_col.to(inputs.device)]
            ffn_rms[sorted(layers)[k]] = norm_rms(norms[k], at).to(self.device)

        sites = [adapter.site_module(model, self._site, i)[0] for i in range(self.lm.num_layers)]
        with (
            autocast(self.precision, self.device),
            pre_hooks(list(adapter.blocks(model)), save_hidden),
            pre_hooks(sites, save_act),
            pre_hooks(norms, save_rms),
            gather_head_input(model, adapter, batch.pred_cols),
        ):
            out = model(**self._inputs(batch, rows, 0), **self._full_cache())
        logits = out.logits.to(self.device)
        gold = gold_prob(logits, batch.gold_ids, batch.gold_valid)
        top_prob, top_ids = logits[:, 0].float().softmax(-1).max(-1)
        kv = None
        if not adapter.masked and sc > 0:
            kv = [(lay.keys[:, :, :sc], lay.values[:, :, :sc]) for lay in out.past_key_values.layers]
        return _Clean(gold, top_ids, top_prob, hidden_in, acts, kv, ffn_rms)

    # ---- one layer ----------------------------------------------------------------------
    def _integrate(self, batch, clean, layer, alphas, weights, zero_step, baseline):
        """sum_k w_k dP/dx(alpha_k) [B, F] (weights [A, K]: [B, K, F]) for every prompt of the batch at
        `layer`, and P at alpha = 0 (step `zero_step`) [B]."""
        B, A, dev = batch.size, len(alphas), self.device
        prompt_of = torch.arange(B, device=dev).repeat_interleave(A)
        step_of = torch.arange(A, device=dev).repeat(B)
        w = weights[step_of]
        sums, probs = self._integrate_rows(batch, clean, prompt_of, layer, alphas[step_of],
                                           w if w.dim() == 2 else w[:, None], prompt_of, B, baseline)
        return sums if weights.dim() == 2 else sums[:, 0], probs.view(B, A)[:, zero_step]

    def _integrate_rows(self, batch, clean, prompt_of, layer_of, alpha_of, weight_of, out_of, n_out, baseline):
        """Rows r = (prompt_of[r], layer_of[r], alpha_of[r]): sum over the rows of output o of
        weight_of[r] [K] x dP/dx [n_out, K, F], and every row's P [R], accumulated on the device (no
        host synchronisation inside the row loop). `layer_of`: one layer, or a host tensor per row,
        sorted: a pass of rows of several layers starts at the lowest of them (`_rows`)."""
        R, dev = len(prompt_of), self.device
        sums = torch.zeros(n_out, weight_of.shape[1], self._width, dtype=torch.float32, device=dev)
        probs = torch.zeros(R, dtype=torch.float32, device=dev)
        tokens_per_row = batch.input_ids.shape[1] - batch.start_col
        lo = 0
        while lo < R:
            n_rows = max(1, self.max_batch_tokens // tokens_per_row)
            part = slice(lo, lo + n_rows)
            pi, layer = prompt_of[part], layer_of if isinstance(layer_of, int) else layer_of[part]
            try:
                grads, p = self._rows(batch, clean, layer, pi, alpha_of[part], baseline)
            except Exception as error:  # noqa: BLE001
                if not is_oom(error) or n_rows == 1:
                    raise
                self._back_off()
                continue
            sums.index_add_(0, out_of[part], grads[:, None, :] * weight_of[part][:, :, None])
            probs[part] = p.float()
            lo += len(pi)
        return sums, probs

    def _rows(self, batch, clean, layer, prompt_idx, alpha, baseline):
        """One forward/backward over rows (prompt, alpha) scaled at `layer` (an int, or a host tensor
        of one layer per row).

        Rows of several layers start together at the lowest, L0: a row of a higher layer recomputes
        the clean blocks between (its clean state, up to rounding) and each layer's site edit
        touches only its own rows. Every index follows the tensor it indexes to its device: under a
        device map the cached block inputs, the prefix cache and the neurons of a layer may each
        live elsewhere.
        """
        dev = self.device
        pi, alpha = prompt_idx.to(dev), alpha.to(dev)
        sc = batch.start_col
        n = len(pi)
        groups = _layer_rows(layer, n)
        start = min(groups)
        a = torch.empty(n, self._width, dtype=torch.float32, device=dev)
        for lay, rows in groups.items():
            a[rows.to(dev)] = clean.acts[lay][pi[rows.to(dev)]]
        x = (baseline + alpha[:, None] * (a - baseline)).requires_grad_(True)
        target = batch.target_col[pi] - sc

        def put(rows: torch.Tensor):
            def edit(inputs: torch.Tensor) -> torch.Tensor:
                d = inputs.device
                r = rows.to(d)
                return inputs.index_put((r, target.to(d)[r]), x[rows.to(x.device)].to(d, inputs.dtype))

            return edit

        def frozen(lay: int, rows: torch.Tensor):  # the post-FFN norm with the clean RMS at the target
            norm = self.adapter.post_ffn_norm_module(self.model, lay)
            clean_rms = clean.ffn_rms[lay][pi[rows.to(dev)]]

            def fn(inputs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
                d = out.device
                r = rows.to(d)
                t = target.to(d)[r]
                # norm(y) x rms(y) / rms_clean = gain x y / rms_clean, linear in y (rms(0) = sqrt(eps) > 0)
                scale = (norm_rms(norm, inputs[r, t]) / clean_rms.to(d))[:, None]
                return out.index_put((r, t), (out[r, t].float() * scale).to(out.dtype))

            return output_hook(norm, fn)

        hidden = clean.hidden_in[start]
        inputs = self._inputs(batch, pi, sc)
        if clean.kv is not None:
            inputs.update(past_key_values=self._prefix_cache(clean.kv, pi, start), use_cache=True)
        with contextlib.ExitStack() as stack:
            for lay, rows in groups.items():
                stack.enter_context(edit_site(self.model, self.adapter, self._site, lay, put(rows)))
                if self._frozen_norm:
                    stack.enter_context(frozen(lay, rows))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(autocast(self.precision, dev))
            stack.enter_context(start_at_layer(self.model, self.adapter, start, hidden[pi.to(hidden.device)]))
            stack.enter_context(gather_head_input(self.model, self.adapter, batch.pred_cols[pi] - sc))
            stack.enter_context(recompute_offloaded_blocks(self.model, self.adapter, start,
                                                           inputs.get("past_key_values")))
            logits = self.model(**inputs).logits.to(dev)
            prob = gold_prob(logits, batch.gold_ids[pi], batch.gold_valid[pi])
            (grad,) = torch.autograd.grad(prob.sum(), x)
        return grad.float(), prob.detach()

def _layer_rows(layer, n: int) -> dict[int, torch.Tensor]:
    """{layer: host indices of its rows} for `_rows`' `layer` (one int for all n rows, or one per row)."""
    if isinstance(layer, int):
        return {layer: torch.arange(n)}
    return {int(lay): (layer == lay).nonzero()[:, 0] for lay in layer.unique()}
