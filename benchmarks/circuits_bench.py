"""EAP-IG speed: the engine against a straightforward implementation (BENCHMARKS.md).

The straightforward implementation does what the published EAP-IG code does: one prompt at a
time; for each interpolation point one full forward (logits at every position) and backward;
at every point the [senders, T, d] x [receivers, T, d] dot products are taken and added to the
scores. Its receivers get their own residual copies the same way (TransformerLens's split
q/k/v inputs cost the same). Both run in fp32 and give the same scores (checked here).

    flock /tmp/kn-bench.lock python benchmarks/circuits_bench.py --model smollm2 --prompts 6
    flock /tmp/kn-bench.lock python benchmarks/circuits_bench.py --model llama3.2-1b-random --prompts 2

Each (model, implementation) runs in its own process for its peak RSS; the two alternate
`--rounds` times so that load from other work hits both alike.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

PAIRS = [("The capital of France is", "The capital of Spain is", " Paris"),
         ("The capital of Germany is", "The capital of Italy is", " Berlin"),
         ("Paris is located in the country of", "Rome is located in the country of", " France"),
         ("The official language of France is", "The official language of Spain is", " French"),
         ("Berlin is the capital of", "Madrid is the capital of", " Germany"),
         ("The currency of Japan is the", "The currency of China is the", " yen"),
         ("Toyota was founded in", "Siemens was founded in", " Japan"),
         ("The mother tongue of Victor Hugo is", "The mother tongue of Dante Alighieri is", " French")]


def load(name):
    from kn_ray.engine import load_model
    from kn_ray.engine.random_models import PRESETS, random_model

    if name in PRESETS:
        return random_model(name, [" ".join(p) for p in PAIRS] * 50)
    return load_model(name)


def straightforward(eap, prompt, corrupted, target, n_steps):
    """One prompt, one full forward/backward per point, scores accumulated at every point."""
    from kn_ray.engine.circuits import _slices
    from kn_ray.engine.quadrature import quadrature
    from kn_ray.engine.receivers import split_receivers

    alphas, weights = quadrature(n_steps, "gausslegendre")
    pair = eap._collate_pair([(eap.encode(prompt, target), eap.encode(corrupted, target), 0)])
    clean = eap._run_senders(pair.clean, pair, "logprob")
    corr = eap._run_senders(pair.corrupted, pair, "logprob")
    delta = clean[0][0] - corr[0][0]  # [U, T, d]
    ids = pair.clean.input_ids
    K = pair.clean.gold_ids.shape[1]
    scores = torch.zeros(eap.graph.num_senders, eap.graph.num_receivers)
    emb = eap.model.get_input_embeddings()
    for alpha, w in zip(alphas.tolist(), weights.tolist()):
        mixed = corr[1] + alpha * (clean[1] - corr[1])
        eps = torch.zeros(1, ids.shape[1], eap.graph.num_receivers, delta.shape[-1], requires_grad=True)
        handle = emb.register_forward_hook(lambda _m, _a, out: mixed)
        try:
            with split_receivers(eap.model, eap.adapter, _slices(eps, eap.heads, eap.lm.num_layers)):
                logits = eap.model(input_ids=ids).logits[0]  # every position
                pos = pair.clean.pred_cols[0]
                logp = logits[pos].log_softmax(-1).gather(1, pair.clean.gold_ids[0][:, None])[:, 0]
                (grad,) = torch.autograd.grad(logp.sum(), eps)
        finally:
            handle.remove()
        scores += w * torch.einsum("utd,tvd->uv", delta, grad[0])
    del K
    return scores * torch.from_numpy(eap.graph.valid)


def worker(args):
    torch.manual_seed(0)
    from kn_ray.engine.circuits import EdgeAttributor

    lm = load(args.model)
    eap = EdgeAttributor(lm, precision="fp32")
    pairs = [p for p in PAIRS if len(lm.tokenizer(p[0])["input_ids"]) == len(lm.tokenizer(p[1])["input_ids"])][: args.prompts]
    start = time.perf_counter()
    if args.impl == "engine":
        results = eap.attribute_edges([p for p, _, _ in pairs], [t for _, _, t in pairs], [c for _, c, _ in pairs],
                                      n_steps=args.n_steps)
        scores = [r.scores for r in results]
    else:
        scores = [straightforward(eap, p, c, t, args.n_steps).numpy() for p, c, t in pairs]
    seconds = time.perf_counter() - start
    print(json.dumps(dict(model=args.model, impl=args.impl, prompts=len(pairs), seconds=seconds,
                          s_per_prompt=seconds / len(pairs), peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          checksum=float(sum(np.abs(s).sum() for s in scores)), edges=eap.graph.num_edges)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--n-steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--impl", choices=("engine", "straightforward"))
    args = ap.parse_args()
    if args.impl:
        return worker(args)
    for _ in range(args.rounds):
        for impl in ("engine", "straightforward"):
            cmd = [sys.executable, __file__, "--model", args.model, "--prompts", str(args.prompts),
                   "--n-steps", str(args.n_steps), "--impl", impl]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            print(out, flush=True)


if __name__ == "__main__":
    main()
