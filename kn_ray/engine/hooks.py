"""Forward hooks that read and rewrite a model in place, each scoped by a context manager.

They work on any family through its Adapter: block inputs (the residual stream), FFN
output-projection inputs (the neurons) and LM-head inputs (the predicting positions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from .adapters import Adapter


def first_arg(args: tuple, kwargs: dict, name: str = "hidden_states") -> torch.Tensor:
    return args[0] if args else kwargs[name]


def with_first_arg(args: tuple, kwargs: dict, value: torch.Tensor, name: str = "hidden_states"):
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, name: value}


@contextlib.contextmanager
def pre_hooks(modules: list[nn.Module], fn: Callable) -> Iterator[None]:
    """Register `fn(index, args, kwargs) -> (args, kwargs) | None` as a pre-hook on each module."""
    handles = [
        module.register_forward_pre_hook(lambda _m, a, k, i=i: fn(i, a, k), with_kwargs=True)
        for i, module in enumerate(modules)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def post_hooks(modules: list[nn.Module], fn: Callable) -> Iterator[None]:
    """Register `fn(index, output) -> output | None` as a forward hook on each module."""
    handles = [module.register_forward_hook(lambda _m, _a, out, i=i: fn(i, out)) for i, module in enumerate(modules)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def first_output(output) -> torch.Tensor:
    """A module's hidden-state output: the tensor itself, or the first item of a tuple (older blocks)."""
    return output[0] if isinstance(output, tuple) else output


def with_first_output(output, value: torch.Tensor):
    return (value, *output[1:]) if isinstance(output, tuple) else value


def gather_head_input(model: nn.Module, adapter: Adapter, cols: torch.Tensor):
    """Feed the LM head only the predicting columns `cols` [R, K] (saves V x d per skipped position)."""

    def fn(_i, args, kwargs):
        hidden = first_arg(args, kwargs)
        index = cols.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])
        return with_first_arg(args, kwargs, hidden.gather(1, index))

    return pre_hooks([adapter.head_module(model)], fn)


def edit_neurons(model: nn.Module, adapter: Adapter, layer: int, edit: Callable[[torch.Tensor], torch.Tensor]):
    """Rewrite the input of `layer`'s FFN output projection with `edit(inputs) -> inputs`."""
    return edit_site(model, adapter, "mlp.hook_post", layer, edit)


def edit_site(model: nn.Module, adapter: Adapter, site: str, layer: int, edit: Callable[[torch.Tensor], torch.Tensor]):
    """Rewrite a site read at a module's input (neurons, heads, a block's input) with `edit`."""
    module, side = adapter.site_module(model, site, layer)
    if side != "input":
        raise ValueError(f"edit_site rewrites input sites; {site!r} is an output")

    def fn(_i, args, kwargs):
        return with_first_arg(args, kwargs, edit(first_arg(args, kwargs)))

    return pre_hooks([module], fn)


class _Passthrough(nn.Module):
    """Stands in for a block whose output is already known: returns its input unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def start_at_layer(model: nn.Module, adapter: Adapter, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Run the model from block `layer` on, with `hidden` as that block's input.

    Blocks below are swapped for pass-throughs (their outputs are the cached clean states, so
    computing them again would be waste); layer indices, masks and caches keep their meaning.
    """
    blocks = adapter.blocks(model)
    originals = [blocks[i] for i in range(layer)]
    skip = _Passthrough()
    try:
        for i in range(layer):
            blocks[i] = skip
        with pre_hooks([blocks[layer]], lambda _i, a, k: with_first_arg(a, k, hidden)):
            yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


def offloaded(module: nn.Module) -> bool:
    """True if Accelerate keeps some of the module's weights off its execution device (CPU or disk)."""
    return any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in module.modules())


class _Recomputed(nn.Module):
    """Runs a block under activation checkpointing: its forward keeps no tensors for backward,
    which recomputes the block (Accelerate reloads its offloaded weights then). Without it, the
    autograd graph would hold every offloaded block's weights until the backward pass ends.

    The recomputation sees the key/value cache as the first run did (the block appended its
    keys to it; they are rolled back before the block runs again).
    """

    def __init__(self, block: nn.Module, cache):
        super().__init__()
        self.block, self.cache = block, cache

    def forward(self, *args, **kwargs):
        layers = getattr(self.cache, "layers", None) or []
        saved = [(layer.keys, layer.values, layer.is_initialized) for layer in layers]

        def run(*inputs):
            for layer, (keys, values, ready) in zip(layers, saved):
                layer.keys, layer.values, layer.is_initialized = keys, values, ready
            return self.block(*inputs, **kwargs)

        # no early stop: recomputation runs the whole block, so Accelerate's post-forward hooks
        # return every reloaded weight to disk/`meta` (an early stop would leave the block's last
        # layer holding its weights after backward)
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


@contextlib.contextmanager
def recompute_offloaded_blocks(model: nn.Module, adapter: Adapter, layer: int, cache=None) -> Iterator[None]:
    """From block `layer` on, checkpoint every offloaded block (see `_Recomputed`); peak memory
    then holds one offloaded block's weights at a time, not all of them."""
    blocks = adapter.blocks(model)
    wrapped = {i: blocks[i] for i in range(layer, len(blocks)) if offloaded(blocks[i])}
    try:
        for i, block in wrapped.items():
            blocks[i] = _Recomputed(block, cache)
        yield
    finally:
        for i, block in wrapped.items():
            blocks[i] = block


def norm_rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """sqrt(mean(x^2) + eps) over the last dimension, in fp32: what an RMSNorm divides by (its eps
    is `eps` in Gemma, `variance_epsilon` in Llama-style norms)."""
    eps = getattr(norm, "eps", None)
    eps = norm.variance_epsilon if eps is None else eps
    return (x.float().pow(2).mean(-1) + eps).sqrt()


@contextlib.contextmanager
def output_hook(module: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace `module`'s output with `fn(its first input, output)` while active."""
    handle = module.register_forward_hook(lambda _m, args, kwargs, out: fn(first_arg(args, kwargs), out),
                                          with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
