"""Peak host memory of attribution on a model several times larger than its memory cap.

A random llama of a few hundred MB (fp32) is saved as a checkpoint, then a fresh process loads
it with `max_memory={"cpu": CAP}` and a disk offload folder and attributes a few prompts. The
numbers reported: that process's peak RSS sampled every 5 ms above its RSS after importing
torch, transformers and kn_ray, and ru_maxrss above the import's ru_maxrss (a high-water mark:
import transients hide growth below them), next to the checkpoint's size and the cap.

    python benchmarks/offload_rss.py --cap 64MiB --layers 8 --hidden 768
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
import transformers
from kn_ray.engine import Attributor, load_model
from kn_ray.engine.bench import PeakMemory
torch.set_num_threads(int(sys.argv[4]))
def maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
path, cap, offload, warm = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[5]
kwargs = dict(max_memory={"cpu": cap}, offload_folder=offload) if cap != "none" else dict(device="cpu")
prompts, targets = ["the capital of france is", "paris is located in", "the city of rome is in"], [" paris", " italy", " italy"]
# warm-up on a one-layer model of the same family: lazy imports, kernels, allocator pools
Attributor(load_model(warm, dtype="fp32", **kwargs), precision="fp32").attribute(prompts, targets, n_steps=4)
import gc; gc.collect()
base = maxrss()
start = time.perf_counter()
with PeakMemory([torch.device("cpu")]) as memory:  # sampled RSS above the RSS after imports
    lm = load_model(path, dtype="fp32", **kwargs)
    loaded = memory.rss_peak - memory.base["cpu"]
    res = Attributor(lm, precision="fp32").attribute(prompts, targets, n_steps=4)
assert all(r.ok for r in res), [r.reason for r in res]
print(json.dumps(dict(maxrss_above_import=maxrss() - base, sampled_load=loaded, sampled_peak=memory.mb * 2**20,
                      seconds=time.perf_counter() - start, offloaded=lm.offloaded)))
"""


def build(path: Path, layers: int, hidden: int, vocab: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    words = "the capital of france is paris located in city rome italy".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]").save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measure(path: Path, warm: Path, cap: str, threads: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as offload:
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), cap, offload, str(threads), str(warm)],
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", default="64MiB", help="Accelerate max_memory for the CPU")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        size = build(Path(tmp) / "model", args.layers, args.hidden, args.vocab)
        build(Path(tmp) / "warm", 1, 128, args.vocab)
        for cap in ("none", args.cap):
            r = measure(Path(tmp) / "model", Path(tmp) / "warm", cap, args.threads)
            print(f"cap {cap}: checkpoint {size / mib:.0f} MiB, offloaded={r['offloaded']}: peak RSS above the RSS after "
                  f"imports {r['sampled_peak'] / mib:.0f} MiB ({r['sampled_load'] / mib:.0f} MiB while loading); "
                  f"ru_maxrss above the import peak {r['maxrss_above_import'] / mib:.0f} MiB; {r['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
