"""Loading models the transformers way, placed with Accelerate, frozen for attribution."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapters import Adapter, adapter_for
from .hooks import offloaded
from .embedded import EMBEDDED, ensure_embedded, file_sha256, gguf_cache_path, gguf_to_safetensors
from .precision import dtype_name, resolve_dtype

PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


@dataclass
class LoadedModel:
    """A frozen model, its tokenizer and its family adapter."""

    model: nn.Module
    tokenizer: object
    adapter: Adapter
    name: str = "<in-memory>"
    source: str = "<in-memory>"
    revision: str | None = None

    @classmethod
    def from_objects(cls, model: nn.Module, tokenizer, name: str = "<in-memory>") -> "LoadedModel":
        """Wrap an already-built model and tokenizer (freezes the model)."""
        freeze(model)
        return cls(model, tokenizer, adapter_for(model), name=name, source=name)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's execution device (under Accelerate's device
        map or offload, parameters may sit on other devices or on `meta`)."""
        return input_device(self.model)

    @property
    def devices(self) -> list[torch.device]:
        """Every device that runs part of the model (one, unless a device map spreads it)."""
        return execution_devices(self.model)

    @property
    def head_device(self) -> torch.device:
        """Where the LM head runs."""
        return module_device(self.adapter.head_module(self.model))

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (of the first floating-point parameter)."""
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    @property
    def offloaded(self) -> bool:
        """True if some weights live off their execution device (CPU or disk offload)."""
        return offloaded(self.model)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers(self.model)

    @property
    def num_neurons(self) -> int:
        return self.adapter.num_neurons(self.model)


def best_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def load_model(
    name_or_path: str,
    *,
    device: str | torch.device | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dtype: str | torch.dtype = "auto",
    precision: str = "auto",
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load a checkpoint by hub id, local directory, `.gguf` file or embedded name (`smollm2`, `gemma3-270m`).

    Safetensors only unless `allow_pickle` (pickle weights can run code on load); remote code
    only if `trust_remote_code`. Eval mode, parameters frozen.

    `dtype` is the weights' dtype (auto | fp32 | bf16 | fp16, or a torch dtype); `auto` gives
    bf16 on a bf16-capable GPU when the compute `precision` is bf16 (or auto), else fp32.
    Placement is Accelerate's: the whole model on `device` (default cuda when present, else
    cpu), or, with `device_map` ("auto", "balanced", "sequential", or a dict) or any of
    `max_memory` ({0: "70GiB", "cpu": "200GiB"} or "0=70GiB,cpu=200GiB") / `offload_folder`,
    split over the visible GPUs, CPU memory and disk (`device_map` defaults to "auto" then).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    source = _resolve_source(name_or_path)
    local = Path(source)
    if local.is_dir() and not allow_pickle:
        _refuse_pickle(local)
    config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    adapter = adapter_for(config.model_type)
    auto_cls = AutoModelForMaskedLM if adapter.masked else AutoModelForCausalLM
    device = torch.device(device) if device is not None else best_device()
    max_memory = parse_max_memory(max_memory)
    if device_map is None:
        device_map = "auto" if (max_memory or offload_folder) else {"": str(device)}
    placement = dict(device_map=device_map)
    if max_memory:
        placement["max_memory"] = max_memory
    if offload_folder:
        placement["offload_folder"] = str(offload_folder)
    weights = resolve_dtype(dtype, precision, best_device() if isinstance(device_map, str) else device)
    model = auto_cls.from_pretrained(
        source,
        revision=revision,
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
        dtype=weights,
        **placement,
    )
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    rev = revision or getattr(config, "_commit_hash", None) or (weights_fingerprint(local) if local.is_dir() else None)
    return LoadedModel(freeze(model), tokenizer, adapter, name=name_or_path, source=source, revision=rev)


def parse_max_memory(value: str | dict | None) -> dict | None:
    """Accelerate's max_memory from "0=70GiB,1=70GiB,cpu=200GiB" (or a mapping): GPU indices
    become ints, sizes stay strings (Accelerate reads "70GiB", "500MB", bytes as ints)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        pairs = []
        for item in value.split(","):
            key, sep, size = item.partition("=")
            if not sep or not key.strip() or not size.strip():
                raise ValueError(f"max_memory takes device=size pairs like 0=70GiB,cpu=200GiB; got {item!r}")
            pairs.append((key.strip(), size.strip()))
        value = dict(pairs)
    if not isinstance(value, dict):
        raise ValueError(f"max_memory must be a mapping or device=size pairs, got {value!r}")
    out = {}
    for key, size in value.items():
        key = int(key) if isinstance(key, int) or str(key).isdigit() else str(key)
        if isinstance(key, str) and key not in ("cpu", "disk", "mps") and not key.startswith(("cuda", "xpu", "npu")):
            raise ValueError(f"max_memory: unknown device {key!r} (GPU index, cpu or disk)")
        out[key] = size
    return out


def _as_device(value) -> torch.device:
    return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)


def hook_device(module: nn.Module) -> torch.device | None:
    """The execution device of the Accelerate hook on `module`, if it has one."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    return None if device is None else _as_device(device)


def input_device(model: nn.Module) -> torch.device:
    """The device the input embedding runs on (its Accelerate hook's execution device, else its weight's)."""
    embed = model.get_input_embeddings()
    if (hooked := hook_device(embed)) is not None:
        return hooked
    device = embed.weight.device
    return torch.device("cpu") if device.type == "meta" else device


def module_device(module: nn.Module) -> torch.device:
    """Where a module runs: its (or its nearest hooked submodule's) Accelerate execution device,
    else its first resident parameter's device."""
    for sub in module.modules():
        if (hooked := hook_device(sub)) is not None:
            return hooked
    return next((p.device for p in module.parameters() if p.device.type != "meta"), torch.device("cpu"))


def execution_devices(model: nn.Module) -> list[torch.device]:
    """The devices computations run on: each Accelerate hook's execution device, and the
    devices of resident (non-meta) parameters. Offloaded parts run on their hook's device."""
    found = {input_device(model)}
    found.update(d for d in map(hook_device, model.modules()) if d is not None)
    found.update(p.device for p in model.parameters() if p.device.type != "meta")
    return sorted(found, key=str)


def _resolve_source(name_or_path: str) -> str:
    if name_or_path in EMBEDDED:
        return str(ensure_embedded(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        target = gguf_cache_path(path)
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            gguf_to_safetensors(path, target)
        return str(target)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file; pass a checkpoint directory, a .gguf file, a hub id or an embedded name ({', '.join(EMBEDDED)})")
        return str(path)
    return name_or_path  # a hub id; transformers resolves (and caches) it


def _refuse_pickle(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    pickles = [p.name for p in path.iterdir() if p.name in PICKLE_WEIGHTS or p.suffix in {".bin", ".pt", ".ckpt"}]
    if pickles:
        raise PermissionError(
            f"{path} holds only pickle weights ({', '.join(sorted(pickles))}), which can run code when loaded. "
            "Convert them to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust the source."
        )


def weights_fingerprint(path: Path) -> str:
    """A content hash of a local checkpoint's weight files (its 'revision' in run configs)."""
    digest = hashlib.sha256()
    for weights in sorted(path.glob("*.safetensors")):
        digest.update(weights.name.encode())
        digest.update(file_sha256(weights).encode())
    return "sha256:" + digest.hexdigest()[:16]
