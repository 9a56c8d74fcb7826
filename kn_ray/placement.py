"""How an actor loads and runs a model, declared once for every command.

`Placement` is frozen and picklable: the driver builds it from the declared options (the CLI
flags of `attribute`, `edit` and `bench`, a job spec's keys, or what run.json recorded) and
each Ray actor loads its own copy of the model from it. Importing this module is cheap (no
torch); `load()` imports the engine.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace

from kn_ray.choices import AUTO, DEVICE_MAPS, DTYPES, PRECISIONS
from kn_ray.fields import check_choices, int_or_auto, option

GROUP = "model placement"


@dataclass(frozen=True)
class Placement:
    """The model, its weights' dtype and compute precision, where its weights go (one device,
    or Accelerate's device map over the actor's GPUs, CPU memory and disk), how many GPUs and
    torch threads an actor gets, how many prompts a batch holds, and what loading may run."""

    model: str = option(help="hub id, checkpoint dir, .gguf file or embedded name (smollm2, gemma3-270m)", group=GROUP)
    revision: str | None = option(None, "model revision (hub)", group=GROUP)
    dtype: str = option("auto", "weights (auto: bf16 on bf16 GPUs when precision is bf16/auto, else fp32)",
                        choices=DTYPES, group=GROUP)
    precision: str = option("auto", "compute (autocast)", choices=PRECISIONS, section="attribution", group=GROUP)
    device_map: str | None = option(None, "Accelerate's device map (default: auto when an actor has several GPUs, "
                                          "max_memory or offload_dir, else the whole model on one device)",
                                    choices=DEVICE_MAPS, group=GROUP)
    max_memory: dict | None = option(None, "per actor, Accelerate's max_memory as device=size pairs: "
                                           "0=70GiB,1=70GiB,cpu=200GiB", types=(dict, str), group=GROUP, type=str)
    offload_dir: str | None = option(None, "per actor, offload to this local directory what fits nowhere else",
                                     group=GROUP)
    gpus_per_worker: float | None = option(None, "GPUs per actor (default: 1 if the cluster has GPUs; more than 1 "
                                                 "splits the model over them)", key="gpus", flag="--gpus-per-worker",
                                           section="workers", group=GROUP)
    threads: int | None = option(None, "torch threads per actor (default: its logical CPUs on CPU actors)",
                                 flag="--threads-per-worker", section="workers", group=GROUP)
    batch_prompts: int | str = option(AUTO, "prompts per engine batch: auto (sized to the device's memory) or a cap",
                                      section="attribution", group=GROUP, type=int_or_auto)
    allow_pickle: bool = option(False, "allow pickle weights (trusted sources)", group=GROUP)
    trust_remote_code: bool = option(False, "run the model repository's own code (trusted sources)", group=GROUP)

    def check(self) -> "Placement":
        """Validate; max_memory becomes Accelerate's mapping (GPU indices as ints)."""
        check_choices(self)
        if self.max_memory is not None:
            from kn_ray.engine.loading import parse_max_memory

            object.__setattr__(self, "max_memory", parse_max_memory(self.max_memory))
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        b = self.batch_prompts
        if b != AUTO and (isinstance(b, (bool, str)) or b < 1):
            raise ValueError(f"batch_prompts must be >= 1 or 'auto', got {b!r}")
        return self

    @property
    def batch_cap(self) -> int | None:
        """The engine's `max_batch_prompts`: None lets it size batches to the device."""
        return None if self.batch_prompts == AUTO else self.batch_prompts

    def for_actor(self, threads: int | None) -> "Placement":
        """This placement in an actor given `threads` CPUs (an explicit `threads` wins), at most
        one torch thread per CPU this process may run on (Ray's logical CPUs can exceed them)."""
        if threads and hasattr(os, "sched_getaffinity"):
            threads = min(threads, len(os.sched_getaffinity(0)))
        return replace(self, threads=self.threads or threads)

    def load(self, device=None):
        """The model as this placement loads it (`kn_ray.engine.LoadedModel`); `device`: the whole
        model on that device, unless a device map spreads it."""
        import torch

        from kn_ray.engine import load_model

        if self.threads:
            torch.set_num_threads(self.threads)
        several = (self.gpus_per_worker or 0) > 1  # an actor of several GPUs splits the model over them
        return load_model(self.model, device=device, revision=self.revision, allow_pickle=self.allow_pickle,
                          trust_remote_code=self.trust_remote_code, dtype=self.dtype, precision=self.precision,
                          device_map=self.device_map or ("auto" if several else None), max_memory=self.max_memory,
                          offload_folder=self.offload_dir)

    def as_dict(self) -> dict:
        return asdict(self)


def names() -> tuple[str, ...]:
    """Placement's field names (the keys of an override mapping)."""
    return tuple(f.name for f in fields(Placement))
