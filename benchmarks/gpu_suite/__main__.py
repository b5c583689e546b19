"""``python -m benchmarks.gpu_suite``: parse the flags, run the chosen parts in order within the budget, write the
JSON and markdown (see the package docstring)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from diffusers.utils import logging as diffusers_logging

import benchmarks.gpu_suite
from benchmarks.flags import resolve_device
from benchmarks.gpu_suite import compiled, memory_at_scale, training
from benchmarks.gpu_suite import kernels as kernels_part
from benchmarks.gpu_suite.budget import Budget
from benchmarks.gpu_suite.report import print_summary, render_markdown
from benchmarks.gpu_suite.settings import FULL, PARTS, TINY, SuiteSettings
from benchmarks.gpu_suite.steps import StepResults, finish_steps
from benchmarks.report import (
    RESULTS_DIR,
    finish_machine_info,
    machine_info,
    write_results,
)
from peft_sara.presets import model_class


def output_dir(flag: Path | None) -> Path:
    """``--out-dir``, else ``$OUT`` (the device tool's output folder), else ``benchmarks/results/``."""
    if flag is not None:
        return flag
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_suite", description=benchmarks.gpu_suite.__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tiny", action="store_true", help="toy shapes and a CPU-friendly compile (CI smoke test)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of: {', '.join(PARTS)}")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="total seconds for all parts (default 420 on a GPU: under 8 minutes with start-up); shares scale with it",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: usable cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=None, help="folder for the JSON and markdown (default: $OUT)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = [name for name in parts if name not in PARTS]
    if unknown:
        raise SystemExit(f"Unknown part(s) {unknown}; choose from {', '.join(PARTS)}.")
    settings = TINY if args.tiny else FULL
    shares = {part: settings.shares_s[part] for part in PARTS if part in parts}
    if args.budget_s is not None:
        scale = args.budget_s / sum(shares.values())
        shares = {part: share * scale for part, share in shares.items()}
    settings = SuiteSettings(**{**asdict(settings), "shares_s": shares})
    diffusers_logging.set_verbosity_error()  # not one "kept in float32" note per process
    model_class("unet")  # import it once here rather than in every child
    resolved = resolve_device(args.device, args.threads)
    device, threads = resolved.device, resolved.threads
    if device.type != "cuda" and not args.tiny:
        print("No CUDA device: the full suite is meant for a GPU (use --tiny on CPU). Running it anyway.", flush=True)
    machine = machine_info(device, threads)
    budget = Budget(shares)
    print(
        f"GPU suite{' (tiny)' if args.tiny else ''} on {device}: parts {', '.join(shares)}; budget "
        + ", ".join(f"{part} {share:.0f} s" for part, share in shares.items()),
        flush=True,
    )

    report: dict[str, Any] = {"benchmark": "gpu_suite", "tiny": args.tiny, "settings": asdict(settings)}
    skipped: list[str] = []
    sd15 = StepResults(settings.sd15_preset)
    sdxl = StepResults(settings.sdxl_preset)

    if "sd15" in shares:
        skipped += training.run(settings, budget, sd15, device, threads, args.seed)
    if "sdxl" in shares:
        skipped += memory_at_scale.run(settings, budget, sdxl, device, threads, args.seed)
    if "sd15-compiled" in shares:
        skipped += compiled.run(settings, budget, sd15, device, threads, args.seed)
    if "kernels" in shares:
        report["kernels"] = kernels_part.run(settings, device, budget)
        skipped += report["kernels"].get("skipped", [])

    report["sd15"] = finish_steps(sd15) if sd15.raw or sd15.plan else None
    report["sdxl"] = finish_steps(sdxl) if sdxl.raw or sdxl.plan else None
    report["targets"] = training.targets(report["sd15"] or {}) + memory_at_scale.targets(report["sdxl"] or {})
    report["skipped"] = skipped
    report["duration_s"] = budget.elapsed()
    device_names = [
        result.get("device_name")
        for found in (sd15, sdxl)
        for methods in found.raw.values()
        for result in methods.values()
    ] + [(report.get("kernels") or {}).get("device_name")]
    finish_machine_info(machine, next((name for name in device_names if name), None))
    report["machine"] = machine

    print_summary(report)
    folder = output_dir(args.out_dir)
    stem = f"gpu_suite-{'tiny-' if args.tiny else ''}{device.type}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.md").write_text(render_markdown(report) + "\n")
    print(f"\nwrote {folder / f'{stem}.md'}")
    write_results(folder / f"{stem}.json", report)
    print(f"total {budget.elapsed():.0f} s", flush=True)
    return report


if __name__ == "__main__":
    main()
