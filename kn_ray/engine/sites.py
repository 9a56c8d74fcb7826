"""Read named sites during a forward pass, like TransformerLens's `run_with_cache`.

A name is a site of `adapters.SITES`, prefixed by `blocks.L.` for per-block sites:
`hook_embed`, `blocks.3.attn.hook_z` ([batch, positions, heads, head_dim]),
`blocks.3.hook_attn_out`, `blocks.3.mlp.hook_post`, `blocks.3.hook_mlp_out`,
`blocks.3.hook_resid_pre`, `logits`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from .adapters import SITES, Adapter, attention_shape
from .hooks import first_arg

_NAME = re.compile(r"^(?:blocks\.(\d+)\.)?(.+)$")


def parse_site(name: str) -> tuple[str, int | None]:
    """`blocks.3.attn.hook_z` -> ("attn.hook_z", 3); `logits` -> ("logits", None)."""
    match = _NAME.match(name)
    layer, site = (int(match[1]) if match[1] else None), match[2]
    if site not in SITES or (layer is None) != (site in ("hook_embed", "logits")):
        raise ValueError(f"bad site name {name!r}: want hook_embed, logits or blocks.L.<site> with <site> in {SITES[1:-1]}")
    return site, layer


def site_names(adapter: Adapter, model: nn.Module) -> list[str]:
    """Every site name of a model, in forward order."""
    per_block = [s for s in SITES if s not in ("hook_embed", "logits")]
    blocks = [f"blocks.{layer}.{s}" for layer in range(adapter.num_layers(model)) for s in per_block]
    return ["hook_embed", *blocks, "logits"]


@contextlib.contextmanager
def capture(model: nn.Module, adapter: Adapter, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Fill the yielded dict with each named site's value (detached) during forwards run inside."""
    cache: dict[str, torch.Tensor] = {}
    heads = attention_shape(model.config)[0]
    handles = []
    for name in names:
        site, layer = parse_site(name)
        module, side = adapter.site_module(model, site, layer)

        def keep(value, name=name, site=site):
            value = value.detach()
            cache[name] = value.unflatten(-1, (heads, -1)) if site == "attn.hook_z" else value

        if side == "input":
            handles.append(module.register_forward_pre_hook(
                lambda _m, a, k, keep=keep: keep(first_arg(a, k)), with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(
                lambda _m, _a, out, keep=keep: keep(out[0] if isinstance(out, tuple) else out)))
    try:
        yield cache
    finally:
        for handle in handles:
            handle.remove()
