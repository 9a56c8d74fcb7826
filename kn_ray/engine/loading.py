"""Loading models the transformers way, placed with Accelerate, frozen for attribution."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapters import Adapter, adapter_for
from .embedded import EMBEDDED, ensure_embedded, file_sha256, gguf_cache_path, gguf_to_safetensors

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
        return next(self.model.parameters()).device

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
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a checkpoint by hub id, local directory, `.gguf` file or embedded name (`smollm2`).

    Safetensors only unless `allow_pickle` (pickle weights can run code on load); remote code
    only if `trust_remote_code`. Placed with Accelerate (`device_map`) on `device`, default cuda
    when present, else cpu; eval mode, parameters frozen.
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
    model = auto_cls.from_pretrained(
        source,
        revision=revision,
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
        dtype=dtype,
        device_map={"": str(device)},
    )
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    rev = revision or getattr(config, "_commit_hash", None) or (weights_fingerprint(local) if local.is_dir() else None)
    return LoadedModel(freeze(model), tokenizer, adapter, name=name_or_path, source=source, revision=rev)


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
            raise ValueError(f"{path} is a file; pass a checkpoint directory, a .gguf file, a hub id or 'smollm2'")
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
