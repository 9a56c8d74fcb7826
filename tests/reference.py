"""An independent, straightforward integrated-gradients reference (float64).

One prompt, one layer, one step at a time: a full forward of the unpadded sequence with
the target position's FFN activation replaced by alpha * a, then a backward pass. It
shares no code with the engine (module paths are spelled out here, not read from adapters).

`post_norm="frozen"` (families that normalise the FFN output, `POST_FFN_NORM`): at the target
position that norm's output is gain * y / rms_clean, y the FFN output and rms_clean
sqrt(mean(y_clean^2) + eps) from the clean run, the gain spelled out per family.
"""

from __future__ import annotations

import copy

import torch

_PATHS = {  # family: (blocks, FFN output projection, attention output projection), spelled out
    "bert": ("bert.encoder.layer", "output.dense", "attention.output.dense"),
    "roberta": ("roberta.encoder.layer", "output.dense", "attention.output.dense"),
    "gpt2": ("transformer.h", "mlp.c_proj", "attn.c_proj"),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h", "attention.dense"),
    **{f: ("model.layers", "mlp.down_proj", "self_attn.o_proj")
       for f in ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "olmo2")},
}


def _module(blocks: str, path: str):
    return lambda m, layer: m.get_submodule(blocks)[layer].get_submodule(path)


POST_FFN_NORM = {  # family: (path in a block, gain from the norm's weight); eps is config.rms_norm_eps
    "gemma3_text": ("post_feedforward_layernorm", lambda w: 1 + w),
    "gemma2": ("post_feedforward_layernorm", lambda w: 1 + w),
    "olmo2": ("post_feedforward_layernorm", lambda w: w),
}
FFN_OUT = {family: _module(blocks, ffn) for family, (blocks, ffn, _) in _PATHS.items()}
ATTN_OUT = {family: _module(blocks, attn) for family, (blocks, _, attn) in _PATHS.items()}  # inputs: the heads


def float64(model):
    return copy.deepcopy(model).double()


def reference_ig(model64, family, tokenizer, prompt, target, layer, alphas, weights, masked, modules=FFN_OUT,
                 post_norm=None):
    """(scores [neurons], P(x), P(layer zeroed)) for one prompt and layer; `post_norm="frozen"`:
    the post-FFN norm (POST_FFN_NORM) at the target divides by the clean run's RMS. None: the
    engine's default, frozen for the families in POST_FFN_NORM, live for the rest."""
    if post_norm is None:
        post_norm = "frozen" if family in POST_FFN_NORM else "live"
    if masked:
        ids = tokenizer(prompt.replace("[MASK]", tokenizer.mask_token))["input_ids"]
        target_pos = ids.index(tokenizer.mask_token_id)
        gold = tokenizer(target, add_special_tokens=False)["input_ids"]
        pred_pos = [target_pos]
    else:
        p_ids = tokenizer(prompt)["input_ids"]
        gold = tokenizer(prompt + target)["input_ids"][len(p_ids):]
        ids = p_ids + gold[:-1]
        target_pos = len(p_ids) - 1
        pred_pos = [target_pos + k for k in range(len(gold))]
    input_ids = torch.tensor([ids])
    module = modules[family](model64, layer)
    state = {}

    def hook(_m, args):
        h = args[0].clone()
        state.setdefault("a", h[0, target_pos].detach().clone())
        if "x" in state:
            h[0, target_pos] = state["x"]
        return (h,)

    def prob():
        extra = {} if masked else dict(use_cache=False)  # no cache: every layer sees the whole sequence
        logits = model64(input_ids=input_ids, **extra).logits[0]
        logp = torch.log_softmax(logits, -1)
        return torch.exp(sum(logp[p, g] for p, g in zip(pred_pos, gold)))

    def frozen_norm(norm, _args, out):
        y = _args[0][0, target_pos]
        if "rms" not in state:  # the clean run
            state["rms"] = torch.sqrt(y.pow(2).mean() + model64.config.rms_norm_eps)
        out = out.clone()
        out[0, target_pos] = gain(norm.weight) * y / state["rms"]
        return out

    handles = [module.register_forward_pre_hook(hook)]
    if post_norm == "frozen":
        path, gain = POST_FFN_NORM[family]
        norm = model64.get_submodule(_PATHS[family][0])[layer].get_submodule(path)
        handles.append(norm.register_forward_hook(frozen_norm))
    elif post_norm != "live":
        raise ValueError(post_norm)
    try:
        with torch.no_grad():
            p_clean = prob()
        a = state["a"]
        total = torch.zeros_like(a)
        for alpha, w in zip(alphas.tolist(), weights.tolist()):
            x = (alpha * a).clone().requires_grad_(True)
            state["x"] = x
            (g,) = torch.autograd.grad(prob(), x)
            total += w * g
        state["x"] = torch.zeros_like(a)
        with torch.no_grad():
            p_zero = prob()
    finally:
        for handle in handles:
            handle.remove()
    return (a * total).numpy(), float(p_clean), float(p_zero)
