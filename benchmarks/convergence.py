"""Do the scores converge on real models? Every rule against a converged reference, every layer.

For each model and prompt, the scores of every layer ([layers, neurons]) under each rule are
compared with a Gauss-Legendre reference of many nodes on the same path:

* relative L2: ||s - s_ref||_2 / ||s_ref||_2 over the prompt's [layers, neurons] scores;
* worst layer: the largest relative L2 of one layer's scores (relative to that layer's ||s_ref||);
* Jaccard: of the coarse sets {score >= 0.2 x the prompt's max score} (the paper's threshold);
* evaluations: forward/backward rows per (prompt, layer), the baseline row included;
* seconds per prompt, fp32, one thread (`torch.set_num_threads(1)`);
* auto only: how often a layer's reported `score_error` bounds its real relative L2 error.

Gemma 3 is measured on both paths of its post-normed FFN (`post_norm` frozen, the default, and
live), each against its own reference. `--curve` prints P(alpha) along the path for the layers
the docs plot (docs/quadrature.md).

    PYTHONPATH=. python benchmarks/convergence.py > benchmarks/convergence.md
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import subprocess
import time

import numpy as np
import torch

from kn_ray.engine import Attributor, load_model

PROMPTS = [("The capital of France is", " Paris"), ("Toyota is a company based in", " Japan"),
           ("The Eiffel Tower is located in", " Paris")]
MODELS = {"smollm2": "SmolLM2-135M", "gemma3-270m": "Gemma 3 270M"}
RULES = [("left", 20), ("gausslegendre", 4), ("gausslegendre", 6), ("gausslegendre", 12), ("auto", 0.01),
         ("auto", 0.003)]
THRESHOLD = 0.2  # coarse set: score >= THRESHOLD x max


def coarse(scores: np.ndarray) -> set[int]:
    return set(np.flatnonzero(scores >= THRESHOLD * scores.max()).tolist())


def compare(got: np.ndarray, ref: np.ndarray) -> dict:
    a, b = coarse(got), coarse(ref)
    per_layer = np.linalg.norm(got - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)
    return dict(l2=float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), worst=float(per_layer.max()),
                worst_layer=int(per_layer.argmax()), jaccard=len(a & b) / len(a | b), per_layer=per_layer)


def run(attr: Attributor, rule: str, steps, post_norm: str) -> tuple[list, float]:
    prompts, targets = zip(*PROMPTS)
    kw = dict(n_steps="auto", tolerance=steps) if rule == "auto" else dict(n_steps=steps, rule=rule)
    start = time.perf_counter()
    res = attr.attribute(list(prompts), list(targets), post_norm=post_norm, **kw)
    seconds = (time.perf_counter() - start) / len(PROMPTS)
    assert all(r.ok for r in res), [r.reason for r in res if not r.ok]
    return res, seconds


def curve(attr: Attributor, layer: int, post_norm: str, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """P(alpha) for the first prompt at `layer`: the trapezoid nodes k/n, read from the rows."""
    seen = []
    real = attr._rows

    def rows(batch, clean, lay, pi, alpha, baseline):
        grads, p = real(batch, clean, lay, pi, alpha, baseline)
        seen.append((alpha.cpu().numpy().copy(), p.cpu().numpy().copy()))
        return grads, p

    attr._rows = rows
    try:
        attr.attribute([PROMPTS[0][0]], [PROMPTS[0][1]], n_steps=n, rule="trapezoid", layers=[layer],
                       post_norm=post_norm)
    finally:
        attr._rows = real
    alphas, probs = (np.concatenate(x) for x in zip(*seen))
    order = np.argsort(alphas)
    return alphas[order], probs[order]


def timing(models: list[str]) -> None:
    """Seconds per prompt (best of 2 runs of the 3 prompts, every layer) and evaluations."""
    prompts, targets = map(list, zip(*PROMPTS))
    print("| model | rule | s per prompt | evaluations per (prompt, layer) | per layer, first prompt |")
    print("|---|---|---|---|---|")
    for key in models:
        attr = Attributor(load_model(key), precision="fp32")
        attr.attribute(prompts[:1], targets[:1], n_steps=2, rule="gausslegendre", layers=[0])  # warm up
        for kw in (dict(n_steps=20, rule="left"), dict(n_steps=6, rule="gausslegendre"), dict(n_steps="auto")):
            seconds = []
            for _ in range(2):
                start = time.perf_counter()
                res = attr.attribute(prompts, targets, **kw)
                seconds.append((time.perf_counter() - start) / len(prompts))
            evals = np.stack([r.evaluations for r in res])
            label = "auto (default)" if kw["n_steps"] == "auto" else f"{kw['rule']} {kw['n_steps']}"
            print(f"| {MODELS.get(key, key)} | {label} | {min(seconds):.2f} | {evals.mean():.1f} | "
                  f"{' '.join(map(str, evals[0]))} |", flush=True)


def compare_paths(key: str, nodes: int) -> None:
    """What the frozen post-norm path changes: its converged scores against the live path's."""
    attr = Attributor(load_model(key), precision="fp32")
    prompts, targets = map(list, zip(*PROMPTS))
    frozen, live = (attr.attribute(prompts, targets, n_steps=nodes, rule="gausslegendre", post_norm=p)
                    for p in ("frozen", "live"))
    print(f"{MODELS.get(key, key)}, GL-{nodes} on each path: frozen against live")
    print("| prompt | rel. L2 | coarse-set Jaccard | coarse neurons (frozen, live) | top-10 overlap | "
          "coarse neurons' layers, frozen | live |")
    print("|---|---|---|---|---|---|---|")
    for (prompt, _), f, g in zip(PROMPTS, frozen, live):
        c, a, b = compare(f.scores, g.scores), coarse(f.scores), coarse(g.scores)
        top = lambda s: set(np.argsort(s, axis=None)[-10:].tolist())  # noqa: E731
        layers = lambda s: sorted({i // s.shape[1] for i in coarse(s)})  # noqa: E731
        print(f"| {prompt} | {c['l2']:.0%} | {c['jaccard']:.2f} | {len(a)}, {len(b)} | "
              f"{len(top(f.scores) & top(g.scores))}/10 | {layers(f.scores)} | {layers(g.scores)} |", flush=True)


def cpu_name() -> str:
    with contextlib.suppress(Exception):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--reference-nodes", type=int, default=128)
    ap.add_argument("--rules", default=",".join(f"{r}:{s}" for r, s in RULES))
    ap.add_argument("--live", action="store_true", help="Gemma 3: the live post-norm path too")
    ap.add_argument("--curve", default="", help="model:layer:post_norm,... P(alpha) at 65 trapezoid nodes")
    ap.add_argument("--timing", action="store_true", help="only seconds per prompt (best of 2), left 20, GL-6, auto")
    ap.add_argument("--compare-paths", default="", help="model: frozen against live, each its GL-N reference")
    ap.add_argument("--check-reference", default="", help="model:layer,... GL-2N against GL-N (N: --reference-nodes)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.timing:
        return timing(args.models.split(","))
    for spec in filter(None, args.check_reference.split(",")):
        key, layer = spec.split(":")
        attr = Attributor(load_model(key), precision="fp32")
        prompts, targets = map(list, zip(*PROMPTS))
        n = args.reference_nodes
        fine, ref = (attr.attribute(prompts, targets, n_steps=m, rule="gausslegendre", layers=[int(layer)])
                     for m in (2 * n, n))
        print(f"{MODELS.get(key, key)} layer {layer}: GL-{n} is " + ", ".join(
            f"{compare(r.scores, f.scores)['l2']:.1e}" for r, f in zip(ref, fine)) + f" from GL-{2 * n}")
    if args.check_reference:
        return None
    if args.compare_paths:
        return compare_paths(args.compare_paths, args.reference_nodes)
    rules = [(r, float(s) if r == "auto" else int(s)) for r, s in (x.split(":") for x in args.rules.split(","))]
    print(f"fp32, 1 thread, {cpu_name()}; torch {torch.__version__}; prompts: "
          + "; ".join(f"{p!r} -> {t!r}" for p, t in PROMPTS) + "\n")
    for key in filter(None, args.models.split(",")):
        lm = load_model(key)
        attr = Attributor(lm, precision="fp32")
        paths = ["frozen", "live"] if args.live and lm.adapter.post_ffn_norm else ["frozen"]
        for post_norm in paths:
            name = MODELS.get(key, key) + (f", post_norm={post_norm}" if lm.adapter.post_ffn_norm else "")
            ref, ref_s = run(attr, "gausslegendre", args.reference_nodes, post_norm)
            check, _ = run(attr, "gausslegendre", args.reference_nodes // 2, post_norm)
            drift = max(compare(c.scores, r.scores)["l2"] for c, r in zip(check, ref))
            print(f"### {name}: {lm.num_layers} layers x {ref[0].scores.shape[1]} neurons; reference GL-"
                  f"{args.reference_nodes} ({ref_s:.0f} s per prompt; GL-{args.reference_nodes // 2} is "
                  f"{drift:.1e} from it)\n")
            print("| rule | evaluations per (prompt, layer) | relative L2 per prompt | worst layer (rel. L2) "
                  "| coarse-set Jaccard | s per prompt | score_error >= real error |")
            print("|---|---|---|---|---|---|---|")
            for rule, steps in rules:
                res, seconds = run(attr, rule, steps, post_norm)
                cmp = [compare(r.scores, f.scores) for r, f in zip(res, ref)]
                evals = np.mean([r.evaluations.mean() for r in res])
                label = f"auto, tolerance {steps:g}" if rule == "auto" else f"{rule} {steps}"
                bound = "-"
                if rule == "auto":
                    est = np.concatenate([r.score_error for r in res])
                    real = np.concatenate([c["per_layer"] for c in cmp])
                    bound = f"{np.mean(est >= real):.0%} of layers"
                l2 = ", ".join(f"{c['l2']:.2%}" for c in cmp)
                worst = ", ".join(f"{c['worst']:.1%} (L{c['worst_layer']})" for c in cmp)
                jac = ", ".join(f"{c['jaccard']:.2f}" for c in cmp)
                print(f"| {label} | {evals:.1f} | {l2} | {worst} | {jac} | {seconds:.1f} | {bound} |", flush=True)
            print()
    for spec in filter(None, args.curve.split(",")):
        key, layer, post_norm = spec.split(":")
        attr = Attributor(load_model(key), precision="fp32")
        alphas, probs = curve(attr, int(layer), post_norm)
        print(f"P(alpha), {MODELS.get(key, key)} layer {layer}, {post_norm}, {PROMPTS[0][0]!r} -> {PROMPTS[0][1]!r}:")
        print(" ".join(f"{a:.4g}:{p:.3g}" for a, p in zip(alphas, probs)) + "\n")


if __name__ == "__main__":
    main()
