"""EAP-IG speed: the engine against a straightforward implementation (BENCHMARKS.md).

The straightforward implementation does what the published EAP-IG code does: one prompt at a
time; for each interpolation point one full forward (logits at every position) and backward;
at every point the [senders, T, d] x [receivers, T, d] dot products are taken and added to the
scores; by default the published rule (`left`: alpha = k/m, k < m) with m = 5. Its receivers
get their own residual copies the same way (TransformerLens's split q/k/v inputs cost the
same), and its logits column the same straight-line gradient. `--check` first runs the engine
with the same rule: both give the same scores (the checksums). The engine then runs its own rule
(`--engine-steps`, `--engine-rule`); each line reports, per prompt, the residuals relative to
the change: at the logits and along the embedding path (the one that says how many nodes the
integral needs).

    flock /tmp/kn-bench.lock python benchmarks/circuits_bench.py --model smollm2 --prompts 8 --check --rounds 2
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


def straightforward(eap, prompt, corrupted, target, n_steps, rule):
    """One prompt, one full forward/backward per point, scores accumulated at every point. Returns
    (scores [U, V], |edges into logits - change|, |embedding-path sum out of input - change|)."""
    from kn_ray.engine.circuits import _by_group
    from kn_ray.engine.quadrature import quadrature
    from kn_ray.engine.receivers import split_receivers

    alphas, weights = quadrature(n_steps, rule)
    pair = eap._collate_pair([(eap.encode(prompt, target), eap.encode(corrupted, target), 0)])
    clean = eap._run_senders(pair.clean, pair, "logprob")
    corr = eap._run_senders(pair.corrupted, pair, "logprob")
    delta = clean.outputs[0] - corr.outputs[0]  # [U, T, d]
    ids, pos, gold = pair.clean.input_ids, pair.clean.pred_cols[0], pair.clean.gold_ids[0][:, None]
    H, L, (T, d) = eap.heads, eap.lm.num_layers, delta.shape[1:]
    scores = torch.zeros(eap.graph.num_senders, eap.graph.num_receivers)
    input_sum = 0.0
    emb, head = eap.model.get_input_embeddings(), eap.adapter.head_module(eap.model)
    for alpha, w in zip(alphas.tolist(), weights.tolist()):
        mixed = corr.embeds + alpha * (clean.embeds - corr.embeds)
        leaves = [torch.zeros((1, T, H, d) if i % 2 == 0 and i < 2 * L else (1, T, d), requires_grad=True)
                  for i in range(2 * L + 1)]
        handle = emb.register_forward_hook(lambda _m, _a, out: mixed)
        try:
            with split_receivers(eap.model, eap.adapter, _by_group(leaves)):
                logits = eap.model(input_ids=ids).logits[0]  # every position
                logp = logits[pos].log_softmax(-1).gather(1, gold)[:, 0]
                grads = torch.autograd.grad(logp.sum(), leaves)
        finally:
            handle.remove()
        grad = torch.cat([g if g.dim() == 4 else g.unsqueeze(2) for g in grads], 2)[0]  # [T, V, d]
        input_sum += w * float(torch.einsum("td,tvd,v->", delta[0], grad, torch.from_numpy(eap.graph.valid[0]).float()))
        # the logits: along the straight line at the final residual (predicting positions)
        x = (corr.final + alpha * (clean.final - corr.final)).requires_grad_(True)
        with torch.enable_grad():
            line = head(eap._final_norm(x))[0].log_softmax(-1).gather(1, gold)[:, 0]
            (g_line,) = torch.autograd.grad(line.sum(), x)
        grad[:, -1] = 0
        grad[pos, -1] = g_line[0]
        scores += w * torch.einsum("utd,tvd->uv", delta, grad)
    scores *= torch.from_numpy(eap.graph.valid)
    change = float(clean.metric[0] - corr.metric[0])
    return scores, abs(float(scores[:, -1].sum()) - change), abs(input_sum - change), change


def worker(args):
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    from kn_ray.engine.circuits import EdgeAttributor

    lm = load(args.model)
    eap = EdgeAttributor(lm, precision="fp32")
    pairs = [p for p in PAIRS if len(lm.tokenizer(p[0])["input_ids"]) == len(lm.tokenizer(p[1])["input_ids"])][: args.prompts]
    start, cpu = time.perf_counter(), time.process_time()
    if args.impl == "engine":
        results = eap.attribute_edges([p for p, _, _ in pairs], [t for _, _, t in pairs], [c for _, c, _ in pairs],
                                      n_steps=args.n_steps, rule=args.rule)
        rows = [(r.scores, r.completeness, r.input_residual, r.change) for r in results]
    else:
        rows = [straightforward(eap, p, c, t, args.n_steps, args.rule) for p, c, t in pairs]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    rows = [(np.asarray(s), c, i, ch) for s, c, i, ch in rows]
    print(json.dumps(dict(model=args.model, impl=args.impl, rule=f"{args.rule} {args.n_steps}", prompts=len(pairs),
                          seconds=seconds, s_per_prompt=seconds / len(pairs), cpu_s_per_prompt=cpu / len(pairs),
                          peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          checksum=float(sum(np.abs(s).sum() for s, *_ in rows)), edges=eap.graph.num_edges,
                          logits_residual=[round(c / abs(ch), 6) for _, c, _, ch in rows],
                          input_residual=[round(i / abs(ch), 4) for _, _, i, ch in rows])))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--n-steps", type=int, default=5, help="the straightforward implementation's points")
    ap.add_argument("--rule", default="left", help="its quadrature rule (left: the published code's)")
    ap.add_argument("--engine-steps", type=int, default=None, help="the engine's points (default: --n-steps)")
    ap.add_argument("--engine-rule", default="gausslegendre")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 on a shared machine, where two threads spin at every barrier")
    ap.add_argument("--impl", choices=("engine", "straightforward"))
    ap.add_argument("--check", action="store_true", help="first the engine with the straightforward rule: same scores")
    args = ap.parse_args()
    if args.impl:
        return worker(args)

    def run(impl, n_steps, rule):
        cmd = [sys.executable, __file__, "--model", args.model, "--prompts", str(args.prompts),
               "--n-steps", str(n_steps), "--rule", rule, "--impl", impl, "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        print(out, flush=True)

    if args.check:
        run("engine", args.n_steps, args.rule)
    for _ in range(args.rounds):
        run("engine", args.engine_steps or args.n_steps, args.engine_rule)
        run("straightforward", args.n_steps, args.rule)


if __name__ == "__main__":
    main()
