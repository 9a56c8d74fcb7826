"""Benchmark: the engine against the straightforward published method, same model, prompts and machine.

Reports prompts/s, peak memory per device, and achieved FLOP/s against a FLOP count of the
work (torch's FlopCounterMode counts the matmuls and attention of forward and backward).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from .attribution import Attributor
from .loading import LoadedModel
from .precision import dtype_name
from .published import PublishedAttributor


@dataclass
class BenchRow:
    model: str
    method: str  # engine | published
    device: str
    precision: str  # compute (autocast)
    dtype: str  # weights
    n_steps: int
    prompts: int
    mean_tokens: float
    seconds_per_prompt: float
    prompts_per_second: float
    peak_memory_mb: float
    gflop_per_prompt: float
    achieved_gflops: float
    peak_memory_mb_by_device: dict = field(default_factory=dict)  # above the starting level, per device

    def as_dict(self) -> dict:
        return asdict(self)


class PeakMemory:
    """Peak memory above the starting level, per device: CUDA allocator stats of every GPU in
    `devices`, and sampled process RSS for the CPU. `mb` is the largest of them."""

    def __init__(self, devices: list[torch.device], interval: float = 0.005):
        self.devices, self.interval = devices, interval
        self.gpus = [d for d in devices if d.type == "cuda"]
        self._stop = threading.Event()

    def __enter__(self):
        self.base = {}
        for d in self.gpus:
            torch.cuda.synchronize(d)
            torch.cuda.reset_peak_memory_stats(d)
            self.base[str(d)] = torch.cuda.memory_allocated(d)
        if len(self.gpus) < len(self.devices):
            self.process = psutil.Process()
            self.base["cpu"] = self.rss_peak = self.process.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.rss_peak = max(self.rss_peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        peaks = {}
        for d in self.gpus:
            torch.cuda.synchronize(d)
            peaks[str(d)] = torch.cuda.max_memory_allocated(d)
        if "cpu" in self.base:
            self._stop.set()
            self.thread.join()
            peaks["cpu"] = self.rss_peak
        self.by_device = {k: max(0, v - self.base[k]) / 2**20 for k, v in peaks.items()}
        self.mb = max(self.by_device.values())


def _sync(devices: list[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def benchmark(
    lm: LoadedModel,
    prompts: list[str],
    targets: list[str],
    *,
    n_steps: int = 20,
    precision: str = "fp32",
    published_prompts: int = 2,
    name: str | None = None,
    max_batch_prompts: int | None = None,
) -> list[BenchRow]:
    """Time the engine on all prompts and the published method on the first `published_prompts`."""
    engine = Attributor(lm, precision=precision, max_batch_prompts=max_batch_prompts)
    published = PublishedAttributor(lm, precision=engine.precision)
    name = name or lm.name
    tokens = [engine.encode(p, t).length for p, t in zip(prompts, targets)]
    engine.attribute(prompts[:1], targets[:1], n_steps=2)  # warm-up: allocator, kernels, caches

    def run_engine(ps, ts):
        engine.attribute(ps, ts, n_steps=n_steps)

    def run_published(ps, ts):
        for p, t in zip(ps, ts):
            published.attribute_one(p, t, n_steps=n_steps)

    k = max(1, min(published_prompts, len(prompts)))
    rows = []
    for method, fn, ps, ts in (
        ("engine", run_engine, prompts, targets),
        ("published", run_published, prompts[:k], targets[:k]),
    ):
        with PeakMemory(lm.devices) as memory:
            _sync(lm.devices)
            start = time.perf_counter()
            fn(ps, ts)
            _sync(lm.devices)
            seconds = time.perf_counter() - start
        if method == "engine":
            flops = count_flops(lambda: fn(prompts[:1], targets[:1]))
        else:  # a layer's cost is linear in its index (backward stops at it): the first and last give the sum
            first, last = (count_flops(lambda layer=layer: published.attribute_one(
                prompts[0], targets[0], n_steps=n_steps, layers=[layer])) for layer in (0, lm.num_layers - 1))
            flops = lm.num_layers * (first + last) // 2
        per_prompt = seconds / len(ps)
        rows.append(
            BenchRow(
                model=name, method=method, device=",".join(map(str, lm.devices)), precision=engine.precision,
                dtype=dtype_name(lm.dtype), n_steps=n_steps,
                prompts=len(ps), mean_tokens=sum(tokens[: len(ps)]) / len(ps), seconds_per_prompt=per_prompt,
                prompts_per_second=1 / per_prompt, peak_memory_mb=memory.mb, gflop_per_prompt=flops / 1e9,
                achieved_gflops=flops / 1e9 / per_prompt, peak_memory_mb_by_device=memory.by_device,
            )
        )
    return rows


def markdown_table(rows: list[BenchRow]) -> str:
    """One line per (model, method); speed-up is the published method's s/prompt over this row's."""
    head = ("| model | method | device | weights | precision | prompts | tokens | s/prompt | prompts/s | peak MB "
            "| GFLOP/prompt | GFLOP/s | speed-up |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        base = next((o.seconds_per_prompt for o in rows if o.model == r.model and o.method == "published"), float("nan"))
        cells = [
            r.model, r.method, r.device, r.dtype, r.precision, str(r.prompts), f"{r.mean_tokens:.1f}", f"{r.seconds_per_prompt:.3f}",
            f"{r.prompts_per_second:.3f}", " ".join(f"{k}:{v:.0f}" for k, v in r.peak_memory_mb_by_device.items()), f"{r.gflop_per_prompt:.1f}", f"{r.achieved_gflops:.1f}",
            f"{base / r.seconds_per_prompt:.1f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
