"""Hooks that give every receiver node its own copy of the residual stream, and read senders.

EAP-IG needs the gradient of the metric w.r.t. each receiver's input *through that receiver
alone*. MLPs and the logits read the residual through their own norm, so a tensor added at that
norm's input reaches only them. Attention heads share one norm and one q/k/v projection, so
`split_receivers` gives each head its own copy: the attention norm runs on [.., heads, d]
(head h's copy plus what is added to it) and each q/k/v projection is swapped for one that
computes head h's columns from copy h (the same FLOPs as one projection: each head multiplies
its copy by its own rows). Under grouped-query attention, keys and values are then computed
per query head (un-shared), so the gradient through head h's keys is head h's alone; the
attention module is told its groups have size 1. Forward values are unchanged.

The residual stream of a pre-LN block is then the sum of the senders' outputs (plus constant
biases): `record_senders` reads the input embeddings (block 0's input), each head's
contribution z_h W_O,h and each MLP's output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .adapters import Adapter, UnsupportedArchitecture, attention_shape, head_columns, value_matrix
from .hooks import first_arg, with_first_arg


def require_circuits(model: nn.Module, adapter: Adapter) -> str:
    """The residual layout, or a clear error for a family whose stream is not a sum of node outputs."""
    layout = adapter.residual_of(model)
    if layout == "post" or not adapter.qkv:
        raise UnsupportedArchitecture(
            f"circuits need a residual stream that is the sum of what heads and MLPs write (pre-LN blocks); "
            f"{adapter.family} ({model.config.model_type}) normalises it after the sublayers")
    return layout


class _PerHeadProjection(nn.Module):
    """A q/k/v projection whose head-h columns are computed from head h's copy of the normed input."""

    def __init__(self, proj: nn.Module, columns: torch.Tensor, shared: bool, normed: dict, layer: int):
        super().__init__()
        self.proj, self.normed, self.layer, self.shared = proj, normed, layer, shared
        self.columns = columns  # [heads, c]
        self.inverse = None if shared else torch.argsort(columns.flatten())
        self.per_head = None

    def forward(self, _hidden):
        n_rep = self.normed[self.layer]  # [.., heads, d]
        if self.per_head is None:  # gathered once per context (the weights do not change inside it)
            weight = value_matrix(self.proj)  # [out, in] for Linear and Conv1D alike
            cols = self.columns.to(weight.device)
            bias = None if self.proj.bias is None else self.proj.bias[cols]
            self.per_head = (weight[cols], bias)
        weight, bias = self.per_head
        y = torch.einsum("...hd,hcd->...hc", n_rep, weight)
        if bias is not None:
            y = y + bias
        y = y.flatten(-2)  # head-major: [q/k/v columns of head 0, head 1, ...]
        return y if self.shared else y[..., self.inverse.to(y.device)]


@contextlib.contextmanager
def split_receivers(model: nn.Module, adapter: Adapter, extra: Callable[[str, int], torch.Tensor | None]) -> Iterator[None]:
    """Every receiver reads its own copy of the residual stream, plus `extra(kind, layer)`:
    kind "heads" -> [.., T, heads, d] (one per head), "mlp" -> [.., T, d], "logits" -> [.., T, d]
    (layer = number of layers); None adds nothing."""
    require_circuits(model, adapter)
    heads, kv_heads, head_dim = attention_shape(model.config)
    blocks = adapter.blocks(model)
    normed: dict[int, torch.Tensor] = {}
    swapped, groups, handles = [], [], []

    def attn_norm(layer, ln):
        def hook(_m, args, kwargs):
            x = first_arg(args, kwargs)
            add = extra("heads", layer)
            copies = x.unsqueeze(-2).expand(*x.shape[:-1], heads, x.shape[-1])
            normed[layer] = ln.forward(copies if add is None else copies + add.to(x.dtype))
        return hook

    def plus(kind, layer):
        def hook(_m, args, kwargs):
            add = extra(kind, layer)
            return None if add is None else with_first_arg(args, kwargs, first_arg(args, kwargs) + add.to(first_arg(args, kwargs).dtype))
        return hook

    try:
        for layer, block in enumerate(blocks):
            ln = block.get_submodule(adapter.ln_attn)
            handles.append(ln.register_forward_pre_hook(attn_norm(layer, ln), with_kwargs=True))
            handles.append(block.get_submodule(adapter.ln_mlp).register_forward_pre_hook(plus("mlp", layer), with_kwargs=True))
            for path, kind in adapter.qkv:
                parent_path, _, name = path.rpartition(".")
                parent = block.get_submodule(parent_path)
                shared = kind == "kv" and kv_heads < heads
                if shared and (parent, getattr(parent, "num_key_value_groups", None)) not in groups:
                    groups.append((parent, parent.num_key_value_groups))
                proj = getattr(parent, name)
                swapped.append((parent, name, proj))
                setattr(parent, name, _PerHeadProjection(proj, head_columns(kind, heads, kv_heads, head_dim), shared, normed, layer))
        for parent, _ in groups:
            parent.num_key_value_groups = 1  # keys/values come per query head now
        final = model.get_submodule(adapter.final_norm)
        handles.append(final.register_forward_pre_hook(plus("logits", len(blocks)), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for parent, name, proj in swapped:
            setattr(parent, name, proj)
        for parent, value in groups:
            parent.num_key_value_groups = value
        normed.clear()


@contextlib.contextmanager
def record_senders(model: nn.Module, adapter: Adapter, sink: Callable[[str, int, torch.Tensor], None]) -> Iterator[None]:
    """Call `sink(kind, layer, output)` as each sender writes: ("input", -1, [.., T, d]),
    ("heads", l, [.., T, heads, d]: z_h W_O,h without the bias), ("mlp", l, [.., T, d])."""
    heads = attention_shape(model.config)[0]
    blocks = adapter.blocks(model)

    def head_outputs(layer, o_proj):
        def hook(_m, args, kwargs):
            z = first_arg(args, kwargs).unflatten(-1, (heads, -1))
            w = value_matrix(o_proj).unflatten(1, (heads, -1))  # [d, heads, head_dim]
            sink("heads", layer, torch.einsum("...he,dhe->...hd", z, w.to(z.dtype)))
        return hook

    handles = [blocks[0].register_forward_pre_hook(lambda _m, a, k: sink("input", -1, first_arg(a, k)), with_kwargs=True)]
    try:
        for layer in range(len(blocks)):
            o_proj = adapter.attn_out_module(model, layer)
            handles.append(o_proj.register_forward_pre_hook(head_outputs(layer, o_proj), with_kwargs=True))
            handles.append(adapter.ffn_out_module(model, layer).register_forward_hook(
                lambda _m, _a, out, layer=layer: sink("mlp", layer, out)))
        yield
    finally:
        for handle in handles:
            handle.remove()
