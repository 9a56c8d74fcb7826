"""Smoothed attribution: the mean over K noisy copies (SmoothGrad, NoiseGrad, FusionGrad).

With one or two prompts per fact the coarse-to-refined rule has little to intersect, so a
neuron's score rests on one integral. Averaging the attribution over `nt_samples` copies
whose input embeddings carry Gaussian noise (e + stdevs * rms(e) * N(0, 1), per token;
`stdevs` is relative to each token embedding's RMS, so it means the same in every model)
keeps what is stable under small input changes. The names follow captum's NoiseTunnel.

Only the clean pass's embeddings matter: every scaled row starts from that pass's cached
states. The noise comes from a torch.Generator seeded with (nt_seed, copy), so the same
prompts with the same batch settings give the same result.

Weight noise (NoiseGrad; with input noise too, FusionGrad) is `noisegrad`'s: each copy is a
model with noisy weights. The paper's FusionGrad averages an M x N grid (N input draws per
weight draw); here each of the K copies draws both, which estimates the same mean with no more
variance for the same K = M N evaluations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from .noisegrad import WeightNoise, draw, swapped


@contextlib.contextmanager
def embedding_noise(model: torch.nn.Module, stdevs: float, generator: torch.Generator):
    """Add stdevs * rms(e) * N(0, 1) to every token's input embedding e while active."""

    def hook(_module, _args, out):
        noise = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(out.device)
        rms = out.float().pow(2).mean(-1, keepdim=True).sqrt()
        return (out.float() + stdevs * rms * noise).to(out.dtype)

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def smoothed(run: Callable[[list[int]], list], model: torch.nn.Module, layers: list[int], nt_samples: int,
             nt_seed: int, stdevs: float | None = None, weights: WeightNoise | None = None) -> list:
    """Run `run(layers)` once per noisy copy and average the Attributions prompt by prompt.

    `stdevs`: input-embedding noise (None: none); `weights`: weight noise. Where the noised
    weights depend on the scaled layer, each layer runs on its own (the same draw for all).
    """
    groups = [[layer] for layer in layers] if weights is not None and weights.per_layer else [layers]
    copies: list[list[list]] = [[] for _ in groups]
    for k in range(nt_samples):
        noisy = draw(model, weights.sigma, nt_seed, k) if weights is not None else {}
        for group, out in zip(groups, copies):
            with contextlib.ExitStack() as stack:
                if stdevs is not None:
                    generator = torch.Generator().manual_seed(nt_seed * 1_000_003 + k)
                    stack.enter_context(embedding_noise(model, stdevs, generator))
                stack.enter_context(swapped(weights.modules(group[0]) if weights is not None else [], noisy))
                out.append(run(group))
    means = [[mean_attribution(list(same)) for same in zip(*c)] for c in copies]
    return [joined_layers(list(parts)) for parts in zip(*means)]


def joined_layers(parts: list):
    """One Attribution over the layers of `parts` (one prompt, disjoint layers, in order). Each
    layer keeps its own completeness; P, whose model differs by layer, is the mean over them."""
    if len(parts) == 1 or not all(p.ok for p in parts):
        return next((p for p in parts if not p.ok), parts[0])
    out = type(parts[0])(**{**parts[0].__dict__})
    out.layers = tuple(layer for p in parts for layer in p.layers)
    for name in ("scores", "activations", "baseline_prob", "completeness", "evaluations", "score_error"):
        setattr(out, name, np.concatenate([getattr(p, name) for p in parts]))
    out.gold_prob = float(np.mean([p.gold_prob for p in parts]))
    out.top_prob = float(np.mean([p.top_prob for p in parts]))
    out.seconds = float(sum(p.seconds for p in parts))
    return out


def mean_attribution(copies: list):
    """Every numeric field is the mean over the copies (top token: the first copy's);
    evaluations and seconds are totals. Completeness is linear, so it is recomputed exactly."""
    first = copies[0]
    bad = next((c for c in copies if not c.ok), None)
    if bad is not None:
        return bad
    mean = lambda name: np.mean([getattr(c, name) for c in copies], axis=0).astype(np.float32)  # noqa: E731
    out = type(first)(**{**first.__dict__})
    out.scores, out.activations, out.baseline_prob = mean("scores"), mean("activations"), mean("baseline_prob")
    out.gold_prob = float(np.mean([c.gold_prob for c in copies]))
    out.top_prob = float(np.mean([c.top_prob for c in copies]))
    out.completeness = np.abs(out.scores.sum(-1) - (out.gold_prob - out.baseline_prob)).astype(np.float32)
    out.evaluations = np.sum([c.evaluations for c in copies], axis=0).astype(np.int32)
    # the mean's error is at most the mean of the copies' (each relative to its own scores' norm)
    out.score_error = mean("score_error")
    out.seconds = float(sum(c.seconds for c in copies))
    return out
