"""Where each model family keeps its blocks, its named sites and its LM head.

Architecture support is data: one `Adapter` per family, module paths dotted from the model
(`layers`, `head`, `final_norm`) or from a block (the rest). The sites are named in the style
of TransformerLens hook points (`SITES`, `site_module`):

* `mlp.hook_post`, the FFN neurons: the input of the FFN output projection (`ffn_out`);
* `attn.hook_z`, the attention heads: the input of the attention output projection
  (`attn_out`), split by head into [..., heads, head_dim];
* `hook_attn_out` / `hook_mlp_out`: the outputs of those two projections (what each block's
  attention and MLP write, before any residual add or post-norm);
* `hook_resid_pre`: a block's input; `hook_embed`: the input embeddings; `logits`.

Circuits (`circuits.py`) need more: where each sublayer reads the residual stream (`ln_attn`,
`ln_mlp`, `final_norm`), how the query/key/value projections lay out heads (`qkv`), and whether
the residual stream is a sum of what the sublayers write (`residual`). Adding a family is one
entry in `ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# residual layouts: "pre" (x + attn(ln(x)), then + mlp(ln(x))), "parallel" (x + attn(ln(x)) + mlp(ln(x))),
# "post" (post-LN or norms on the sublayer outputs: the residual stream is not a sum of node outputs)
RESIDUALS = ("pre", "parallel", "post")
# how a query/key/value projection lays out its output columns (see `head_columns`)
QKV_KINDS = ("q", "kv", "qkv_heads", "qkv_blocks")
SITES = ("hook_embed", "hook_resid_pre", "attn.hook_z", "hook_attn_out", "mlp.hook_post", "hook_mlp_out", "logits")


@dataclass(frozen=True)
class Adapter:
    """Module paths for one model family."""

    family: str
    model_types: tuple[str, ...]  # `config.model_type` values this adapter serves
    layers: str  # the ModuleList of transformer blocks
    ffn_out: str  # inside a block: the FFN output projection (its input = the neurons)
    head: str  # the LM head: its input is gathered at the predicting positions
    attn_out: str = ""  # inside a block: the attention output projection (its input = the heads)
    masked: bool = False  # masked LM (target = the mask token) or causal LM (target = last prompt token)
    residual: str = "pre"  # see RESIDUALS; "parallel" only where `parallel_flag` is set in the config
    parallel_flag: str = ""  # config attribute that switches a block to the parallel residual
    ln_attn: str = ""  # inside a block: the norm whose input is the attention's read of the residual
    ln_mlp: str = ""  # inside a block: the same for the MLP
    final_norm: str = ""  # the norm before the LM head
    qkv: tuple[tuple[str, str], ...] = ()  # inside a block: (projection path, kind in QKV_KINDS)
    # inside a block: an RMSNorm applied to the FFN's output before the residual add (Gemma 2/3,
    # OLMo 2). IG's path then holds its clean RMS fixed at the target (`post_norm="frozen"`, the
    # default): the normed output is alpha x its clean value, linear in the neurons (docs/quadrature.md)
    post_ffn_norm: str = ""

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def ffn_out_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.blocks(model)[layer].get_submodule(self.ffn_out)

    def attn_out_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.blocks(model)[layer].get_submodule(self.attn_out)

    def post_ffn_norm_module(self, model: nn.Module, layer: int) -> nn.Module | None:
        """The norm on `layer`'s FFN output (None: the family has none)."""
        return self.blocks(model)[layer].get_submodule(self.post_ffn_norm) if self.post_ffn_norm else None

    def head_module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.head)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def num_neurons(self, model: nn.Module) -> int:
        return value_matrix(self.ffn_out_module(model, 0)).shape[1]

    def residual_of(self, model: nn.Module) -> str:
        """The residual layout of this model (a config flag can make a block parallel)."""
        if self.parallel_flag and getattr(model.config, self.parallel_flag, False):
            return "parallel"
        return self.residual

    def site_module(self, model: nn.Module, site: str, layer: int | None = None) -> tuple[nn.Module, str]:
        """(module, "input" | "output"): where the named site is read."""
        if site not in SITES:
            raise ValueError(f"unknown site {site!r}; sites: {', '.join(SITES)}")
        if site == "hook_embed":
            return model.get_input_embeddings(), "output"
        if site == "logits":
            return self.head_module(model), "output"
        if layer is None:
            raise ValueError(f"site {site!r} needs a layer")
        per_block = {"hook_resid_pre": (self.blocks(model)[layer], "input"),
                     "mlp.hook_post": (self.ffn_out_module(model, layer), "input"),
                     "hook_mlp_out": (self.ffn_out_module(model, layer), "output")}
        if site in per_block:
            return per_block[site]
        return self.attn_out_module(model, layer), "input" if site == "attn.hook_z" else "output"

    def site_width(self, model: nn.Module, site: str) -> int:
        """Units of a per-block site at one position (neurons; heads x head_dim for `attn.hook_z`)."""
        module, side = self.site_module(model, site, 0)
        return value_matrix(module).shape[1 if side == "input" else 0]


_LLAMA_LIKE = dict(attn_out="self_attn.o_proj", ln_attn="input_layernorm", ln_mlp="post_attention_layernorm",
                   final_norm="model.norm", qkv=(("self_attn.q_proj", "q"), ("self_attn.k_proj", "kv"),
                                                 ("self_attn.v_proj", "kv")))

ADAPTERS: tuple[Adapter, ...] = (
    Adapter("bert", ("bert",), "bert.encoder.layer", "output.dense", "cls", attn_out="attention.output.dense",
            masked=True, residual="post"),
    Adapter("roberta", ("roberta", "xlm-roberta", "camembert"), "roberta.encoder.layer", "output.dense", "lm_head",
            attn_out="attention.output.dense", masked=True, residual="post"),
    Adapter("gpt2", ("gpt2",), "transformer.h", "mlp.c_proj", "lm_head", attn_out="attn.c_proj", ln_attn="ln_1",
            ln_mlp="ln_2", final_norm="transformer.ln_f", qkv=(("attn.c_attn", "qkv_blocks"),)),
    Adapter("gpt_neox", ("gpt_neox",), "gpt_neox.layers", "mlp.dense_4h_to_h", "lm_head", attn_out="attention.dense",
            parallel_flag="use_parallel_residual", ln_attn="input_layernorm", ln_mlp="post_attention_layernorm",
            final_norm="gpt_neox.final_layer_norm", qkv=(("attention.query_key_value", "qkv_heads"),)),
    Adapter("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo"), "model.layers", "mlp.down_proj",
            "lm_head", **_LLAMA_LIKE),
    # norms on the sublayer outputs (sandwich): sites work, circuits do not (no sum of node outputs)
    Adapter("gemma2", ("gemma2", "olmo2"), "model.layers", "mlp.down_proj", "lm_head",
            **_LLAMA_LIKE | dict(residual="post", post_ffn_norm="post_feedforward_layernorm")),
    # Gemma 3: sandwich norms too, the MLP reads through pre_feedforward_layernorm; sliding-window
    # and global layers, a sqrt(hidden)-scaled tied embedding (the engine handles both; README)
    Adapter("gemma3", ("gemma3_text",), "model.layers", "mlp.down_proj", "lm_head",
            **_LLAMA_LIKE | dict(residual="post", ln_mlp="pre_feedforward_layernorm",
                                 post_ffn_norm="post_feedforward_layernorm")),
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


def attention_shape(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) from a config."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    kv = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv, getattr(config, "head_dim", None) or hidden // heads


def head_columns(kind: str, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """[heads, columns]: the output columns of a q/k/v projection that query head h reads.

    `q`: head h's head_dim columns; `kv`: those of its key/value group (shared under GQA);
    `qkv_heads` (GPT-NeoX): [q_h k_h v_h] contiguous per head; `qkv_blocks` (GPT-2):
    [all q | all k | all v], head h's slice of each.
    """
    h = torch.arange(heads)[:, None]
    j = torch.arange(head_dim)[None]
    if kind == "q":
        return h * head_dim + j
    if kind == "kv":
        return (h // (heads // kv_heads)) * head_dim + j
    if kind == "qkv_heads":
        return h * 3 * head_dim + torch.arange(3 * head_dim)[None]
    if kind == "qkv_blocks":
        return torch.cat([b * heads * head_dim + h * head_dim + j for b in range(3)], 1)
    raise ValueError(f"qkv kind must be one of {QKV_KINDS}, got {kind!r}")
