"""NoiseGrad (Bykov et al., AAAI 2022): attribution averaged over models with noisy weights.

Each of the K draws multiplies every noised weight by its own N(1, sigma) factor,
w * (1 + sigma * N(0, 1)) (the reference code: every parameter, sigma 0.2, n = 10), and the
attribution of the draw is that of the noisy model; the result is the mean over draws.
FusionGrad also adds SmoothGrad's input noise (`smoothing`) to each draw.

The stored weights are never touched: a draw swaps each noised parameter slot for a fresh
noisy copy and puts the original Parameter object back afterwards, so nothing compounds (the
reference code's in-place `mul_` with a `state_dict()` "backup" restores from views of the
same tensors). A draw's noise for a parameter comes from a generator seeded by (seed, draw,
the parameter's name): it is the same in every batch, shard and worker, and the same whichever
subset of the weights is noised.

Which weights (`noised_weights`): `all` (the reference), or `above`, the modules that run from
the scaled layer's block on (that block, the blocks above, the final norm, the LM head), found
by the order in which one forward pass calls them; the embeddings and the blocks below then
stay clean, so the noise perturbs only the function through which the scaled layer reaches P.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kn_ray.choices import NOISE, NOISED_WEIGHTS



def draw(model: nn.Module, sigma: float, seed: int, k: int) -> dict[int, torch.Tensor]:
    """Draw k's noisy copy of every parameter, keyed by the parameter's id (tied weights share one)."""
    out = {}
    for name, param in model.named_parameters():  # each shared parameter once, under its first name
        digest = hashlib.blake2b(f"{seed}/{k}/{name}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        factor = torch.empty(param.shape, dtype=torch.float32).normal_(1.0, sigma, generator=generator)
        noisy = factor.to(param.device).mul_(param) if param.dtype == torch.float32 else param.float() * factor.to(param.device)
        out[id(param)] = nn.Parameter(noisy.to(param.dtype), requires_grad=False)
    return out


@contextlib.contextmanager
def swapped(modules: list[nn.Module], noisy: dict[int, torch.Tensor]) -> Iterator[None]:
    """While active, each parameter slot of `modules` holds its noisy copy; the originals come back after."""
    done = []
    try:
        for module in modules:
            for name, param in list(module._parameters.items()):
                if param is not None and id(param) in noisy:
                    module._parameters[name] = noisy[id(param)]
                    done.append((module, name, param))
        yield
    finally:
        for module, name, param in reversed(done):
            module._parameters[name] = param


def execution_order(model: nn.Module, input_ids: torch.Tensor) -> dict[nn.Module, int]:
    """Each module's rank in the order one forward pass first calls it (modules never called: absent)."""
    order: dict[nn.Module, int] = {}

    def seen(module, _args) -> None:
        order.setdefault(module, len(order))

    handles = [m.register_forward_pre_hook(seen) for m in model.modules()]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return order


def modules_from(order: dict[nn.Module, int], block: nn.Module) -> list[nn.Module]:
    """The modules the forward pass calls from `block` on: that block's, those above, the final norm and head."""
    return [m for m, rank in order.items() if rank >= order[block]]


def check_noise(noise: str, noised_weights: str, weight_stdevs: float) -> None:
    if noise not in NOISE:
        raise ValueError(f"noise must be one of {', '.join(NOISE)}, got {noise!r}")
    if noised_weights not in NOISED_WEIGHTS:
        raise ValueError(f"noised_weights must be one of {', '.join(NOISED_WEIGHTS)}, got {noised_weights!r}")
    if not weight_stdevs >= 0:
        raise ValueError(f"weight_stdevs must be >= 0, got {weight_stdevs}")


@dataclass(frozen=True)
class WeightNoise:
    """N(1, sigma) on the weights of `modules(layer)`, the modules noised while `layer` is scaled;
    `per_layer`: they depend on the layer (`above`), so each layer runs on its own."""

    sigma: float
    modules: Callable[[int], list[nn.Module]]
    per_layer: bool
