"""Knowledge neurons from 2 prompts, with and without smoothing, against those from all prompts.

For PARAREL facts with >= 6 usable causal prompts (SmolLM2):

* reference: the paper's rule over all the fact's prompts (coarse: score >= t x the prompt's
  max, t = 0.2; knowledge neurons: coarse in >= max(p n, 3) prompts, p = 0.7);
* 2 prompts: the same rule on 2 seeded prompts of the fact (coarse in both: p 2 = 1.4 -> 2;
  the 3-prompt minimum cannot apply), plain and smoothed with K copies: SmoothGrad (input
  noise, --stdevs), NoiseGrad (weight noise, --weight-stdevs, --noised-weights) and FusionGrad
  (--fusion weight:input pairs);
* Jaccard, precision and recall against the reference (over facts whose reference is not
  empty), and the suppress effect: the mean relative change of P over all the fact's prompts
  when the found neurons are zeroed at the target position.

    PYTHONPATH=. python experiments/smoothing.py --facts 16 --samples 8 --stdevs 0.05,0.15 --layers 20-29
    PYTHONPATH=. python experiments/smoothing.py --facts 16 --samples 8 --stdevs= --weight-stdevs 0.2,0.1,0.05 \
        --fusion 0.1:0.15 --above 0.2 --layers 20-29

Each setting attributes every fact's 2 prompts in one call (the engine batches them); the time
column is that call's wall time against the plain one's (weight noise adds drawing K noisy
copies of the weights per call).
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import numpy as np

from kn_ray.engine import Attributor, Prober, load_model
from kn_ray.pipeline.facts import Filters, read_facts
from kn_ray.pipeline.prompts import build_prompts

T, P, MIN_PROMPTS = 0.2, 0.7, 3


def facts_with_prompts(path: str, n_facts: int, min_prompts: int, max_prompts: int, seed: int):
    """{fact_id: [(prompt, target)]}: n_facts facts with >= min_prompts causal prompts, spread over relations."""
    specs = [s for s in build_prompts(read_facts(path, "pararel", Filters()), masked=False).prompts if s.status is None]
    by_fact: dict[str, list] = {}
    for spec in specs:
        by_fact.setdefault(spec.fact_id, []).append(spec)
    rng = random.Random(seed)
    by_relation: dict[str, list] = {}
    for fact in sorted(by_fact):
        if len(by_fact[fact]) >= min_prompts:
            by_relation.setdefault(by_fact[fact][0].relation, []).append(fact)
    for facts in by_relation.values():
        rng.shuffle(facts)
    picked = []
    while len(picked) < n_facts and any(by_relation.values()):
        for r in sorted(by_relation):
            if by_relation[r] and len(picked) < n_facts:
                picked.append(by_relation[r].pop())
    return {f: [(s.prompt, s.target) for s in by_fact[f][:max_prompts]] for f in picked}


def knowledge_neurons(scores: list[np.ndarray], min_prompts: int, first_layer: int, p: float) -> set[tuple[int, int]]:
    counts = sum(((s >= T * s.max()) & (s > 0)).astype(int) for s in scores)
    need = max(p * len(scores), min_prompts) - 1e-9
    return {(int(l) + first_layer, int(n)) for l, n in zip(*np.nonzero(counts >= need))}


def scores_of(attr, pairs, **kw) -> list[np.ndarray]:
    res = attr.attribute([p for p, _ in pairs], [t for _, t in pairs], **kw)
    assert all(r.ok for r in res), [r.reason for r in res if not r.ok]
    return [r.scores for r in res]


def suppress_effect(prober, pairs, neurons, clean: dict) -> float:
    """`clean`: P before the edit, cached by the pairs (the same for every setting)."""
    prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
    if tuple(pairs) not in clean:
        clean[tuple(pairs)] = [r.gold_prob for r in prober.probe(prompts, targets)]
    before = clean[tuple(pairs)]
    after = [r.gold_prob for r in prober.probe(prompts, targets, neurons=[sorted(neurons)] * len(pairs), factor=0.0)]
    return float(np.mean([(a - b) / b for a, b in zip(after, before)]))


def ci(values, n_boot: int = 2000) -> str:
    """mean [2.5%, 97.5%] of a bootstrap over facts (NaNs dropped)."""
    v = np.asarray([x for x in values if not np.isnan(x)])
    if not len(v):
        return "n/a"
    boot = np.random.default_rng(0).choice(v, (n_boot, len(v))).mean(1)
    return f"{v.mean():.3f} [{np.quantile(boot, 0.025):.3f}, {np.quantile(boot, 0.975):.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pararel", default="/work/shared/data/pararel")
    ap.add_argument("--facts", type=int, default=12)
    ap.add_argument("--max-prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8, help="nt_samples K of the smoothed runs")
    ap.add_argument("--stdevs", default="0.05,0.1,0.2", help="SmoothGrad settings (input noise); empty: none")
    ap.add_argument("--weight-stdevs", default="", help="NoiseGrad settings (weight noise sigma); empty: none")
    ap.add_argument("--above", default="", help="NoiseGrad settings with noised_weights=above (sigmas); empty: none")
    ap.add_argument("--fusion", default="", help="FusionGrad settings, weight:input sigma pairs, comma-separated")
    ap.add_argument("--n-steps", type=int, default=6)
    ap.add_argument("--rule", default="gausslegendre")
    ap.add_argument("--layers", default="0-29", help="first-last layer scored (inclusive)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lo, hi = map(int, args.layers.split("-"))
    lm = load_model("smollm2")
    attr, prober = Attributor(lm, precision="fp32"), Prober(lm, precision="fp32")
    rule = dict(n_steps=args.n_steps, rule=args.rule, layers=list(range(lo, hi + 1)))
    facts = facts_with_prompts(args.pararel, args.facts, 6, args.max_prompts, args.seed)
    rng = random.Random(args.seed)
    settings = noise_settings(args)
    ps = sorted({P, 0.5}, reverse=True)  # the paper's share, and a looser one (more facts have a reference)
    rows = {(p, name): [] for p in ps for name, _ in settings}
    ref_effects, ref_sizes, n_prompts = {p: [] for p in ps}, {p: [] for p in ps}, []
    seconds = {name: 0.0 for name, _ in settings}
    start = time.perf_counter()
    # every fact's prompts in one call per setting: the engine batches them (a weight-noise draw is the
    # same for every prompt, so this equals fact-by-fact calls; input noise gets other, equally random draws)
    all_scores = iter(scores_of(attr, [pair for pairs in facts.values() for pair in pairs], **rule))
    refs, two, clean = {}, {}, {}
    for fact, pairs in facts.items():
        scores = [next(all_scores) for _ in pairs]
        refs[fact] = {p: knowledge_neurons(scores, MIN_PROMPTS, lo, p) for p in ps}
        n_prompts.append(len(pairs))
        if any(refs[fact].values()):
            two[fact] = rng.sample(pairs, 2)
    for fact in two:
        for p, ref in refs[fact].items():
            if ref:
                ref_sizes[p].append(len(ref))
                ref_effects[p].append(suppress_effect(prober, facts[fact], ref, clean))
    for name, smooth in settings:
        begin = time.perf_counter()
        scores = iter(scores_of(attr, [pair for pairs in two.values() for pair in pairs], **rule, **smooth))
        seconds[name] = time.perf_counter() - begin
        for fact in two:
            found = knowledge_neurons([next(scores), next(scores)], 2, lo, P)
            effect = suppress_effect(prober, facts[fact], found, clean) if found else 0.0
            for p, ref in refs[fact].items():
                if ref:
                    inter = len(found & ref)
                    rows[p, name].append(dict(jaccard=inter / len(found | ref), precision=inter / len(found) if found
                                              else np.nan, recall=inter / len(ref), size=len(found), suppress=effect))
        print(f"[{name}: {seconds[name]:.0f} s]", file=sys.stderr, flush=True)
        report(args, facts, n_prompts, ps, ref_sizes, ref_effects, rows, settings, seconds, start, sys.stderr)
    report(args, facts, n_prompts, ps, ref_sizes, ref_effects, rows, settings, seconds, start, sys.stdout)


def report(args, facts, n_prompts, ps, ref_sizes, ref_effects, rows, settings, seconds, start, out) -> None:
    lo, hi = map(int, args.layers.split("-"))
    say = lambda text="": print(text, file=out, flush=True)  # noqa: E731
    say(f"SmolLM2-135M, fp32, {args.rule}-{args.n_steps}, layers {lo}-{hi}, coarse t = {T}; {len(n_prompts)} of "
        f"{len(facts)} PARAREL facts with >= 6 causal prompts (at most {args.max_prompts} used, mean "
        f"{np.mean(n_prompts):.1f}); 2 seeded prompts per fact (knowledge neurons: coarse in both); seed {args.seed}; "
        f"{time.perf_counter() - start:.0f} s.\n")
    say("Mean over facts [95% bootstrap CI over facts]; precision over the facts where the 2-prompt set is not empty; "
        "Jaccard change: paired, against the plain 2-prompt run on the same facts.")
    plain = settings[0][0]
    for p in ps:
        say(f"\n**Reference: all prompts, p = {p}** (coarse in >= max({p} n, 3) prompts): {len(ref_sizes[p])} facts "
            f"with knowledge neurons, mean {np.mean(ref_sizes[p]) if ref_sizes[p] else 0:.1f} per fact; suppress effect "
            f"{ci(ref_effects[p])}.\n")
        say("| knowledge neurons from | copies | time | mean size | Jaccard | Jaccard change | precision | recall | "
            "suppress effect (all prompts) |")
        say("|---|---|---|---|---|---|---|---|---|")
        for name, smooth in settings:
            r = rows[p, name]
            if not r:
                continue
            col = lambda k: ci([x[k] for x in r])  # noqa: E731
            size = np.mean([x["size"] for x in r]) if r else np.nan
            change = ci([x["jaccard"] - y["jaccard"] for x, y in zip(r, rows[p, plain])]) if name != plain else "-"
            say(f"| {name} | {smooth.get('nt_samples', 1)} | {seconds[name] / max(seconds[plain], 1e-9):.1f}x | "
                f"{size:.1f} | {col('jaccard')} | {change} | {col('precision')} | {col('recall')} | {col('suppress')} |")


def noise_settings(args) -> list[tuple[str, dict]]:
    """(name, Attributor.attribute keywords): plain first, then each smoothed setting."""
    names = lambda text: [part for part in text.split(",") if part]  # noqa: E731
    common = dict(nt_samples=args.samples, nt_seed=args.seed)
    k = f"K={args.samples}"
    settings = [("2 prompts", {})]
    settings += [(f"SmoothGrad {k} stdevs={s}", dict(common, stdevs=float(s))) for s in names(args.stdevs)]
    settings += [(f"NoiseGrad {k} weight_stdevs={w}", dict(common, noise="weights", weight_stdevs=float(w)))
                 for w in names(args.weight_stdevs)]
    settings += [(f"FusionGrad {k} weight_stdevs={w} stdevs={s}",
                  dict(common, noise="both", weight_stdevs=float(w), stdevs=float(s)))
                 for w, s in (pair.split(":") for pair in names(args.fusion))]
    settings += [(f"NoiseGrad {k} weight_stdevs={w} above",
                  dict(common, noise="weights", weight_stdevs=float(w), noised_weights="above"))
                 for w in names(args.above)]
    return settings


if __name__ == "__main__":
    main()
