"""Where each model family keeps its blocks, FFN output projection and LM head.

Architecture support is data: one `Adapter` per family. The attributed neurons are
the *inputs* of the FFN output projection (`ffn_out`), read at the target position.
Adding a family is one entry in `ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Adapter:
    """Module paths for one model family, dotted from the top-level model."""

    family: str
    model_types: tuple[str, ...]  # `config.model_type` values this adapter serves
    layers: str  # the ModuleList of transformer blocks
    ffn_out: str  # inside a block: the FFN output projection (its input = the neurons)
    head: str  # the LM head: its input is gathered at the predicting positions
    masked: bool = False  # masked LM (target = the mask token) or causal LM (target = last prompt token)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def ffn_out_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.blocks(model)[layer].get_submodule(self.ffn_out)

    def head_module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.head)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def num_neurons(self, model: nn.Module) -> int:
        return value_matrix(self.ffn_out_module(model, 0)).shape[1]


ADAPTERS: tuple[Adapter, ...] = (
    Adapter("bert", ("bert",), "bert.encoder.layer", "output.dense", "cls", masked=True),
    Adapter("roberta", ("roberta", "xlm-roberta", "camembert"), "roberta.encoder.layer", "output.dense", "lm_head", masked=True),
    Adapter("gpt2", ("gpt2",), "transformer.h", "mlp.c_proj", "lm_head"),
    Adapter("gpt_neox", ("gpt_neox",), "gpt_neox.layers", "mlp.dense_4h_to_h", "lm_head"),
    Adapter("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2"), "model.layers", "mlp.down_proj", "lm_head"),
)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_or_type: nn.Module | str) -> Adapter:
    """The adapter for a model (or a `config.model_type`); a clear error if none fits."""
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitecture(
        f"kn-ray has no adapter for model_type {model_type!r}; supported: {', '.join(supported_model_types())}. "
        "Adding one is a single Adapter entry in kn_ray/engine/adapters.py (see README, 'Adding an architecture')."
    )


class UnsupportedArchitecture(ValueError):
    pass


def value_matrix(ffn_out: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The output projection's weight (or `weight`, a copy of it) as [hidden, neurons]: column i
    is neuron i's value slot.

    nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out] (so we return its transpose view).
    """
    weight = ffn_out.weight if weight is None else weight
    if isinstance(ffn_out, nn.Linear):
        return weight
    return weight.t()
