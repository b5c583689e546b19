"""Timing and memory probes: per-phase wall-clock and CPU time of a step, repeated timed calls, peak memory of a window
of work (CUDA allocator counters, or the process's resident set on CPU).

Imports neither peft_sara nor Triton (nor do :mod:`benchmarks.processes` and :mod:`benchmarks.report`), so
``benchmarks.kernels`` can still choose Triton's interpreter after importing them."""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# The dtypes a benchmark runs in, by their flag names (long and short).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads (the same number in every process of a benchmark run)."""
    torch.set_num_threads(threads)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on CPU), so a clock read covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Wall-clock and process-CPU time of consecutive phases of one step (synchronising CUDA at each mark)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        synchronize(device)
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def mark(self, phase: str) -> None:
        """Attribute the time since the previous mark to ``phase``."""
        synchronize(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall[phase] = self.wall.get(phase, 0.0) + wall - self._wall
        self.cpu[phase] = self.cpu.get(phase, 0.0) + cpu - self._cpu
        self._wall, self._cpu = wall, cpu


def median(values: Sequence[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------------------------------------------ memory
def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


class MemoryProbe:
    """Peak memory of a window of work, as bytes above a baseline.

    CUDA: ``torch.cuda`` allocator counters. CPU: the process's resident set size; the peak (VmHWM) is reset through
    ``/proc/self/clear_refs`` when the window starts (Linux >= 4.0), so it covers only the window. RSS also counts
    memory the C allocator keeps after frees, so CPU peaks are upper bounds on live tensor memory.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.can_reset_cpu_peak = device.type != "cuda" and self._try_reset_cpu_peak()

    @staticmethod
    def _try_reset_cpu_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            return True
        except OSError:
            return False

    def current(self) -> int:
        """Bytes in use now (CUDA: allocated tensors; CPU: resident set size)."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status_kib("VmRSS") * 1024

    def reset_peak(self) -> None:
        """Start a new peak window."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.can_reset_cpu_peak:
            self._try_reset_cpu_peak()

    def peak(self) -> int:
        """Highest bytes in use since the last :meth:`reset_peak` (without a CPU reset: since process start)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status_kib("VmHWM") * 1024


def max_rss_bytes() -> int:
    """Lifetime peak resident set size of this process (``getrusage().ru_maxrss``; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


def mib(num_bytes: float | None) -> float | None:
    """Bytes in MiB (None stays None)."""
    return None if num_bytes is None else num_bytes / 2**20
