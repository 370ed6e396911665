"""The one latency-measurement protocol of oneshot (issue 17).

The cost table (latency of each candidate in its place) and the exported model's latency are both
measured here, so a table entry and a whole-network number are comparable: warm-up runs first
(allocator, caches, lazy kernels, CPU frequency), then the median of timed repeats - the median,
not the mean, because a shared machine's outliers are one-sided (a descheduled thread only adds
time). On CUDA each repeat is bracketed by synchronisations, since kernel launches are
asynchronous and the host clock would otherwise time only the launch.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def device_name(device="cpu") -> str:
    """A human-readable name of the device: the CPU model (from /proc/cpuinfo where there is one)
    or the CUDA device's name. Cost tables are keyed by it, so a table measured on one machine is
    recognised as foreign on another."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (numpy's default method)."""
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure_latency(
    fn_or_module: Callable | torch.nn.Module,
    example_inputs: tuple,
    *,
    warmup: int = 10,
    repeats: int = 50,
    device="cpu",
    threads: int | None = None,
) -> dict:
    """Time `fn_or_module(*example_inputs)`: `warmup` untimed calls, then `repeats` timed ones.

    Runs under `torch.inference_mode()` (what a deployed model runs under: no autograd records).
    The caller puts the module and inputs on `device`; `device` says how to synchronise and what
    to report. `threads` sets torch's intra-op thread count for the measurement only; the previous
    count is restored afterwards, even when the call raises.
    Returns milliseconds: median and 10th/90th percentiles, plus what was measured on."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda is not available on this machine; valid: cpu")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads} must be >= 1")
        torch.set_num_threads(threads)
    try:
        used_threads = torch.get_num_threads()
        times_ms = []
        with torch.inference_mode():
            for _ in range(warmup):
                fn_or_module(*example_inputs)
            sync()
            for _ in range(repeats):
                start = time.perf_counter()
                fn_or_module(*example_inputs)
                sync()
                times_ms.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous_threads)
    times_ms.sort()
    return {
        "median_ms": statistics.median(times_ms),
        "p10_ms": _percentile(times_ms, 0.10),
        "p90_ms": _percentile(times_ms, 0.90),
        "repeats": repeats,
        "device": str(device),
        "device_name": device_name(device),
        "threads": used_threads,
    }
