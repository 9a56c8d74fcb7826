"""Causal tracing speed: the engine (`kn_ray.engine.tracing.Tracer`) against a straightforward
loop (BENCHMARKS.md, section 13).

The straightforward loop does one forward per restoration per sample: the whole prompt +
object[:-1] in one row, noise hooked onto the subject's embeddings, the clean state written back
by forward hooks, the full logits, for every (kind, layer, prompt token, sample); the clean run
once. Timing all of it would take hours on one thread, so it is timed on `--naive` (kind, layer,
token) triples drawn at random (every sample of each) and extrapolated per forward to the full
count; on those triples its P (mean over samples) is compared with the engine's (`max |diff|`).

    flock /tmp/kn-bench.lock python benchmarks/trace_bench.py --samples 10 --naive 6
    flock /tmp/kn-bench.lock python benchmarks/trace_bench.py --samples 10 --pass-tokens 256,512,1024,2048 --naive 0

One thread (torch.set_num_threads(1)), fp32, SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import platform
import random
import subprocess
import time

import numpy as np
import torch

from kn_ray.engine import load_model
from kn_ray.engine import tracing
from kn_ray.engine.model_runner import gold_prob
from kn_ray.engine.tracing import Tracer, noise_draws, restored_layers

PROMPTS = [("The Eiffel Tower is located in the city of", " Paris", "The Eiffel Tower"),
           ("The mother tongue of Danielle Darrieux is", " French", "Danielle Darrieux"),
           ("Toyota Corolla is a product of", " Toyota", "Toyota Corolla")]


def naive_restoration(lm, tracer, ids, span, gold, draws, clean, kind, layer, t, window):
    """P(gold) of one restoration of one sample: one full forward."""
    model, L = lm.model, lm.num_layers
    s0, s1 = span
    modules = tracer._modules(kind)

    def add_noise(_m, _a, out):
        out = out.clone()
        out[0, s0:s1] += draws
        return out

    def put(j):
        def hook(_m, _a, out):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[0, t] = clean[kind][j][t]
            return (h, *out[1:]) if isinstance(out, tuple) else h

        return hook

    handles = [model.get_input_embeddings().register_forward_hook(add_noise)]
    handles += [modules[j].register_forward_hook(put(j)) for j in restored_layers(kind, layer, window, L)]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    P = ids.shape[1] - len(gold) + 1
    cols = torch.arange(P - 1, P - 1 + len(gold))
    return float(gold_prob(logits[:, cols], torch.tensor([gold]), torch.ones(1, len(gold), dtype=torch.bool))[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--naive", type=int, default=6, help="(kind, layer, token) triples the loop times per prompt")
    ap.add_argument("--pass-tokens", default=str(tracing.CPU_TRACE_TOKENS), help="engine row-tokens per pass (list)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lm = load_model("smollm2")
    tracer = Tracer(lm, precision="fp32")
    L = lm.num_layers
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), platform.processor())
    print(f"# {cpu}, 1 thread, torch {torch.__version__}, SmolLM2-135M fp32, samples {args.samples}, "
          f"window {args.window}")
    print("| prompt | tokens | subject | pass tokens | engine s | rows | passes | loop forwards | loop s/forward "
          "| loop s (extrapolated) | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rng = random.Random(0)
    for prompt, target, subject in PROMPTS[: args.prompts]:
        per = float("nan")  # the loop's seconds per forward, timed once per prompt
        for pass_tokens in [int(x) for x in args.pass_tokens.split(",")]:
            tracing.CPU_TRACE_TOKENS = pass_tokens
            start = time.perf_counter()
            res = tracer.trace([prompt], [target], [subject], samples=args.samples, window=args.window)[0]
            engine_s = time.perf_counter() - start
            assert res.ok, res.reason
            P = len(res.tokens)
            forwards = len(res.kinds) * L * P * args.samples
            diff = float("nan")
            if args.naive and np.isnan(per):  # once per prompt, against its first engine run
                enc = tracer.encode(prompt, target)
                ids = torch.tensor([list(enc.prompt_ids) + list(enc.object_ids[:-1])])
                batch = tracer._collate([enc])
                clean, _ = tracer._clean(batch, res.kinds)
                draws = noise_draws(0, args.samples, res.subject_span[1] - res.subject_span[0],
                                    lm.model.get_input_embeddings().embedding_dim) * res.noise_std
                triples = [(rng.randrange(len(res.kinds)), rng.randrange(L), rng.randrange(res.subject_span[0], P))
                           for _ in range(args.naive)]
                start, diffs = time.perf_counter(), []
                for k, layer, t in triples:
                    p = np.mean([naive_restoration(lm, tracer, ids, res.subject_span, list(enc.object_ids), draws[s],
                                                   clean, res.kinds[k], layer, t, args.window)
                                 for s in range(args.samples)])
                    diffs.append(abs(p - res.p_restored[k, layer, t]))
                per = (time.perf_counter() - start) / (args.naive * args.samples)
                diff = max(diffs)
            print(f"| {prompt!r} | {P} | {res.subject_span[0]}-{res.subject_span[1] - 1} | {pass_tokens} | "
                  f"{engine_s:.1f} | {res.rows} | {res.passes} | {forwards} | {per:.4f} | {per * forwards:.0f} | "
                  f"{per * forwards / engine_s:.1f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
