"""The demo's command line: ``python -m peft_sara.demo`` and the ``peft-sara-demo`` script."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from .data import DATASETS, STYLES
from .records import DemoResult
from .run import run_demo
from .settings import DemoSettings, default_cache_root

# One thread by default: this model's 8x8 convolutions gain little from a second one, a single thread makes every
# number bitwise reproducible whatever the core count, and it avoids the many-fold slowdown two spinning OpenMP
# threads suffer when other processes share the CPU.
DEFAULT_THREADS = 1
# Pretraining (only with --pretrain or settings other than the shipped base's): one thread too, which reproduces the
# shipped base bitwise. A second thread gains about 1.5x on an idle machine but loses many-fold on a shared one.
DEFAULT_PRETRAIN_THREADS = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's command line."""
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(
        prog="python -m peft_sara.demo",
        description="Fine-tune a small diffusion model to a new style with SaRA and with LoRA at the same parameter "
        "count, at three learning rates each, and plot what each learned against what it kept (tradeoff.png), with "
        "sample grids scored by a classifier. CPU-only, no downloads, about 5 minutes.",
    )
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default="digits",
        help="digits (8x8 grey, 10 classes; default) or photo-patches (16x16 RGB patches of two photos, 2 classes)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("sara-demo-output"),
        help="where to write pictures, adapters and metrics.json (default: ./sara-demo-output)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"fine-tuning steps per method (default: {defaults.finetune_steps})"
    )
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help=f"pretraining steps of the base model (default: {defaults.pretrain_steps})",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where pretrained base models are cached (default: {default_cache_root()})",
    )
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the pretrained-model cache")
    parser.add_argument(
        "--pretrain",
        action="store_true",
        help="pretrain the base model (or take it from the cache) even where the package ships it (the default "
        "settings on the digits); `python -m peft_sara.demo.pretrain_base --check` reproduces the shipped one",
    )
    parser.add_argument("--seed", type=int, default=None, help=f"seed of everything random (default: {defaults.seed})")
    parser.add_argument(
        "--style",
        choices=sorted(STYLES),
        default=None,
        help=f"the new style (default: {defaults.style}; photo-patches: bgr)",
    )
    parser.add_argument(
        "--learning-rates",
        type=float,
        nargs="+",
        default=None,
        help="learning rates swept for both methods; the middle one gives the saved adapters and the grids "
        f"(default: {' '.join(map(str, defaults.learning_rates))})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="torch CPU threads (default: 1; results can differ in the last bits between thread "
        "counts, and the tiny convolutions here gain little from more)",
    )
    parser.add_argument(
        "--pretrain-threads",
        type=int,
        default=DEFAULT_PRETRAIN_THREADS,
        help=f"torch CPU threads while pretraining a base that is not cached yet (default: {DEFAULT_PRETRAIN_THREADS})",
    )
    parser.add_argument("--quick", action="store_true", help="tiny configuration for tests (under a minute)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """Apply the command-line overrides to the default (or ``--quick``) settings."""
    settings = DemoSettings.quick(args.dataset) if args.quick else DemoSettings.for_dataset(args.dataset)
    overrides = {
        "finetune_steps": args.steps,
        "pretrain_steps": args.pretrain_steps,
        "seed": args.seed,
        "style": args.style,
        "learning_rates": tuple(args.learning_rates) if args.learning_rates else None,
    }
    for name, value in overrides.items():
        if value is not None:
            settings = dataclasses.replace(settings, **{name: value})
    if settings.finetune_steps < 2 or settings.pretrain_steps < 1:
        raise SystemExit("--steps must be at least 2 and --pretrain-steps at least 1.")
    return settings


def run_from_args(argv: list[str] | None = None) -> DemoResult:
    """Parse the command line (``sys.argv`` by default) and run the demo."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    cache_root = None if args.no_cache else (args.cache_dir or default_cache_root())
    if args.threads < 1 or args.pretrain_threads < 1:
        raise SystemExit("--threads and --pretrain-threads must be at least 1.")
    return run_demo(
        settings, args.output_dir, cache_root, pretrain_threads=args.pretrain_threads, pretrain=args.pretrain
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m peft_sara.demo`` and ``peft-sara-demo``."""
    run_from_args(argv)
    return 0
