"""A safetensors checkpoint packed small enough to travel to a GPU machine with no network.

The device machine (docs/gpu-check.md) receives at most 64 MiB of files. SmolLM2-135M does
not fit in any exact form: the cached safetensors are 513 MiB, its GGUF (Q4_1 layers, Q8_0
embeddings) 94 MiB, and the Q4_1 nibbles are near their entropy already. So the weights are
re-quantised, lossily and on purpose: each row of a matrix to integer multiples of
`step` x its RMS (step 0.5: a uniform error of 0.5 / sqrt(12) = 14% of the row's RMS, about
twice the Q4_1 file's own), the integers bz2-compressed (~3.4 bits a weight). Vectors (norm
weights) stay exact. The unpacked model is a trained SmolLM2 with extra weight noise: the
same shapes and a trained model's activations and score distributions, not SmolLM2's exact
predictions (docs/gpu-check.md records how far they move).

    python benchmarks/packed_checkpoint.py ~/.cache/kn-ray/models/smollm2 .gpucheck/smollm2
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

INDEX = "pack.json"
DATA = "tensors.bin"
STEP = 0.5
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "chat_template.jinja", "SOURCE")


def pack(src: Path, dest: Path, step: float = STEP) -> dict:
    """Write `dest`/pack.json, tensors.bin and the compressed side files; returns the index."""
    from safetensors.numpy import load_file

    src, dest = Path(src).expanduser(), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tensors, offset = [], 0
    with open(dest / DATA, "wb") as out:
        for weights in sorted(src.glob("*.safetensors")):
            for name, array in load_file(weights).items():
                entry, blob = _pack_tensor(name, np.asarray(array, dtype=np.float32), step)
                out.write(blob)
                tensors.append(dict(entry, offset=offset, size=len(blob)))
                offset += len(blob)
    files = []
    for name in FILES:
        if (src / name).is_file():
            (dest / (name + ".bz2")).write_bytes(bz2.compress((src / name).read_bytes(), 9))
            files.append(name)
    index = dict(format=1, source=str(src), step=step, files=files, tensors=tensors)
    (dest / INDEX).write_text(json.dumps(index, indent=1))
    return index


def _pack_tensor(name: str, array: np.ndarray, step: float) -> tuple[dict, bytes]:
    entry = dict(name=name, shape=list(array.shape))
    if array.ndim != 2:  # norm weights and biases: exact
        return dict(entry, kind="raw"), bz2.compress(array.tobytes(), 9)
    scale = (step * np.sqrt(np.mean(array.astype(np.float64) ** 2, axis=1))).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(array / scale[:, None]), -127, 127).astype(np.int8)
    return dict(entry, kind="rows"), scale.tobytes() + bz2.compress(q.tobytes(), 9)


def is_packed(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def unpack(packed: Path, dest: Path) -> Path:
    """A loadable checkpoint directory (fp32 safetensors + config and tokenizer) at `dest`."""
    from safetensors.numpy import save_file

    packed, dest = Path(packed), Path(dest)
    index = json.loads((packed / INDEX).read_text())
    dest.mkdir(parents=True, exist_ok=True)
    blob = (packed / DATA).read_bytes()
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # bz2 releases the GIL
        arrays = dict(pool.map(lambda t: (t["name"], _unpack_tensor(t, blob[t["offset"]: t["offset"] + t["size"]])),
                               index["tensors"]))
    save_file(arrays, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for name in index["files"]:
        (dest / name).write_bytes(bz2.decompress((packed / (name + ".bz2")).read_bytes()))
    (dest / "PACKED").write_text(f"unpacked from {packed} (step {index['step']} x row RMS; lossy)\n")
    return dest


def _unpack_tensor(t: dict, blob: bytes) -> np.ndarray:
    shape = tuple(t["shape"])
    if t["kind"] == "raw":
        return np.frombuffer(bz2.decompress(blob), dtype=np.float32).reshape(shape).copy()
    scale = np.frombuffer(blob[: 4 * shape[0]], dtype=np.float32)
    q = np.frombuffer(bz2.decompress(blob[4 * shape[0]:]), dtype=np.int8).reshape(shape)
    return q.astype(np.float32) * scale[:, None]


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file()) / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="safetensors checkpoint directory")
    parser.add_argument("dest", type=Path, help="packed folder (keep it git-ignored, e.g. .gpucheck/smollm2)")
    parser.add_argument("--step", type=float, default=STEP, help=f"quantisation step in row RMS (default {STEP})")
    args = parser.parse_args(argv)
    if not any(Path(args.src).expanduser().glob("*.safetensors")):
        print(f"error: no *.safetensors in {args.src} (run `kn-ray fetch smollm2` first)", file=sys.stderr)
        return 2
    if args.dest.exists():
        shutil.rmtree(args.dest)
    index = pack(args.src, args.dest, args.step)
    print(f"packed {len(index['tensors'])} tensors into {args.dest}: {size_mib(args.dest):.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
