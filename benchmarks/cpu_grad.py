"""CPU sampled weight gradient: the reference (one dense GEMM, then gather the trainable entries) against a gathered
SDDMM (gather the two factors of each trainable entry, multiply, sum over tokens: ``density`` times the multiply-adds
but no dense out x in temporary), over density, token count and SD1.5 layer shapes.

Prints, per shape and token count, the SDDMM / GEMM time ratio at each density and the densities where the SDDMM
wins, and writes ``benchmarks/results/cpu_grad-cpu.json``. Measured here (benchmarks/README.md): the SDDMM loses
at SaRA's densities (2-10%) on every shape and token count, and wins only around 1% in a few places, so the CPU
backward keeps the GEMM (``peft_sara.tuner.kernels.reference.linear_weight_grad_values``); on CUDA the Triton kernels
choose between an SDDMM and a masked GEMM.

    python -m benchmarks.cpu_grad --threads 1
    python -m benchmarks.cpu_grad --shapes 320x320 --tokens 16,4096 --densities 0.01,0.05
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.flags import usable_cores
from benchmarks.measure import median, set_threads, time_call
from benchmarks.report import RESULTS_DIR, format_table, write_results
from peft_sara.tuner.kernels import reference
from peft_sara.tuner.selection import compute_dtype

DEFAULT_SHAPES = "320x320,640x640,1280x1280,320x768"
DEFAULT_TOKENS = "16,256,1024,4096"
DEFAULT_DENSITIES = "0.005,0.01,0.02,0.05,0.1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated out x in weight shapes")
    parser.add_argument("--tokens", default=DEFAULT_TOKENS, help="comma-separated token counts N")
    parser.add_argument("--densities", default=DEFAULT_DENSITIES, help="comma-separated trainable fractions")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default {RESULTS_DIR}/cpu_grad-cpu.json)")
    return parser.parse_args(argv)


SDDMM_CHUNK_ELEMENTS = 1 << 22  # tokens x entries gathered at a time (16 MiB of float32 per factor)


def sddmm_weight_grad_values(
    grad_output: torch.Tensor, inputs: torch.Tensor, indices_per_adapter: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The entries of :func:`peft_sara.tuner.kernels.reference.linear_weight_grad_values` without the dense GEMM: for each
    flat index ``k = row * in + col``, ``sum_n grad_output[n, row] * inputs[n, col]`` from gathered columns, over token
    chunks (``density`` times the multiply-adds of the GEMM, at gather speed)."""
    in_features = inputs.shape[1]
    compute = compute_dtype(grad_output.dtype)
    grad_output, inputs = grad_output.to(compute), inputs.to(compute)
    results = []
    for indices in indices_per_adapter:
        indices = indices.long()
        rows, cols = indices // in_features, indices % in_features
        sampled = torch.zeros(indices.numel(), dtype=compute, device=grad_output.device)
        step = max(1, SDDMM_CHUNK_ELEMENTS // max(1, indices.numel()))
        for start in range(0, grad_output.shape[0], step):
            left = grad_output[start : start + step].index_select(1, rows)
            sampled += left.mul_(inputs[start : start + step].index_select(1, cols)).sum(0)
        results.append(sampled)
    return results


def measure(out_features: int, in_features: int, tokens: int, density: float, repeats: int) -> dict:
    """Median seconds of the GEMM + gather and of the gathered SDDMM at one point, and that both agree."""
    generator = torch.Generator().manual_seed(0)
    grad_output = torch.randn(tokens, out_features, generator=generator)
    inputs = torch.randn(tokens, in_features, generator=generator)
    count = max(1, round(density * out_features * in_features))
    indices = torch.randperm(out_features * in_features, generator=generator)[:count].sort().values
    gemm = reference.linear_weight_grad_values(grad_output, inputs, [indices])[0]
    sddmm = sddmm_weight_grad_values(grad_output, inputs, [indices])[0]
    torch.testing.assert_close(sddmm, gemm, rtol=1e-4, atol=1e-3)
    device = torch.device("cpu")
    gemm_s = median(
        time_call(lambda: reference.linear_weight_grad_values(grad_output, inputs, [indices]), device, repeats, 1)
    )
    sddmm_s = median(time_call(lambda: sddmm_weight_grad_values(grad_output, inputs, [indices]), device, repeats, 1))
    return {
        "shape": f"{out_features}x{in_features}",
        "tokens": tokens,
        "density": density,
        "gemm_ms": 1e3 * gemm_s,
        "sddmm_ms": 1e3 * sddmm_s,
        "sddmm_over_gemm": sddmm_s / gemm_s,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep, print the table and the break-even densities, write the JSON."""
    args = parse_args(argv)
    threads = args.threads or usable_cores()
    set_threads(threads)
    shapes = [tuple(int(side) for side in shape.split("x")) for shape in args.shapes.split(",")]
    tokens = [int(value) for value in args.tokens.split(",")]
    densities = [float(value) for value in args.densities.split(",")]
    rows = [
        measure(out_features, in_features, count, density, args.repeats)
        for out_features, in_features in shapes
        for count in tokens
        for density in densities
    ]
    columns = [
        ("shape", "shape", ""),
        ("tokens", "tokens", "d"),
        ("density", "density", "g"),
        ("gemm_ms", "GEMM+gather ms", ".3f"),
        ("sddmm_ms", "SDDMM ms", ".3f"),
        ("sddmm_over_gemm", "SDDMM / GEMM", ".2f"),
    ]
    print(f"CPU, {threads} thread(s), float32\n")
    print(format_table(rows, columns))
    wins = {}
    for row in rows:
        if row["sddmm_over_gemm"] < 1.0:
            key = f"{row['shape']} N={row['tokens']}"
            wins[key] = max(wins.get(key, 0.0), row["density"])
    print("\nLargest density where the SDDMM won, per shape and token count:", wins or "none")
    report = {"threads": threads, "torch": torch.__version__, "rows": rows, "sddmm_wins_up_to_density": wins}
    write_results(args.out or RESULTS_DIR / "cpu_grad-cpu.json", report)
    return report


if __name__ == "__main__":
    main()
