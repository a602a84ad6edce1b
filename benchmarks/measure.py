"""Measuring helpers shared by the benchmarks: progress logging, device sync, peak memory."""

from __future__ import annotations

import platform
import resource
import sys

import torch

MIB = 2**20


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def maxrss_bytes() -> int:
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        return None


def reset_peak_rss() -> None:
    """Start the peak resident set size (``VmHWM``) again from the current one (Linux)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_bytes() -> int:
    """Peak resident set size (``VmHWM``) since the process started or ``reset_peak_rss`` (Linux)."""
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return kib * 1024


def ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 4)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) by device name, for model FLOPs utilisation.
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def peak_bf16_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's peak bf16 TFLOP/s: ``override`` if given, else by the CUDA device's name; None on CPU."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_TFLOPS_BF16.items() if key in name), None)


def mfu(flops: float | None, seconds: float | None, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops`` done in ``seconds`` over the peak; None when a figure is missing."""
    if not flops or not seconds or not peak_tflops:
        return None
    return round(flops / seconds / (peak_tflops * 1e12), 4)
