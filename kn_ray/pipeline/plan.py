"""Deterministic shards: consecutive runs of whole facts, about `shard_size` prompts each.

The prompts arrive sorted (see `build_prompts`), so the same input and options give the
same shards, which is what makes a re-run resume instead of recompute. A fact's prompts
never split across shards: a shard is the unit of retry and of exactly-once output.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .layout import shard_name
from .prompts import PromptSpec


@dataclass(frozen=True)
class Shard:
    shard_id: int
    prompts: tuple[PromptSpec, ...]
    group: str | None = None  # the probe stage's shards are a group of their own (layout.PROBE_GROUP)

    @property
    def name(self) -> str:
        return shard_name(self.shard_id, self.group)

    def __len__(self) -> int:
        return len(self.prompts)


MAX_AUTO_SHARD = 64  # prompts; a shard is also the unit of retry
MIN_AUTO_SHARDS = 64  # enough shards that every actor of a mid-size cluster gets work
SHARDS_PER_ACTOR = 4  # a big cluster: about this many shards per actor, while they hold an engine batch
BATCH_SHARD = 32  # prompts: one CPU engine batch (engine.model_runner.CPU_BATCH_PROMPTS), whose rows share each pass
MIN_AUTO_SHARD = 8  # prompts: the floor; an engine call's fixed cost is then ~40% of a shard on a CPU


def auto_shard_size(n_prompts: int, actors: int = 1) -> int:
    """The default shard size, for `n_prompts` on a pool of `actors`.

    Input for at least two full engine batches per actor (or one actor): about
    max(64, 4 x actors) shards, of one engine batch (32 prompts, whose rows share every pass) to
    64 prompts, so at least two per actor. A smaller input gets one shard per actor, of at least
    8 prompts: an idle actor costs the run a whole shard's time, a smaller shard only one engine
    call's fixed cost; two or more per actor would buy no balancing (each actor is handed
    `in_flight` = 2 shards at once) and cost that fixed cost again per shard (BENCHMARKS.md,
    "Shard size and the actors"). One actor gets the sizes the input alone gave before.

    The size depends on the actor count, so the driver records the size it chose in probe.json
    (`attribution_plan`) and a re-run reuses it: a resume on another cluster plans the same shards."""
    actors = max(1, actors)
    if n_prompts >= 2 * BATCH_SHARD * actors or actors == 1:
        target = max(MIN_AUTO_SHARDS, SHARDS_PER_ACTOR * actors)
        return max(BATCH_SHARD, min(MAX_AUTO_SHARD, -(-n_prompts // target)))
    return max(MIN_AUTO_SHARD, min(BATCH_SHARD, -(-n_prompts // actors)))


def plan_shards(prompts: list[PromptSpec], shard_size: int, *, first_id: int = 0, group: str | None = None) -> list[Shard]:
    """Consecutive runs of whole facts, numbered from `first_id`."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    shards, current = [], []
    for i, spec in enumerate(prompts):
        current.append(spec)
        next_fact = prompts[i + 1].fact_id if i + 1 < len(prompts) else None
        if len(current) >= shard_size and (next_fact != spec.fact_id or not spec.fact_id):
            shards.append(Shard(first_id + len(shards), tuple(current), group))
            current = []
    if current:
        shards.append(Shard(first_id + len(shards), tuple(current), group))
    return shards


def fingerprint(shards: list[Shard]) -> str:
    """A hash of everything the plan computes: which prompt, which text and target, in which shard."""
    digest = hashlib.sha256()
    for shard in shards:
        for spec in shard.prompts:
            digest.update("\x1f".join([str(shard.shard_id), spec.prompt_id, spec.prompt, spec.target, spec.status or ""]).encode(
                "utf-8", "surrogatepass"))
            digest.update(b"\x1e")
    return "sha256:" + digest.hexdigest()[:16]
