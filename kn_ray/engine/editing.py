"""Value-slot edits: neuron i of a layer writes column i of the FFN output projection
(its "value slot") into the residual stream. Updating or erasing a fact edits those columns.

Edits change the loaded model in memory only (never the cached checkpoint); `edited()`
restores the exact original columns on exit, and `save_model` writes an edited copy.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .adapters import value_matrix
from .loading import LoadedModel, input_device


def value_slot(lm: LoadedModel, layer: int, neuron: int) -> torch.Tensor:
    """A writable view of neuron `neuron`'s value slot in `layer`: shape [hidden]."""
    module = lm.adapter.ffn_out_module(lm.model, layer)
    return value_matrix(module, resident_weight(module, writable=True))[:, neuron]


def resident_weight(module: torch.nn.Module, *, writable: bool = False) -> torch.Tensor:
    """A module's weight in memory, also where Accelerate offloaded it (its parameter then sits
    on `meta`): read from the offload, or, `writable`, copied into the offload loader's
    in-memory state dict, which Accelerate reads before the disk files, so edits reach every
    later forward pass."""
    if module.weight.device.type != "meta":
        return module.weight
    weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    loader = getattr(weights, "dataset", None)
    if loader is None or not hasattr(loader, "state_dict"):
        raise NotImplementedError(f"{type(module).__name__}'s weights are neither in memory nor in Accelerate's "
                                  "offload; load the model without this device map")
    key = weights.prefix + "weight"
    if key not in loader.state_dict:
        if not writable:
            return weights["weight"]
        loader.state_dict[key] = weights["weight"].clone()
    return loader.state_dict[key]


@torch.no_grad()
def word_embedding(lm: LoadedModel, token_ids: Sequence[int]) -> torch.Tensor:
    """The input embedding of a word as the model reads it: the mean over its token ids (one id
    for single-token words), through the embedding module (Gemma scales its table by sqrt(hidden))."""
    embed = lm.model.get_input_embeddings()
    ids = torch.as_tensor(list(token_ids), device=input_device(lm.model))
    return embed(ids).float().mean(0)


@torch.no_grad()
def add_to_value_slots(lm: LoadedModel, slots: Sequence[tuple[int, int]], delta: torch.Tensor) -> None:
    """v += delta for every (layer, neuron) in `slots` (delta: [hidden], or [len(slots), hidden])."""
    delta = delta if delta.dim() == 2 else delta.expand(len(slots), -1)
    for (layer, neuron), d in zip(slots, delta):
        slot = value_slot(lm, layer, neuron)
        slot += d.to(slot.dtype)


@torch.no_grad()
def set_value_slots(lm: LoadedModel, slots: Sequence[tuple[int, int]], value: torch.Tensor | float) -> None:
    """v = value for every slot (0 erases; a [hidden] vector sets, e.g. the unknown token's embedding)."""
    for layer, neuron in slots:
        slot = value_slot(lm, layer, neuron)
        slot.copy_(torch.as_tensor(value, dtype=slot.dtype, device=slot.device).expand_as(slot))


@contextlib.contextmanager
def edited(lm: LoadedModel, slots: Sequence[tuple[int, int]]) -> Iterator[LoadedModel]:
    """Within the block, edit `slots` freely; on exit their exact original values come back."""
    saved = {(layer, neuron): value_slot(lm, layer, neuron).clone() for layer, neuron in set(slots)}
    try:
        yield lm
    finally:
        with torch.no_grad():
            for (layer, neuron), original in saved.items():
                value_slot(lm, layer, neuron).copy_(original)


LICENCE_FILES = ("NOTICE", "GEMMA_TERMS.html", "LICENSE", "LICENCE")


def save_model(lm: LoadedModel, directory: str | Path) -> Path:
    """Save the (edited) model and tokenizer as a safetensors checkpoint loadable by load_model.
    The source checkpoint's licence files come along, with a MODIFIED note (Gemma's terms ask
    modified files to say so)."""
    directory = Path(directory)
    lm.model.save_pretrained(directory, safe_serialization=True)
    lm.tokenizer.save_pretrained(directory)
    source = Path(lm.source)
    copied = [name for name in LICENCE_FILES if source.is_dir() and (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, directory / name)
    if copied:
        (directory / "MODIFIED").write_text(f"The weights were modified by kn-ray value-slot edits of {lm.name}.\n")
    return directory
