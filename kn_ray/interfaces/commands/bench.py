"""`kn-ray bench`: the engine against the published per-layer method on PARAREL prompts."""

from __future__ import annotations

import json
from pathlib import Path

from kn_ray.interfaces import declared
from kn_ray.placement import Placement

DEFAULT_PARAREL = Path("../shared/data/pararel")


def register(sub) -> None:
    p = sub.add_parser("bench", help="time the engine against the straightforward published method",
                       description="The model loads and batches as `kn-ray attribute` loads and batches it "
                                   "(the same placement flags), in this process.")
    p.add_argument("--model", action="append", help="model name/path, or a random-weight preset: bert-base-random, "
                   "gpt2-small-random, llama3.2-1b-random, llama3-8b-random, qwen2.5-7b-random (repeatable; default: smollm2)")
    p.add_argument("--facts", type=Path, default=None, help=f"PARAREL dir or facts JSONL for prompts (default: {DEFAULT_PARAREL} if present, else the demo facts)")
    p.add_argument("--prompts", type=int, default=32, help="prompts timed for the engine, batched as at corpus scale (default 32)")
    p.add_argument("--published-prompts", type=int, default=8, help="the first N of those prompts timed for the published method, one at a time (default 8)")
    p.add_argument("--tokens", default="8-15", help="prompt length window in model tokens, PARAREL-style (default 8-15)")
    p.add_argument("--n-steps", type=int, default=20)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    declared.add_flags(p, Placement, skip=("model",))
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from kn_ray.engine import best_device
    from kn_ray.engine.bench import benchmark, markdown_table
    from kn_ray.engine.precision import resolve_dtype
    from kn_ray.engine.random_models import PRESETS, random_model

    device = args.device or str(best_device())
    facts = args.facts or (DEFAULT_PARAREL if DEFAULT_PARAREL.is_dir() else _demo_facts())
    rows = []
    for name in args.model or ["smollm2"]:
        placement = declared.from_args(Placement, args, model=name).check()
        if name in PRESETS:
            dtype = resolve_dtype(placement.dtype, placement.precision, torch.device(device))
            lm = random_model(name, corpus_text(facts), device=device, dtype=dtype)
        else:
            lm = placement.load(device=device)
        low, high = (int(x) for x in args.tokens.split("-"))
        prompts, targets = sample_prompts(facts, masked=lm.adapter.masked, n=args.prompts,
                                          keep=lambda s: low <= _length(lm, s.prompt, s.target) <= high)
        rows += benchmark(lm, prompts, targets, n_steps=args.n_steps, precision=placement.precision,
                          published_prompts=args.published_prompts, name=name, max_batch_prompts=placement.batch_cap)
        print(markdown_table(rows), flush=True)
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in rows], indent=2))
    return 0


def _demo_facts() -> Path:
    from importlib.resources import files

    return Path(str(files("kn_ray") / "data" / "demo_facts.jsonl"))


def _length(lm, prompt: str, target: str) -> int:
    from kn_ray.engine import SkipPrompt
    from kn_ray.engine.encoding import encode

    try:
        return encode(lm.tokenizer, prompt, target, masked=lm.adapter.masked).length
    except SkipPrompt:
        return -1


def sample_prompts(facts: Path, *, masked: bool, n: int, keep=lambda spec: True) -> tuple[list[str], list[str]]:
    """n prompts that pass `keep`, one fact per relation in turn, first template first (deterministic)."""
    from kn_ray.pipeline.facts import Filters, read_facts
    from kn_ray.pipeline.prompts import build_prompts

    specs = build_prompts(read_facts(facts, filters=Filters(max_facts_per_relation=4 * n)), masked=masked).prompts
    specs = [s for s in specs if s.status is None and keep(s)]
    by_relation: dict[str, list] = {}
    for spec in specs:
        by_relation.setdefault(spec.relation, []).append(spec)
    chosen, queues = [], [iter(v) for v in by_relation.values()]
    while len(chosen) < n and queues:
        for queue in list(queues):
            spec = next(queue, None)
            if spec is None:
                queues.remove(queue)
            elif len(chosen) < n:
                chosen.append(spec)
    return [s.prompt for s in chosen], [s.target for s in chosen]


def corpus_text(facts: Path) -> list[str]:
    """Text to train a benchmark tokenizer on: every filled template of the fact set."""
    from kn_ray.pipeline.facts import read_facts
    from kn_ray.pipeline.prompts import build_prompts

    specs = build_prompts(read_facts(facts), masked=True).prompts
    return [s.prompt.replace("[MASK]", s.object) for s in specs if s.status is None]
