"""An independent, edge-by-edge EAP-IG reference (float64).

One prompt, one receiver, one interpolation point at a time: the model runs on interpolated
input embeddings (`inputs_embeds`) and only the receiver's own read of the residual stream is
perturbed by a zero tensor e_v; for a head that means re-running the whole attention module on
the perturbed input and keeping only that head's slice of the output projection's input. The
logits' input (the final norm's) is instead set to the straight line between its corrupted and
clean values, plus e_v. The gradient w.r.t. e_v, dotted with each sender's clean - corrupted
output, is the edge score.
Module paths are spelled out here, not read from the engine's adapters.
"""

from __future__ import annotations

import torch

_LLAMA = dict(blocks=lambda m: m.model.layers, ln1="input_layernorm", attn="self_attn", o="self_attn.o_proj",
              ln2="post_attention_layernorm", mlp="mlp", final=lambda m: m.model.norm, parallel=False)
PATHS = {
    "gpt2": dict(blocks=lambda m: m.transformer.h, ln1="ln_1", attn="attn", o="attn.c_proj", ln2="ln_2", mlp="mlp",
                 final=lambda m: m.transformer.ln_f, parallel=False),
    "gpt_neox": dict(blocks=lambda m: m.gpt_neox.layers, ln1="input_layernorm", attn="attention", o="attention.dense",
                     ln2="post_attention_layernorm", mlp="mlp", final=lambda m: m.gpt_neox.final_layer_norm, parallel=True),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gemma": _LLAMA,
}


def _first(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _replace_first(args, kwargs, value):
    return ((value, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": value})


def reference_edges(model64, family, tok, prompt, corrupted, target, alphas, weights, metric="logprob", other=None):
    """(scores [senders, receivers] float64 in the engine's layout, M(clean), M(corrupted))."""
    p = PATHS[family]
    blocks = p["blocks"](model64)
    L, H = len(blocks), model64.config.num_attention_heads
    p_ids = tok(prompt)["input_ids"]
    gold = tok(prompt + target)["input_ids"][len(p_ids):]
    clean_ids = torch.tensor([p_ids + gold[:-1]])
    corr_ids = torch.tensor([tok(corrupted)["input_ids"] + gold[:-1]])
    assert clean_ids.shape == corr_ids.shape
    pred = [len(p_ids) - 1 + k for k in range(len(gold))]
    other_id = tok(corrupted + other)["input_ids"][len(p_ids)] if metric == "logit_diff" else None

    def measure(logits):
        if metric == "logit_diff":
            return logits[0, pred[0], gold[0]] - logits[0, pred[0], other_id]
        logp = torch.log_softmax(logits[0], -1)
        return sum(logp[i, g] for i, g in zip(pred, gold))

    def head_out(o_proj, z, h):
        dh = z.shape[-1] // H
        zh = z[..., h * dh:(h + 1) * dh]
        if isinstance(o_proj, torch.nn.Linear):
            return zh @ o_proj.weight[:, h * dh:(h + 1) * dh].T
        return zh @ o_proj.weight[h * dh:(h + 1) * dh]  # GPT-2 Conv1D: [in, out]

    def senders(ids):
        outs, handles = {}, []
        handles.append(p["final"](model64).register_forward_pre_hook(lambda _m, a, k: outs.__setitem__("final", _first(a, k)), with_kwargs=True))
        handles.append(blocks[0].register_forward_pre_hook(lambda _m, a, k: outs.__setitem__(0, _first(a, k)[0]), with_kwargs=True))
        for layer, block in enumerate(blocks):
            o_proj = block.get_submodule(p["o"])
            base = 1 + layer * (H + 1)
            handles.append(o_proj.register_forward_pre_hook(
                lambda m, a, base=base: outs.update({base + h: head_out(m, a[0][0], h) for h in range(H)})))
            handles.append(block.get_submodule(p["mlp"]).register_forward_hook(
                lambda _m, _a, out, base=base: outs.__setitem__(base + H, out[0])))
        try:
            with torch.no_grad():
                value = measure(model64(input_ids=ids, use_cache=False).logits)
        finally:
            for handle in handles:
                handle.remove()
        final = outs.pop("final")
        return torch.stack([outs[i] for i in range(len(outs))]), float(value), final

    def line(final_clean, final_corr, a):
        """The logits' input at alpha on the straight line, plus e_v."""
        return lambda e_v: lambda _m, args, kwargs: _replace_first(args, kwargs, final_corr + a * (final_clean - final_corr) + e_v)

    def receiver_grad(v, emb, set_final=None):
        """dM/d e_v at the interpolated embeddings `emb` (the logits: at `set_final`'s final residual): [T, d]."""
        layer, slot = divmod(v, H + 1) if v < L * (H + 1) else (L, None)
        e_v = torch.zeros(emb.shape[1:], dtype=emb.dtype, requires_grad=True)
        handles, state = [], {}
        if layer == L:
            handles.append(p["final"](model64).register_forward_pre_hook(set_final(e_v), with_kwargs=True))
        elif slot == H:
            handles.append(blocks[layer].get_submodule(p["ln2"]).register_forward_pre_hook(
                lambda _m, a, k: _replace_first(a, k, _first(a, k) + e_v), with_kwargs=True))
        else:
            ln1, attn, o_proj = (blocks[layer].get_submodule(p[k]) for k in ("ln1", "attn", "o"))

            def keep_x(_m, a, k):
                if not state.get("busy"):
                    state["x"] = _first(a, k)

            def keep_z(_m, a):
                if not state.get("busy"):
                    state["z"] = a[0]

            def rerun(module, a, k, out):
                if state.get("busy"):
                    return None
                state["busy"] = True
                try:
                    zs = {}
                    h2 = o_proj.register_forward_pre_hook(lambda _m, a2: zs.__setitem__("z", a2[0]))
                    try:
                        new_args, new_kwargs = _replace_first(a, k, ln1(state["x"] + e_v))
                        module(*new_args, **new_kwargs)
                    finally:
                        h2.remove()
                    dh = state["z"].shape[-1] // H
                    z = state["z"].clone()
                    z[..., slot * dh:(slot + 1) * dh] = zs["z"][..., slot * dh:(slot + 1) * dh]
                    return (o_proj(z), *out[1:])
                finally:
                    state["busy"] = False

            handles += [ln1.register_forward_pre_hook(keep_x, with_kwargs=True), o_proj.register_forward_pre_hook(keep_z),
                        attn.register_forward_hook(rerun, with_kwargs=True)]
        try:
            (grad,) = torch.autograd.grad(measure(model64(inputs_embeds=emb, use_cache=False).logits), e_v)
        finally:
            for handle in handles:
                handle.remove()
        return grad

    out_clean, m_clean, final_clean = senders(clean_ids)
    out_corr, m_corr, final_corr = senders(corr_ids)
    delta = out_clean - out_corr  # [U, T, d]
    embed = model64.get_input_embeddings()
    with torch.no_grad():
        e_clean, e_corr = embed(clean_ids), embed(corr_ids)
    V = L * (H + 1) + 1
    scores = torch.zeros(len(delta), V, dtype=torch.float64)
    s_layer = [-1] + [i // (H + 1) for i in range(L * (H + 1))]
    s_is_head = [False] + [i % (H + 1) < H for i in range(L * (H + 1))]
    for v in range(V):
        r_layer = v // (H + 1) if v < V - 1 else L
        r_is_mlp = v < V - 1 and v % (H + 1) == H
        g = sum(w * receiver_grad(v, e_corr + a * (e_clean - e_corr), line(final_clean, final_corr, a))
                for a, w in zip(alphas.tolist(), weights.tolist()))
        for u in range(len(delta)):
            if s_layer[u] < r_layer or (s_layer[u] == r_layer and s_is_head[u] and r_is_mlp and not p["parallel"]):
                scores[u, v] = (delta[u] * g).sum()
    return scores.numpy(), m_clean, m_corr
