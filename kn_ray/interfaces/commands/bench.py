"""`kn-ray bench`: the engine against the published per-layer method on PARAREL prompts.

The model loads and batches as `kn-ray attribute` loads and batches it (the same placement
flags), in this process."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from kn_ray.choices import PAPER_STEPS
from kn_ray.fields import option
from kn_ray.interfaces import declared
from kn_ray.interfaces.commands import add_command
from kn_ray.placement import Placement

DEFAULT_PARAREL = Path("../shared/data/pararel")


@dataclass(frozen=True)
class BenchOptions:
    """What is timed; how each model loads is `Placement`'s (the flags of `kn-ray attribute`)."""

    models: tuple[str, ...] = option(("smollm2",), "model name/path, or a random-weight preset: bert-base-random, "
                                     "gpt2-small-random, llama3.2-1b-random, llama3-8b-random, qwen2.5-7b-random "
                                     "(repeatable)", flag="--model", action="extend", metavar="MODEL")
    facts: str | None = option(None, f"PARAREL dir or facts JSONL for prompts (default: {DEFAULT_PARAREL} if present, "
                                     "else the demo facts)")
    prompts: int = option(32, "prompts timed for the engine, batched as at corpus scale")
    published_prompts: int = option(8, "the first N of those prompts timed for the published method, one at a time")
    tokens: str = option("8-15", "prompt length window in model tokens, PARAREL-style")
    n_steps: int = option(PAPER_STEPS, "steps of the left Riemann sum, the same for the engine and the published method")
    device: str | None = option(None, "cuda or cpu (default: cuda when present)")
    json: str | None = option(None, "also write the rows as JSON here")

    @property
    def fact_source(self) -> Path:
        return Path(self.facts) if self.facts else DEFAULT_PARAREL if DEFAULT_PARAREL.is_dir() else _demo_facts()


def register(sub) -> None:
    p = add_command(sub, "bench", run, description=__doc__,
                    help="time the engine against the straightforward published method")
    declared.add_flags(p, BenchOptions)
    declared.add_flags(p, Placement, skip=("model",))


def run(args) -> int:
    import torch

    from kn_ray.engine import best_device
    from kn_ray.engine.bench import benchmark, markdown_table
    from kn_ray.engine.precision import resolve_dtype
    from kn_ray.engine.random_models import PRESETS, random_model

    from kn_ray.pipeline.facts import read_facts

    bench = declared.from_args(BenchOptions, args)
    device = bench.device or str(best_device())
    facts = bench.fact_source
    read_facts(facts).require(str(facts))
    low, high = token_window(bench.tokens)
    rows = []
    for name in bench.models:
        placement = declared.from_args(Placement, args, model=name).check()
        if name in PRESETS:
            dtype = resolve_dtype(placement.dtype, placement.precision, torch.device(device))
            lm = random_model(name, corpus_text(facts), device=device, dtype=dtype)
        else:
            lm = placement.load(device=device)
        lengths: list[int] = []  # of every candidate prompt, in model tokens

        def keep(spec) -> bool:
            lengths.append(_length(lm, spec.prompt, spec.target))
            return low <= lengths[-1] <= high

        prompts, targets = sample_prompts(facts, masked=lm.adapter.masked, n=bench.prompts, keep=keep)
        if not prompts:
            raise ValueError(outside_window(name, facts, bench.tokens, lengths))
        rows += benchmark(lm, prompts, targets, n_steps=bench.n_steps, precision=placement.precision,
                          published_prompts=bench.published_prompts, name=name, max_batch_prompts=placement.batch_cap)
        print(markdown_table(rows), flush=True)
    if bench.json:
        Path(bench.json).write_text(json.dumps([r.as_dict() for r in rows], indent=2))
    return 0


def token_window(text: str) -> tuple[int, int]:
    """--tokens LOW-HIGH as two ints."""
    try:
        low, high = (int(x) for x in text.split("-"))
    except ValueError:
        raise ValueError(f"--tokens {text!r}: expected LOW-HIGH, e.g. 8-15") from None
    if not 0 < low <= high:
        raise ValueError(f"--tokens {text!r}: expected 0 < LOW <= HIGH")
    return low, high


def outside_window(model: str, facts: Path, window: str, lengths: list[int]) -> str:
    """No candidate prompt fits --tokens: say so with the lengths the tokenizer gave them."""
    fits = sorted(n for n in lengths if n > 0)
    if not fits:
        return f"{facts}: none of the {len(lengths)} candidate prompts can be encoded by {model}'s tokenizer"
    counts = Counter(fits)
    shown = ", ".join(f"{n}" + (f" (x{c})" if c > 1 else "") for n, c in sorted(counts.items())[:16])
    more = ", ..." if len(counts) > 16 else ""
    unusable = f"; {len(lengths) - len(fits)} cannot be encoded" if len(fits) < len(lengths) else ""
    return (f"no prompt of {facts} falls in the token window {window} of {model}'s tokenizer: its {len(lengths)} "
            f"candidate prompts are {shown}{more} tokens long (prompt and target){unusable}. "
            f"Pass --tokens {fits[0]}-{fits[-1]} (all of them) or a window inside it.")


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
