"""Everything a pipeline run needs, declared and validated in one place.

Each option is declared once, here or in `kn_ray.placement` (how actors load the model, shared
with `kn-ray edit` and `kn-ray bench`), with `kn_ray.fields.option`: its default, help text, CLI
flag and job-spec key and section. `kn-ray attribute`'s flags and the job-spec schema
(`kn_ray.interfaces.jobs`) are derived from these declarations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from kn_ray.choices import (AUTO, CIRCUIT_RULE, N_STEPS, NOISE, NOISED_WEIGHTS, POST_NORM, POST_NORMS, RULE, RULES, STDEVS, TOLERANCE,
                            WEIGHT_STDEVS)
from kn_ray.fields import check_choices, int_or_auto, option
from kn_ray.placement import Placement

from .facts import FORMATS, Filters
from .known import ProbePolicy


@dataclass(frozen=True)
class KeepPolicy:
    """Which neurons get a row: score >= ratio x the prompt's max score (and > 0); or, dense,
    every score, one row per (prompt, layer) with the layer's scores as a list of `dense_dtype`.
    Activations: activation >= activation_ratio x the prompt's max activation (and > 0)."""

    ratio: float = option(0.1, "keep neurons with score >= R x the prompt's max", flag="--keep-ratio")
    dense: bool = option(False, "keep every score: one row per (prompt, layer), the layer's scores as a list")
    activation_ratio: float = option(0.5, "keep activations >= R x the prompt's max", flag="--activation-keep-ratio")
    dense_dtype: str = option("float32", "dense scores' type", choices=("float32", "float16"))

    def check(self) -> None:
        check_choices(self)
        for name in ("ratio", "activation_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"keep {name} must be in [0, 1], got {getattr(self, name)}")


EXECUTORS = ("ray", "local")  # executor.open_executor


@dataclass(frozen=True)
class Resources:
    """Where shards run (`executor`: Ray actors, or one worker in the driver's process). Actors: one per `Placement.gpus_per_worker` GPUs when the cluster has GPUs (unless that is
    0), else CPU actors of `cpus_per_worker` logical CPUs each (default: a node's CPUs in groups
    of at most 8, one multi-threaded actor per group), by default as many as the cluster's CPUs hold."""

    workers: int | None = option(None, "actors (default: one per GPU, else one per group of up to 8 CPUs of a node)",
                                 key="count", flag="--workers")
    cpus_per_worker: float | None = option(None, "logical CPUs per actor, each a torch thread (default: a node's CPUs "
                                                 "in groups of at most 8; with --workers, at most their share)",
                                           key="cpus", flag="--cpus-per-worker")
    in_flight: int = option(2, "shards queued per actor, so it never waits for the driver")
    max_attempts: int = option(3, "attempts per shard before it is failed")
    max_restarts: int = option(4, "Ray restarts of a crashed actor (reloads the model; -1: unlimited)")
    executor: str = option("ray", "ray: a pool of Ray actors ($RAY_ADDRESS, or a local Ray); local: one worker in "
                                  "this process, no Ray (same plan, commits and resume; for machines where Ray "
                                  "will not start, docs/pipeline.md)", choices=EXECUTORS)
    restart_wait: float = option(1800.0, "seconds to wait for a lost actor to come back (on a node that replaces "
                                         "its own, reloading the model) when no other actor is left; then the "
                                         "remaining shards fail")

    def check(self) -> None:
        check_choices(self)
        if self.executor == "local" and (self.workers or 1) > 1:
            raise ValueError(f"--executor local runs one worker, got workers={self.workers}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        for name in ("in_flight", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.restart_wait < 0:
            raise ValueError(f"restart_wait must be >= 0, got {self.restart_wait}")
        if self.max_restarts < -1:
            raise ValueError(f"max_restarts must be >= -1 (-1: unlimited), got {self.max_restarts}")

    @property
    def cpus_needed(self) -> float:
        """Logical CPUs a local Ray must declare so the actors asked for fit."""
        return (self.workers or 1) * (self.cpus_per_worker or 1)


@dataclass(frozen=True)
class TraceOptions:
    """`--mode trace`: causal tracing (ROME; kn_ray.engine.tracing, docs/tracing.md)."""

    samples: int = option(10, "trace: noisy runs per prompt (the restored P is their mean)", flag="--samples")
    noise: float = option(3.0, "trace: the subject's embedding noise, x the std of the input embeddings (ROME: 3)",
                          flag="--trace-noise")
    window: int = option(10, "trace: mlp/attn restored over this many layers around each layer at once (ROME: 10)",
                         flag="--window")
    kinds: tuple[str, ...] = option(("resid", "mlp", "attn"), "trace: states restored: resid (block output), "
                                    "mlp, attn (sublayer outputs)", choices=("resid", "mlp", "attn"), flag="--kinds")
    seed: int = option(0, "trace: seed of the noise (the same draws for every prompt)", flag="--trace-seed")

    def check(self) -> None:
        check_choices(self)
        if self.samples < 1 or self.window < 1 or not self.noise >= 0:
            raise ValueError(f"trace samples and window must be >= 1 and noise >= 0, got {self.samples}, "
                             f"{self.window}, {self.noise}")
        if not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"trace kinds must be distinct and not empty, got {list(self.kinds)}")

    def engine(self) -> dict:
        return dict(samples=self.samples, noise=self.noise, window=self.window, kinds=list(self.kinds), seed=self.seed)


MODES = ("neurons", "circuits", "trace")


@dataclass(frozen=True)
class RunOptions:
    placement: Placement = option(help="how each actor loads and runs the model (kn_ray.placement)")
    facts: str = option(help="PARAREL-layout dir, JSON Lines file (path or URI), or builtin:demo")
    output: str = option(help="output directory: a path or URI (file://, s3://, gs://, any pyarrow.fs/fsspec "
                              "filesystem)", aliases=("-o",))
    facts_format: str = option("auto", "facts format", key="format", choices=FORMATS)
    filters: Filters = option(factory=Filters, section="filters")
    probe: ProbePolicy = option(factory=ProbePolicy, section="probe")
    n_steps: int | str = option(N_STEPS, "integration steps, or auto (adaptive until the scores converge, see "
                                         "--tolerance; circuits: their own fixed rule)", section="attribution",
                                type=int_or_auto)
    rule: str | None = option(None, "quadrature rule of a fixed --n-steps (default: left, with 20 steps the paper's; "
                                    "circuits: gausslegendre)", choices=RULES,
                       section="attribution",
                       aliases=("--method",))
    tolerance: float = option(TOLERANCE, "--n-steps auto: each layer's estimated relative score error <= T, and its "
                                         "completeness residual <= T x |P - P(layer at baseline)|",
                              section="attribution")
    post_norm: str = option(POST_NORM, "models that normalise the FFN output (Gemma 2/3, OLMo 2): frozen holds its "
                                       "clean RMS along the path (docs/quadrature.md), live recomputes it",
                            choices=POST_NORMS, section="attribution")
    nt_samples: int = option(0, "smooth: average over K noisy copies (0: off); --noise says what they perturb",
                             section="attribution")
    noise: str = option("input", "what each copy perturbs: input embeddings (SmoothGrad), weights (NoiseGrad) or "
                                 "both (FusionGrad)", choices=NOISE, section="attribution")
    stdevs: float = option(STDEVS, "input noise per token, x its embedding's RMS", section="attribution")
    weight_stdevs: float = option(WEIGHT_STDEVS, "weight noise: each weight x N(1, S)", section="attribution")
    noised_weights: str = option("all", "weight noise on all weights, or above: from the scaled layer's block up",
                                 choices=NOISED_WEIGHTS, section="attribution")
    nt_seed: int = option(0, "seed of the noise", section="attribution")
    mode: str = option("neurons", "neurons: knowledge neurons (IG over FFN neurons); circuits: EAP-IG edges between "
                                  "the embeddings, heads, MLPs and logits against a corrupted subject (docs/circuits.md); "
                                  "trace: causal tracing, P(gold) with each state restored in a run with a noised "
                                  "subject (docs/tracing.md)",
                       section="attribution", choices=MODES)
    metric: str = option("logprob", "circuits: log P(gold), or logit_diff (gold vs the corrupted fact's object)",
                         section="attribution", choices=("logprob", "logit_diff"))
    top_edges: int = option(200, "circuits: edges kept per prompt in `edges` (largest |score|)", section="attribution")
    faithfulness_random: int = option(3, "circuits: random circuits per size on the faithfulness curve (0: no curve)",
                                      section="attribution")
    trace: TraceOptions = option(factory=TraceOptions, section="trace")
    keep: KeepPolicy = option(factory=KeepPolicy, section="keep")
    shard_size: int | None = option(None, "prompts per shard (default: sized to the input and the actors, 8 to 64; recorded in probe.json and reused on resume)", group="workers")
    resources: Resources = option(factory=Resources, section="workers")
    summary_facts: int = option(3, "facts whose top neurons the end-of-run summary prints", aliases=("--report-facts",))

    def __post_init__(self):
        """The mode's defaults: the rule (left for neurons, Gauss-Legendre for circuits, as the
        engines' own) and, for circuits, fp32 compute where the precision is auto and the weights
        are not asked to be half (`choices.CIRCUIT_RULE`)."""
        if self.rule is None:
            object.__setattr__(self, "rule", CIRCUIT_RULE if self.mode == "circuits" else RULE)
        p = self.placement
        if self.mode == "circuits" and isinstance(p, Placement) and p.precision == AUTO and p.dtype not in ("bf16", "fp16"):
            object.__setattr__(self, "placement", replace(p, precision="fp32"))

    def check(self) -> "RunOptions":
        check_choices(self)  # rule, noise, noised_weights, mode, metric, the keep policy's and placement's
        self.placement.check()
        if self.n_steps != AUTO and (isinstance(self.n_steps, (bool, str)) or self.n_steps < 1):
            raise ValueError(f"n_steps must be >= 1 or 'auto', got {self.n_steps!r}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}")
        if self.nt_samples < 0 or self.stdevs < 0:
            raise ValueError(f"nt_samples and stdevs must be >= 0, got {self.nt_samples}, {self.stdevs}")
        if not self.weight_stdevs >= 0:
            raise ValueError(f"weight_stdevs must be >= 0, got {self.weight_stdevs}")
        if self.mode == "circuits" and self.nt_samples:  # n_steps auto: the circuits engine's fixed default
            raise ValueError("circuits take no smoothing")
        if self.mode == "trace" and self.nt_samples:
            raise ValueError("trace takes no smoothing (--nt-samples): its noise is --samples / --trace-noise")
        if self.top_edges < 1 or self.faithfulness_random < 0:
            raise ValueError(f"top_edges must be >= 1 and faithfulness_random >= 0, got {self.top_edges}, "
                             f"{self.faithfulness_random}")
        if self.shard_size is not None and self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        for name in ("max_facts_per_relation", "max_templates"):
            value = getattr(self.filters, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.keep.check()
        self.trace.check()
        self.probe.check()
        self.resources.check()
        return self

    def attribution(self) -> dict:
        """The options that change the scores (the run's identity records them)."""
        return dict(n_steps=self.n_steps, rule=self.rule, precision=self.placement.precision, **self.engine_extra())

    def engine_extra(self) -> dict:
        """`Attributor.attribute` keywords beyond n_steps and rule, only where they apply."""
        if self.mode == "trace":
            return dict(mode=self.mode, **self.trace.engine())
        if self.mode == "circuits":
            return dict(mode=self.mode, metric=self.metric, top_edges=self.top_edges,
                        faithfulness_random=self.faithfulness_random)
        extra = dict(tolerance=self.tolerance) if self.n_steps == "auto" else {}
        if self.post_norm != POST_NORM:  # the default keeps the identity it had before the option existed
            extra.update(post_norm=self.post_norm)
        if self.nt_samples:  # input noise alone keeps the identity it had before weight noise existed
            extra.update(nt_samples=self.nt_samples, **({} if self.noise == "weights" else dict(stdevs=self.stdevs)),
                         nt_seed=self.nt_seed)
            if self.noise != "input":
                extra.update(noise=self.noise, weight_stdevs=self.weight_stdevs, noised_weights=self.noised_weights)
        return extra

    def as_dict(self) -> dict:
        return {f.name: asdict(v) if hasattr(v, "__dataclass_fields__") else v
                for f in fields(self) for v in [getattr(self, f.name)]}

