"""Smoothed attribution (SmoothGrad-style): the mean over K copies with noisy input embeddings.

With one or two prompts per fact the coarse-to-refined rule has little to intersect, so a
neuron's score rests on one integral. Averaging the attribution over `nt_samples` copies
whose input embeddings carry Gaussian noise (e + stdevs * rms(e) * N(0, 1), per token;
`stdevs` is relative to each token embedding's RMS, so it means the same in every model)
keeps what is stable under small input changes. The names follow captum's NoiseTunnel.

Only the clean pass's embeddings matter: every scaled row starts from that pass's cached
states. The noise comes from a torch.Generator seeded with (nt_seed, copy), so the same
prompts with the same batch settings give the same result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch


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


def smoothed(run: Callable[[], list], model: torch.nn.Module, nt_samples: int, stdevs: float, nt_seed: int) -> list:
    """Run `run()` once per noisy copy and average the Attributions prompt by prompt."""
    copies = []
    for k in range(nt_samples):
        generator = torch.Generator().manual_seed(nt_seed * 1_000_003 + k)
        with embedding_noise(model, stdevs, generator):
            copies.append(run())
    return [mean_attribution(list(same)) for same in zip(*copies)]


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
    out.seconds = float(sum(c.seconds for c in copies))
    return out
