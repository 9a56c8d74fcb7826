"""Everything a pipeline run needs, validated in one place (the CLI and job specs build it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from kn_ray.choices import DTYPES, PRECISIONS

from .facts import FORMATS, Filters


@dataclass(frozen=True)
class KeepPolicy:
    """Which neurons get a row: score >= ratio x the prompt's max score (and > 0); or, dense,
    every score, one row per (prompt, layer) with the layer's scores as a list of `dense_dtype`.
    Activations: activation >= activation_ratio x the prompt's max activation (and > 0)."""

    ratio: float = 0.1
    dense: bool = False
    activation_ratio: float = 0.5
    dense_dtype: str = "float32"  # or float16

    def check(self) -> None:
        if self.dense_dtype not in ("float32", "float16"):
            raise ValueError(f"keep dense_dtype must be float32 or float16, got {self.dense_dtype!r}")
        for name in ("ratio", "activation_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"keep {name} must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class Resources:
    """Actors: one per GPU when the cluster has GPUs (unless `gpus_per_worker` is 0), else
    CPU actors of `cpus_per_worker` logical CPUs each, by default as many as the cluster's CPUs hold."""

    workers: int | None = None  # None: one per GPU, else one per `cpus_per_worker` CPUs of the cluster
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 if the cluster has GPUs, else 0
    in_flight: int = 2  # shards queued per actor, so it never waits for the driver
    max_attempts: int = 3  # a shard is failed after this many failed attempts
    max_restarts: int = 4  # Ray restarts of a crashed actor (reloads the model)

    def check(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        for name in ("in_flight", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_restarts < -1:
            raise ValueError(f"max_restarts must be >= -1 (-1: unlimited), got {self.max_restarts}")


@dataclass(frozen=True)
class RunOptions:
    model: str
    facts: str
    output: str
    facts_format: str = "auto"
    filters: Filters = field(default_factory=Filters)
    n_steps: int | str = 20  # or "auto" (adaptive, to `tolerance`)
    method: str = "left"
    tolerance: float = 0.01  # n_steps="auto": completeness residual <= tolerance x |P - P(baseline)|
    nt_samples: int = 0  # > 0: smoothed, the mean over this many copies with noisy input embeddings
    stdevs: float = 0.1  # ... noise per token, relative to its embedding's RMS
    nt_seed: int = 0
    precision: str = "auto"
    dtype: str = "auto"  # weights: auto = bf16 on bf16 GPUs when precision is bf16/auto, else fp32
    max_memory: dict | None = None  # Accelerate's max_memory per actor: {0: "70GiB", "cpu": "200GiB"}
    offload_dir: str | None = None  # offload to disk what fits nowhere else (per actor, a local path)
    keep: KeepPolicy = field(default_factory=KeepPolicy)
    shard_size: int | None = None  # None: plan.auto_shard_size
    batch_prompts: int = 32
    revision: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    resources: Resources = field(default_factory=Resources)
    report_facts: int = 3  # facts whose top neurons the end-of-run report shows

    def check(self) -> "RunOptions":
        from kn_ray.engine.quadrature import AUTO, METHODS

        if self.facts_format not in FORMATS:
            raise ValueError(f"facts format must be one of {', '.join(FORMATS)}, got {self.facts_format!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_memory is not None:
            from kn_ray.engine.loading import parse_max_memory

            object.__setattr__(self, "max_memory", parse_max_memory(self.max_memory))
        if self.n_steps != AUTO and (isinstance(self.n_steps, (bool, str)) or self.n_steps < 1):
            raise ValueError(f"n_steps must be >= 1 or 'auto', got {self.n_steps!r}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}")
        if self.nt_samples < 0 or self.stdevs < 0:
            raise ValueError(f"nt_samples and stdevs must be >= 0, got {self.nt_samples}, {self.stdevs}")
        for name in ("shard_size", "batch_prompts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_facts_per_relation", "max_templates"):
            value = getattr(self.filters, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.keep.check()
        self.resources.check()
        return self

    def attribution(self) -> dict:
        """The options that change the scores (the run's identity records them)."""
        return dict(n_steps=self.n_steps, method=self.method, precision=self.precision, **self.engine_extra())

    def engine_extra(self) -> dict:
        """`Attributor.attribute` keywords beyond n_steps and method, only where they apply."""
        extra = dict(tolerance=self.tolerance) if self.n_steps == "auto" else {}
        if self.nt_samples:
            extra.update(nt_samples=self.nt_samples, stdevs=self.stdevs, nt_seed=self.nt_seed)
        return extra

    def as_dict(self) -> dict:
        return {f.name: asdict(v) if hasattr(v, "__dataclass_fields__") else v
                for f in fields(self) for v in [getattr(self, f.name)]}
