"""Time SaRA's masked-weight ops: the PyTorch reference against the Triton kernels.

On CUDA: the sampled weight gradient (reference GEMM + gather, Triton SDDMM, Triton masked GEMM and the automatic
choice) at SD1.5-like layer shapes over a range of densities, and building the effective weight out of place (the
per-call copy of the forward). Prints a table and
writes ``benchmarks/results/kernels-<device>.json``, including the measured SDDMM / GEMM crossover density to compare
with ``triton_kernels.SDDMM_MAX_DENSITY``.

On CPU Triton timings mean nothing (kernels need a GPU); the script times the reference only and, with
``--interpret``, runs each Triton kernel once through the interpreter on a tiny shape to show the path works.

    python -m benchmarks.kernels                       # bf16, N=4096, 320x320 / 640x2560 / 1280x1280
    python -m benchmarks.kernels --dtype fp32 --tokens 16384
    python benchmarks/kernels.py --interpret           # (running the file directly works too)
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/kernels.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

# benchmarks.measure and benchmarks.report import neither peft_sara nor Triton, so TRITON_INTERPRET can still be set in
# main().
from benchmarks.measure import DTYPES, SHORT_DTYPE_NAMES, MemoryProbe, median, mib, synchronize, time_call
from benchmarks.report import RESULTS_DIR, package_version, write_results

DEFAULT_SHAPES = "320x320,640x2560,1280x1280"
DEFAULT_DENSITIES = "0.001,0.005,0.01,0.02,0.05,0.1,0.2,0.5"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="rows N of grad_output (N, out) and inputs (N, in)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated out x in weight shapes")
    parser.add_argument("--densities", default=DEFAULT_DENSITIES, help="comma-separated trainable fractions")
    parser.add_argument(
        "--dtype", choices=sorted(SHORT_DTYPE_NAMES), default="bf16", help="dtype of activations and weights"
    )
    parser.add_argument("--interpret", action="store_true", help="on CPU: run the Triton kernels via the interpreter")
    parser.add_argument(
        "--out", "--output", type=Path, default=None, help="JSON path (default results/kernels-<device>.json)"
    )
    return parser.parse_args(argv)


def device_slug() -> str:
    """``cpu`` or the GPU's name in lower-case-with-dashes, for the results file name."""
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def time_ms(function: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds per call (Triton's ``do_bench`` on CUDA, which flushes L2 between calls)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(function, warmup=25, rep=100))
    return median(time_call(function, device, repeats=5, warmup=1)) * 1e3


def extra_mib(function: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory allocated by one call beyond what was live before it, in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    probe = MemoryProbe(device)
    synchronize(device)
    before = probe.current()
    probe.reset_peak()
    function()
    synchronize(device)
    return mib(probe.peak() - before)


def random_indices(numel: int, density: float, device: torch.device) -> torch.Tensor:
    """Sorted distinct int32 flat indices, like a selection from ``peft_sara.tuner.selection``."""
    count = max(1, round(density * numel))
    return torch.randperm(numel, device=device)[:count].sort().values.to(torch.int32)


def benchmark(args: argparse.Namespace, device: torch.device, reference, triton_kernels) -> dict:
    """Time every method at every shape and density; rows as measured and the SDDMM / GEMM crossover per shape."""
    dtype = DTYPES[SHORT_DTYPE_NAMES[args.dtype]]
    shapes = [tuple(int(size) for size in shape.split("x")) for shape in args.shapes.split(",")]
    densities = [float(density) for density in args.densities.split(",")]
    rows, crossovers = [], {}
    for out_features, in_features in shapes:
        generator = torch.Generator(device=device).manual_seed(0)
        grad_output = torch.randn(args.tokens, out_features, device=device, generator=generator).to(dtype)
        inputs = torch.randn(args.tokens, in_features, device=device, generator=generator).to(dtype)
        weight = torch.randn(out_features, in_features, device=device, generator=generator).to(dtype)
        flat_weight = weight.view(-1)
        sddmm_faster = []
        for density in densities:
            indices = random_indices(weight.numel(), density, device)
            values = torch.randn(indices.numel(), device=device) * 1e-3
            methods = candidate_methods(grad_output, inputs, flat_weight, indices, values, reference, triton_kernels)
            if "grad/triton-gemm" in methods:
                plan = functools.partial(
                    triton_kernels.tile_plan, indices, out_features, in_features, *_tile_shape(triton_kernels, dtype)
                )
                plan_ms = time_call(plan, device, repeats=1, warmup=0)[0] * 1e3  # once per index set, then reused
            timings = {}
            for name, function in methods.items():
                timings[name] = time_ms(function, device)
                row = {
                    "op": name,
                    "shape": f"{out_features}x{in_features}",
                    "tokens": args.tokens,
                    "density": density,
                    "nnz": indices.numel(),
                    "ms": round(timings[name], 4),
                    "extra_mib": extra_mib(function, device),
                }
                if name == "grad/triton-gemm":
                    row["plan_build_ms"] = round(plan_ms, 3)
                rows.append(row)
                print(_format_row(row), flush=True)
            if "grad/triton-sddmm" in timings:
                sddmm_faster.append((density, timings["grad/triton-sddmm"] <= timings["grad/triton-gemm"]))
        slower = [density for density, faster in sddmm_faster if not faster]
        if sddmm_faster:
            crossovers[f"{out_features}x{in_features}"] = min(slower) if slower else None
    return {"rows": rows, "sddmm_slower_from_density": crossovers}


def candidate_methods(grad_output, inputs, flat_weight, indices, values, reference, triton_kernels) -> dict:
    """Name -> zero-argument call, for every method that can run here (Triton ones only on CUDA)."""
    from peft_sara.tuner.functional import SparseEntries, effective_weight

    methods: dict[str, Callable[[], object]] = {
        "grad/reference": lambda: reference.linear_weight_grad_values(grad_output, inputs, [indices]),
        "effective-weight": lambda: effective_weight(flat_weight, [SparseEntries(indices, values, 1.0)]),
    }
    if triton_kernels is None or not grad_output.is_cuda:
        return methods
    for strategy in ("sddmm", "gemm", "auto"):
        methods[f"grad/triton-{strategy}"] = lambda s=strategy: triton_kernels.linear_weight_grad_values(
            grad_output, inputs, [indices], strategy=s
        )
    return methods


def _tile_shape(triton_kernels, dtype) -> tuple[int, int]:
    config = triton_kernels.gemm_config(dtype)
    return config.block_m, config.block_n


def _format_row(row: dict) -> str:
    memory = "" if row["extra_mib"] is None else f"{row['extra_mib']:9.2f} MiB"
    return f"{row['op']:26s} {row['shape']:>10s} N={row['tokens']:<6d} d={row['density']:<6g} {row['ms']:10.4f} ms {memory}"


def interpreter_smoke_run(reference, triton_kernels) -> None:
    """Each Triton kernel once on a tiny CPU problem, against the reference."""
    grad_output, inputs = torch.randn(16, 24), torch.randn(16, 40)
    indices = torch.arange(0, 24 * 40, 7)
    expected = reference.linear_weight_grad_values(grad_output, inputs, [indices])[0]
    for strategy in ("sddmm", "gemm"):
        start = time.perf_counter()
        sampled = triton_kernels.linear_weight_grad_values(grad_output, inputs, [indices], strategy=strategy)[0]
        error = (sampled - expected).abs().max().item()
        print(
            f"interpreter {strategy:5s}: 16 tokens, 24x40, {indices.numel()} entries, max |error| {error:.2e}, "
            f"{time.perf_counter() - start:.2f} s (interpreter speed, not kernel speed)"
        )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    on_cuda = torch.cuda.is_available()
    triton_imported_early = "triton" in sys.modules
    if args.interpret and not on_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton
    from peft_sara.tuner import kernels
    from peft_sara.tuner.kernels import reference

    triton_kernels = None
    if kernels.triton_available():
        from peft_sara.tuner.kernels import triton_kernels
    if not on_cuda:
        print("No CUDA device: Triton kernel timings need a GPU. Timing the PyTorch reference only.")
        if args.interpret:
            if triton_kernels is None or triton_imported_early or os.environ.get("TRITON_INTERPRET") != "1":
                print("Cannot run the interpreter: Triton is missing or was imported before TRITON_INTERPRET=1.")
            else:
                interpreter_smoke_run(reference, triton_kernels)
    report = {
        "device": torch.cuda.get_device_name() if on_cuda else "cpu",
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "dtype": args.dtype,
        "sddmm_max_density_setting": None
        if triton_kernels is None
        else {str(dtype).removeprefix("torch."): cut for dtype, cut in triton_kernels.SDDMM_MAX_DENSITY.items()},
        **benchmark(args, torch.device("cuda" if on_cuda else "cpu"), reference, triton_kernels),
    }
    if report["sddmm_slower_from_density"]:
        print("Smallest density where the masked GEMM beat the SDDMM, per shape:", report["sddmm_slower_from_density"])
    write_results(args.out or RESULTS_DIR / f"kernels-{device_slug()}.json", report)
    return report


if __name__ == "__main__":
    main()
