"""An independent, straightforward causal-tracing reference (float64).

One restoration, one sample, one forward at a time: the unpadded prompt + object[:-1], noise
added to the embedding module's output at the subject's tokens, the clean state written back
by plain transformers forward hooks at the spelled-out module paths (tests/reference.py), no
cache, the full logits. Shares no code with the engine: the noise recipe (a fresh
torch.Generator seeded with `seed`, standard normal [samples, subject tokens, hidden] in
float32, times noise x the population std of the embedding output over the vocabulary) and
ROME's window [l - w // 2, l + ceil(w / 2)) are written out again here.
"""

from __future__ import annotations

import torch

from tests.reference import _PATHS

KINDS = ("resid", "mlp", "attn")


def _module(model, family, kind, layer):
    blocks, ffn, attn = _PATHS[family]
    block = model.get_submodule(blocks)[layer]
    return block if kind == "resid" else block.get_submodule(ffn if kind == "mlp" else attn)


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def _replace(o, h):
    return (h, *o[1:]) if isinstance(o, tuple) else h


def reference_trace(model64, family, tokenizer, prompt, target, span, *, samples, noise, window, seed, kinds=KINDS):
    """(p_restored [kinds, layers, prompt tokens], p_clean, p_corrupted) for one prompt."""
    p_ids = tokenizer(prompt)["input_ids"]
    gold = tokenizer(prompt + target)["input_ids"][len(p_ids):]
    ids = torch.tensor([p_ids + gold[:-1]])
    pred = [len(p_ids) - 1 + k for k in range(len(gold))]
    s0, s1 = span
    embed = model64.get_input_embeddings()
    L = len(model64.get_submodule(_PATHS[family][0]))
    with torch.no_grad():
        table = embed(torch.arange(embed.num_embeddings))
        std = float(table.std(correction=0)) * noise
    draws = torch.randn(samples, s1 - s0, table.shape[-1], generator=torch.Generator().manual_seed(seed)).double() * std

    def prob():
        logp = torch.log_softmax(model64(input_ids=ids, use_cache=False).logits[0], -1)
        return float(torch.exp(sum(logp[p, g] for p, g in zip(pred, gold))))

    clean = {}

    def recorder(kind, layer):
        def hook(_m, _a, o):
            clean[kind, layer] = _out(o)[0].detach().clone()

        return hook

    handles = [_module(model64, family, k, l).register_forward_hook(recorder(k, l)) for k in kinds for l in range(L)]
    with torch.no_grad():
        p_clean = prob()
    for h in handles:
        h.remove()

    def run(sample, restore=None, t=None):
        def add_noise(_m, _a, o):
            o = o.clone()
            o[0, s0:s1] += draws[sample]
            return o

        def put(kind, layer):
            def hook(_m, _a, o):
                h = _out(o).clone()
                h[0, t] = clean[kind, layer][t]
                return _replace(o, h)

            return hook

        hs = [embed.register_forward_hook(add_noise)]
        if restore is not None:
            kind, layer = restore
            lo, hi = (layer, layer + 1) if kind == "resid" else (max(0, layer - window // 2), min(L, layer - (-window // 2)))
            hs += [_module(model64, family, kind, j).register_forward_hook(put(kind, j)) for j in range(lo, hi)]
        try:
            with torch.no_grad():
                return prob()
        finally:
            for h in hs:
                h.remove()

    p_corrupted = sum(run(s) for s in range(samples)) / samples
    out = torch.zeros(len(kinds), L, len(p_ids), dtype=torch.float64)
    for k, kind in enumerate(kinds):
        for layer in range(L):
            for t in range(len(p_ids)):
                out[k, layer, t] = sum(run(s, (kind, layer), t) for s in range(samples)) / samples
    return out.numpy(), p_clean, p_corrupted
