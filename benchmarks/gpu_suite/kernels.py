"""Part 4, ``kernels``: ``benchmarks.kernels`` over the suite's (dtype, tokens, shapes) cases in one child, the
SDDMM / masked-GEMM density cutoff per dtype the timings favour, and Triton's speedups over the reference."""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks import kernels as kernel_benchmark
from benchmarks.gpu_suite.budget import Budget
from benchmarks.gpu_suite.settings import SuiteSettings
from benchmarks.measure import DTYPES, SHORT_DTYPE_NAMES
from benchmarks.processes import failure_status, run_in_fresh_process
from peft_sara.tuner import kernels as sara_kernels
from peft_sara.tuner.kernels import reference


def run_kernel_cases(settings: SuiteSettings, device_name: str, allowance_s: float) -> dict[str, Any]:
    """Every (dtype, tokens, shapes) case of ``benchmarks.kernels`` that fits ``allowance_s`` (in a child process)."""
    device = torch.device(device_name)
    triton_kernels = None
    if device.type == "cuda" and sara_kernels.triton_available():
        from peft_sara.tuner.kernels import triton_kernels  # optional: needs Triton and a GPU
    start, durations, rows, skipped = time.perf_counter(), [], [], []
    for dtype, tokens, shapes in settings.kernel_cases:
        estimate = statistics.fmean(durations) if durations else 0.0
        if time.perf_counter() - start + estimate > allowance_s:
            skipped.append(f"kernels {dtype} N={tokens}: skipped, the part's budget ({allowance_s:.0f} s) is spent")
            print(skipped[-1], flush=True)
            continue
        case_start = time.perf_counter()
        args = kernel_benchmark.parse_args(
            ["--dtype", dtype, "--tokens", str(tokens)] + ["--shapes", shapes, "--densities", settings.kernel_densities]
        )
        with contextlib.redirect_stdout(io.StringIO()):  # one line per timed op: the JSON keeps them
            report = kernel_benchmark.benchmark(args, device, reference, triton_kernels)
        rows += [{**row, "dtype": dtype} for row in report["rows"]]
        durations.append(time.perf_counter() - case_start)
        print(
            f"  kernels {dtype} N={tokens}: {len(report['rows'])} timings in {durations[-1]:.1f} s; GEMM faster than "
            f"SDDMM from density {report['sddmm_slower_from_density'] or '-'}",
            flush=True,
        )
    setting = None
    if triton_kernels is not None:
        setting = {
            short: triton_kernels.SDDMM_MAX_DENSITY.get(DTYPES[name]) for short, name in SHORT_DTYPE_NAMES.items()
        }
    return {
        "triton": triton_kernels is not None,
        "rows": rows,
        "skipped": skipped,
        "sddmm_max_density_setting": setting,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def choose_sddmm_cutoffs(
    rows: Sequence[dict[str, Any]], current: dict[str, float | None] | None = None
) -> dict[str, dict[str, Any]]:
    """Per dtype, the SDDMM density cutoff the measurements favour, with how much each choice loses.

    A cutoff ``c`` means "SDDMM at density <= c, masked GEMM above". Among 0 and the measured densities, the chosen one
    minimises the mean slowdown against the faster strategy of each measured (shape, tokens, density) point, all
    points weighted alike; ties go to the smaller cutoff. Also reports, per (shape, tokens), the smallest density at
    which the GEMM was faster (the crossover), and the slowdown of the ``current`` setting.
    """
    points: dict[str, dict[tuple[str, int, float], dict[str, float]]] = defaultdict(dict)
    for row in rows:
        strategy = {"grad/triton-sddmm": "sddmm", "grad/triton-gemm": "gemm"}.get(row["op"])
        if strategy is not None:
            key = (row["shape"], row["tokens"], row["density"])
            points[row["dtype"]].setdefault(key, {})[strategy] = row["ms"]
    chosen = {}
    for dtype, measured in points.items():
        measured = {key: ms for key, ms in measured.items() if len(ms) == 2}
        if not measured:
            continue

        def slowdowns(cutoff: float, measured=measured) -> list[float]:
            return [
                (ms["sddmm"] if density <= cutoff else ms["gemm"]) / min(ms.values())
                for (_, _, density), ms in measured.items()
            ]

        candidates = [0.0] + sorted({density for _, _, density in measured})
        mean_slowdown, cutoff = min((statistics.fmean(slowdowns(candidate)), candidate) for candidate in candidates)
        crossovers = defaultdict(list)
        for (shape, tokens, density), ms in sorted(measured.items()):
            crossovers[(shape, tokens)].append((density, ms["gemm"] < ms["sddmm"]))
        setting = (current or {}).get(dtype)
        chosen[dtype] = {
            "cutoff": cutoff,
            "gemm_from_density": next((d for d in candidates if d > cutoff), None),
            "mean_slowdown": mean_slowdown,
            "worst_slowdown": max(slowdowns(cutoff)),
            "current_setting": setting,
            "current_mean_slowdown": None if setting is None else statistics.fmean(slowdowns(setting)),
            "points": len(measured),
            "crossovers": [
                {
                    "shape": shape,
                    "tokens": tokens,
                    "gemm_faster_from_density": next((density for density, faster in series if faster), None),
                }
                for (shape, tokens), series in crossovers.items()
            ],
        }
    return chosen


def kernel_speedups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dtype and tokens: median speedup of the Triton sampled gradient (auto) over the reference, and the median
    time to build an effective weight out of place (the forward's per-call copy; no Triton kernel: it is one
    ``index_add``)."""
    times: dict[tuple[str, int, str, float], dict[str, float]] = defaultdict(dict)
    for row in rows:
        times[(row["dtype"], row["tokens"], row["shape"], row["density"])][row["op"]] = row["ms"]
    found: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (dtype, tokens, _, _), ops in times.items():
        fast, slow = ops.get("grad/triton-auto"), ops.get("grad/reference")
        if fast and slow is not None:
            found[(dtype, tokens)]["grad"].append(slow / fast)
        if "effective-weight" in ops:
            found[(dtype, tokens)]["effective_weight"].append(ops["effective-weight"])
    return [
        {
            "dtype": dtype,
            "tokens": tokens,
            "grad_speedup_median": statistics.median(series["grad"]) if series["grad"] else None,
            "effective_weight_ms_median": statistics.median(series["effective_weight"])
            if series["effective_weight"]
            else None,
        }
        for (dtype, tokens), series in sorted(found.items())
    ]


def run(settings: SuiteSettings, device: torch.device, budget: Budget) -> dict[str, Any]:
    """The kernel micro-benchmarks in one child process, and the cutoffs chosen from them."""
    part = "kernels"
    print(f"[{budget.elapsed():6.1f}s] kernels: {len(settings.kernel_cases)} (dtype, tokens, shapes) cases", flush=True)
    try:
        report = run_in_fresh_process(
            run_kernel_cases, settings, str(device), budget.left(part), timeout_s=budget.timeout(part)
        )
    except (RuntimeError, TimeoutError) as error:
        return {"status": failure_status(error), "error": str(error)[-2000:], "rows": []}
    report["cutoffs"] = choose_sddmm_cutoffs(report["rows"], report["sddmm_max_density_setting"])
    report["speedups"] = kernel_speedups(report["rows"])
    report["status"] = "ok"
    if not report["triton"]:
        report["note"] = "no Triton timings (no CUDA device or no Triton): reference only, no cutoff chosen"
    for dtype, choice in report["cutoffs"].items():
        current = choice["current_mean_slowdown"]
        print(
            f"  {dtype}: SDDMM up to density {choice['cutoff']:g} (GEMM from {choice['gemm_from_density']}): mean "
            f"slowdown {choice['mean_slowdown']:.3f}x against the faster strategy per point; the current setting "
            f"{choice['current_setting']}: {'n/a' if current is None else f'{current:.3f}x'}",
            flush=True,
        )
    return report
