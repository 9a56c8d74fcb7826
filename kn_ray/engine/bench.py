"""Benchmark: the engine against the straightforward published method, same model, prompts and machine.

Reports prompts/s, peak memory per device, and achieved FLOP/s against a FLOP count of the
work (torch's FlopCounterMode counts the matmuls and attention of forward and backward), and
on a GPU whose peak is known, the model FLOP utilisation (MFU: achieved over peak).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from kn_ray.choices import PAPER_STEPS

from .attribution import Attributor
from .loading import LoadedModel
from .precision import dtype_name
from .published import PublishedAttributor


@dataclass
class BenchRow:
    model: str
    implementation: str  # engine | published
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
    timer: str = "host clock"  # host clock | cuda events
    peak_tflops: float | None = None  # the device's dense peak at this precision (PEAK_TFLOPS), if known
    mfu: float | None = None  # achieved FLOP/s over that peak

    def as_dict(self) -> dict:
        return asdict(self)


class PeakMemory:
    """Peak memory above the starting level, per device: CUDA allocator stats of every GPU in
    `devices`, and sampled process RSS for the CPU. `mb` is the largest of them. Measurements
    nest: one opened inside another resets the allocator's peak counters, so the outer one
    keeps the peak seen so far first."""

    _open: list["PeakMemory"] = []

    def __init__(self, devices: list[torch.device], interval: float = 0.005):
        self.devices, self.interval = devices, interval
        self.gpus = [d for d in devices if d.type == "cuda"]
        self._stop = threading.Event()

    def __enter__(self):
        self.base, self.seen = {}, {}
        for outer in PeakMemory._open:
            outer._fold()
        for d in self.gpus:
            torch.cuda.synchronize(d)
            torch.cuda.reset_peak_memory_stats(d)
            self.base[str(d)] = torch.cuda.memory_allocated(d)
        if len(self.gpus) < len(self.devices):
            self.process = psutil.Process()
            self.base["cpu"] = self.rss_peak = self.process.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        PeakMemory._open.append(self)
        return self

    def _fold(self):
        for d in self.gpus:
            self.seen[str(d)] = max(self.seen.get(str(d), 0), torch.cuda.max_memory_allocated(d))

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.rss_peak = max(self.rss_peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        PeakMemory._open.remove(self)
        for d in self.gpus:
            torch.cuda.synchronize(d)
        self._fold()
        peaks = dict(self.seen)
        if "cpu" in self.base:
            self._stop.set()
            self.thread.join()
            peaks["cpu"] = self.rss_peak
        self.by_device = {k: max(0, v - self.base[k]) / 2**20 for k, v in peaks.items()}
        self.mb = max(self.by_device.values())


# Dense (no sparsity) peak TFLOP/s by GPU and compute precision, from NVIDIA's datasheets: H100
# SXM5 and H200 SXM: BF16/FP16 tensor core 989 (1,979 with sparsity), FP32 67 (no tensor cores;
# torch's fp32 matmuls stay off TF32 by default); H100 PCIe 756 / 51; H100 NVL and H200 NVL 835 / 60;
# A100 312 / 19.5. First match of a substring of torch.cuda.get_device_name wins.
PEAK_TFLOPS = (
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
)


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The datasheet peak of a GPU at a compute precision; None on CPUs and unlisted GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks.get(precision) for key, peaks in PEAK_TFLOPS if key in name), None)


class Stopwatch:
    """Seconds of the work inside the block: between CUDA events on the input device's stream
    when it is a GPU, else on the host clock; every device is synchronised on both ends."""

    def __init__(self, devices: list[torch.device]):
        self.devices = devices
        self.gpu = devices[0] if devices and devices[0].type == "cuda" else None
        self.timer = "cuda events" if self.gpu is not None else "host clock"

    def __enter__(self):
        _sync(self.devices)
        self.start = time.perf_counter()
        if self.gpu is not None:
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            self.events[0].record(torch.cuda.current_stream(self.gpu))
        return self

    def __exit__(self, *exc):
        if self.gpu is not None:
            self.events[1].record(torch.cuda.current_stream(self.gpu))
        _sync(self.devices)
        self.seconds = time.perf_counter() - self.start
        if self.gpu is not None:
            self.seconds = self.events[0].elapsed_time(self.events[1]) / 1e3


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
    n_steps: int = PAPER_STEPS,
    precision: str = "fp32",
    published_prompts: int = 2,
    name: str | None = None,
    max_batch_prompts: int | None = None,
    warmup_prompts: int = 1,
    flop_prompts: int = 1,
    budget_s: float | None = None,
) -> list[BenchRow]:
    """Time the engine on all prompts and the published method on the first `published_prompts`.

    A warm-up attributes the first `warmup_prompts` (allocator, kernels, library handles); with
    `budget_s`, the engine then times only as many prompts as the warm-up's pace fits in 70% of
    it. FLOPs per prompt are the mean over the first `flop_prompts`, each counted alone.
    """
    engine = Attributor(lm, precision=precision, max_batch_prompts=max_batch_prompts)
    published = PublishedAttributor(lm, precision=engine.precision)
    name = name or lm.name
    tokens = [engine.encode(p, t).length for p, t in zip(prompts, targets)]
    w = max(1, min(warmup_prompts, len(prompts)))
    with Stopwatch(lm.devices) as warm:
        engine.attribute(prompts[:w], targets[:w], n_steps=n_steps)
    published.attribute_one(prompts[0], targets[0], n_steps=n_steps, layers=[lm.num_layers - 1])
    if budget_s is not None:
        n = max(1, min(len(prompts), int(0.7 * budget_s * w / warm.seconds)))
        prompts, targets = prompts[:n], targets[:n]

    def run_engine(ps, ts):
        engine.attribute(ps, ts, n_steps=n_steps)

    def run_published(ps, ts):
        for p, t in zip(ps, ts):
            published.attribute_one(p, t, n_steps=n_steps)

    def published_flops(p, t):  # a layer's cost is linear in its index (backward stops at it): the first and last give the sum
        first, last = (count_flops(lambda layer=layer: published.attribute_one(p, t, n_steps=n_steps, layers=[layer]))
                       for layer in (0, lm.num_layers - 1))
        return lm.num_layers * (first + last) // 2

    k = max(1, min(published_prompts, len(prompts)))
    m = max(1, min(flop_prompts, len(prompts)))
    rows = []
    for implementation, fn, ps, ts in (
        ("engine", run_engine, prompts, targets),
        ("published", run_published, prompts[:k], targets[:k]),
    ):
        with PeakMemory(lm.devices) as memory, Stopwatch(lm.devices) as clock:
            fn(ps, ts)
        if implementation == "engine":
            flops = sum(count_flops(lambda i=i: fn(prompts[i : i + 1], targets[i : i + 1])) for i in range(m)) / m
        else:
            flops = sum(published_flops(prompts[i], targets[i]) for i in range(m)) / m
        per_prompt = clock.seconds / len(ps)
        peak = peak_tflops(lm.device, engine.precision)
        achieved = flops / 1e9 / per_prompt
        rows.append(
            BenchRow(
                model=name, implementation=implementation, device=",".join(map(str, lm.devices)), precision=engine.precision,
                dtype=dtype_name(lm.dtype), n_steps=n_steps,
                prompts=len(ps), mean_tokens=sum(tokens[: len(ps)]) / len(ps), seconds_per_prompt=per_prompt,
                prompts_per_second=1 / per_prompt, peak_memory_mb=memory.mb, gflop_per_prompt=flops / 1e9,
                achieved_gflops=achieved, peak_memory_mb_by_device=memory.by_device, timer=clock.timer,
                peak_tflops=peak, mfu=None if peak is None else achieved / (peak * 1e3),
            )
        )
    return rows


def markdown_table(rows: list[BenchRow]) -> str:
    """One line per (model, implementation); speed-up is the published method's s/prompt (same model,
    precision and weights) over this row's."""
    head = ("| model | implementation | device | weights | precision | prompts | tokens | s/prompt | prompts/s | peak MB "
            "| GFLOP/prompt | GFLOP/s | MFU | speed-up |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        base = next((o.seconds_per_prompt for o in rows if o.implementation == "published"
                     and (o.model, o.precision, o.dtype) == (r.model, r.precision, r.dtype)), float("nan"))
        cells = [
            r.model, r.implementation, r.device, r.dtype, r.precision, str(r.prompts), f"{r.mean_tokens:.1f}", f"{r.seconds_per_prompt:.3f}",
            f"{r.prompts_per_second:.3f}", " ".join(f"{k}:{v:.0f}" for k, v in r.peak_memory_mb_by_device.items()), f"{r.gflop_per_prompt:.1f}", f"{r.achieved_gflops:.1f}",
            "-" if r.mfu is None else f"{100 * r.mfu:.1f}%", f"{base / r.seconds_per_prompt:.1f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
