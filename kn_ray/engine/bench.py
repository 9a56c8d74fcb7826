"""Benchmark: the engine against the straightforward published method, same model, prompts and machine.

Reports prompts/s, peak memory, and achieved FLOP/s against a FLOP count of the work
(torch's FlopCounterMode counts the matmuls and attention of forward and backward).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from .attribution import Attributor
from .loading import LoadedModel
from .published import PublishedAttributor


@dataclass
class BenchRow:
    model: str
    method: str  # engine | published
    device: str
    precision: str
    n_steps: int
    prompts: int
    mean_tokens: float
    seconds_per_prompt: float
    prompts_per_second: float
    peak_memory_mb: float
    gflop_per_prompt: float
    achieved_gflops: float

    def as_dict(self) -> dict:
        return asdict(self)


class PeakMemory:
    """Peak memory above the starting level: CUDA allocator stats, or sampled process RSS on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval, self.peak = device, interval, 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.process = psutil.Process()
            self.base = self.peak = self.process.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self.thread.join()
        self.mb = max(0, self.peak - self.base) / 2**20


def _sync(device: torch.device) -> None:
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
) -> list[BenchRow]:
    """Time the engine on all prompts and the published method on the first `published_prompts`."""
    engine = Attributor(lm, precision=precision)
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
        with PeakMemory(lm.device) as memory:
            _sync(lm.device)
            start = time.perf_counter()
            fn(ps, ts)
            _sync(lm.device)
            seconds = time.perf_counter() - start
        flops = count_flops(lambda: fn(prompts[:1], targets[:1]))
        per_prompt = seconds / len(ps)
        rows.append(
            BenchRow(
                model=name, method=method, device=str(lm.device), precision=engine.precision, n_steps=n_steps,
                prompts=len(ps), mean_tokens=sum(tokens[: len(ps)]) / len(ps), seconds_per_prompt=per_prompt,
                prompts_per_second=1 / per_prompt, peak_memory_mb=memory.mb, gflop_per_prompt=flops / 1e9,
                achieved_gflops=flops / 1e9 / per_prompt,
            )
        )
    return rows


def speedup(rows: list[BenchRow]) -> float:
    by = {r.method: r for r in rows}
    return by["published"].seconds_per_prompt / by["engine"].seconds_per_prompt


def markdown_table(rows: list[BenchRow]) -> str:
    """One line per (model, method); speed-up is the published method's s/prompt over this row's."""
    head = "| model | method | device | precision | prompts | tokens | s/prompt | prompts/s | peak MB | GFLOP/prompt | GFLOP/s | speed-up |"
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        base = next((o.seconds_per_prompt for o in rows if o.model == r.model and o.method == "published"), float("nan"))
        cells = [
            r.model, r.method, r.device, r.precision, str(r.prompts), f"{r.mean_tokens:.1f}", f"{r.seconds_per_prompt:.3f}",
            f"{r.prompts_per_second:.3f}", f"{r.peak_memory_mb:.0f}", f"{r.gflop_per_prompt:.1f}", f"{r.achieved_gflops:.1f}",
            f"{base / r.seconds_per_prompt:.1f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
