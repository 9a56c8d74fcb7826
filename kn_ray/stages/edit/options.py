"""`kn-ray edit`'s options, declared once (defaults, help, flags): the CLI derives its flags from
them (kn_ray.interfaces.declared). Importing this module is cheap (no torch, no pandas)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kn_ray.fields import check_choices, option
from kn_ray.placement import names as placement_names

OPS = ("suppress", "amplify", "update", "erase")
ERASE_VALUES = ("zero", "unk")
DESTRUCTIVE_PPL_RATIO = 10.0  # update / erase: the default bound of a destructive edit (docs/experiments.md: why 10)


@dataclass(frozen=True)
class EditSettings:
    """What the experiments do; every result depends on these (edits.json records them)."""

    seed: int = option(0, "seed of every sample and random control")
    max_facts: int | None = option(None, "at most N facts per relation, a seeded sample (default: all)")
    control_prompts: int = option(10, "suppress/amplify: other-relation prompts per fact")
    ppl_facts: int = option(5, "update: facts sampled for the same- and other-relation perplexity")
    lambda1: float = option(1.0, "update: weight of the old object")
    lambda2: float = option(8.0, "update: weight of the new object")
    shared_share: float | None = option(0.1, "update: leave out the fact's neurons that more than this share of its "
                                             "relation's other facts also have (as the authors; "
                                             "--keep-shared-neurons: keep all)")
    erase_top: int = option(20, "erase: top relation neurons per relation")
    erase_other_prompts: int = option(500, "erase: other relations' prompts checked per relation")
    destructive_ppl_ratio: float = option(DESTRUCTIVE_PPL_RATIO,
                                          "update/erase: an edit whose perplexity on the prompts it should leave "
                                          "alone (other facts) grows more than this factor is destructive, and never "
                                          "counted a success")
    erase_value: str = option("zero", "erase: set value slots to zero or to the unknown token's embedding",
                              choices=ERASE_VALUES)

    def check(self) -> "EditSettings":
        for name in ("control_prompts", "ppl_facts", "erase_top", "erase_other_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.shared_share is not None and not 0 <= self.shared_share <= 1:
            raise ValueError(f"shared share must lie in [0, 1], got {self.shared_share}")
        if not self.destructive_ppl_ratio >= 1:
            raise ValueError(f"destructive ppl ratio must be >= 1, got {self.destructive_ppl_ratio}")
        if self.max_facts is not None and self.max_facts < 1:
            raise ValueError(f"max_facts must be >= 1, got {self.max_facts}")
        check_choices(self)
        return self


@dataclass(frozen=True)
class EditOptions:
    """Which edits run where: the ops, the selection and the workers. How the model loads is the
    run's `Placement` (run.json) with `placement`'s fields on top (`kn-ray edit` takes the same
    placement flags as `kn-ray attribute`)."""

    ops: tuple[str, ...] = option(OPS, "suppress, amplify, update, erase; repeat or comma-separate", flag="--op",
                                  choices=OPS, action="extend", metavar="OP")
    settings: EditSettings = option(factory=EditSettings)
    relations: tuple[str, ...] = option((), "only this relation (repeatable)", flag="--relation", action="extend",
                                        metavar="RELATION")
    fact_ids: tuple[str, ...] = option((), "only this fact (repeatable)", flag="--fact-id", action="extend",
                                       metavar="FACT_ID")
    unit_facts: int = option(16, "facts per work unit")
    workers: int | None = option(None, "Ray actors (default: one on the cluster at $RAY_ADDRESS when it is set, "
                                       "else none: this process)")
    local: bool = option(False, "run in this process, without Ray")
    placement: dict = field(default_factory=dict)  # Placement fields set on the command line; the rest: run.json's

    def check(self) -> "EditOptions":
        object.__setattr__(self, "ops", tuple(dict.fromkeys(self.ops)))  # --op a,b --op a: once each
        if not self.ops:
            raise ValueError(f"--op must name some of {', '.join(OPS)}; got none")
        check_choices(self)
        if (self.workers is not None and self.workers < 1) or self.unit_facts < 1:
            raise ValueError("workers and unit facts must be >= 1")
        unknown = sorted(set(self.placement) - set(placement_names()))
        if unknown:
            raise ValueError(f"unknown placement option(s): {', '.join(unknown)}")
        self.settings.check()
        return self
