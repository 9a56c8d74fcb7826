"""Precision: the weights' dtype and the autocast (compute) dtype; scores always accumulate in fp32.

The two are separate settings: `dtype` is what the weights are stored in (memory), `precision`
what matmuls run in. Half-precision weights need the matching half-precision compute (an fp32
"compute" over bf16 weights would silently run in bf16), so that pair is refused.
"""

from __future__ import annotations

import contextlib

import torch

from kn_ray.choices import DTYPES, PRECISIONS  # noqa: F401 (spelled once, torch-free)

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {v: k for k, v in _TORCH.items()}


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX) and torch dispatches to its
    AVX-512 kernels; elsewhere bf16 is emulated and slow (also on such a CPU run with
    ATEN_CPU_CAPABILITY=avx2, which is how the tests imitate an AVX2-only machine)."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def dtype_name(dtype: str | torch.dtype) -> str:
    """'fp32' | 'bf16' | 'fp16' | 'auto' for a name or a torch dtype (torch.float32, "float32" -> 'fp32')."""
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)  # "float32", "bfloat16", "float16"
    if isinstance(dtype, torch.dtype):
        if dtype not in _NAMES:
            raise ValueError(f"weight dtype must be float32, bfloat16 or float16, got {dtype}")
        return _NAMES[dtype]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (or a torch dtype), got {dtype!r}")
    return dtype


def resolve_dtype(dtype: str | torch.dtype, precision: str, device: torch.device) -> torch.dtype:
    """The weights' torch dtype. `auto`: bf16 on a GPU that supports bf16 when the compute
    precision is (or resolves to) bf16, else fp32 (CPUs keep fp32 weights: bf16 weights
    halve memory but lose exactness, so on CPU they must be asked for)."""
    name = dtype_name(dtype)
    if name != "auto":
        return _TORCH[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported() and resolve_precision(precision, device) == "bf16":
        return torch.bfloat16
    return torch.float32


def resolve_precision(precision: str, device: torch.device, weights: torch.dtype = torch.float32) -> str:
    """Turn `auto` into a concrete precision and refuse combinations that cannot run as asked.

    With half-precision `weights`, `auto` is their dtype and any other precision is refused.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    half = _NAMES.get(weights) if weights in (torch.bfloat16, torch.float16) else None
    if half is not None:
        if precision not in ("auto", half):
            raise ValueError(f"{half} weights compute in {half}: use precision {half} (or auto), or load fp32 weights "
                             f"(dtype fp32) for {precision} compute")
        precision = half
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 autocast is not supported on CPU; use bf16 or fp32 (kn-ray will not silently run fp32)")
    return precision


def autocast(precision: str, device: torch.device):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    dtype = _DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
