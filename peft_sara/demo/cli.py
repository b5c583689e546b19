"""The demo's command line: ``python -m peft_sara.demo`` and the ``peft-sara-demo`` script.

Importing it imports nothing heavy: ``--help`` answers at once, and optional libraries' import-time log lines are
dropped (:mod:`peft_sara.quiet`; ``--verbose`` keeps them) before torch, diffusers and PEFT load.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..quiet import drop_import_noise, keep_import_noise

if TYPE_CHECKING:
    from .records import DemoResult
    from .settings import DemoSettings

# The choices and defaults the help shows (data.DATASETS, data.STYLES, settings.DemoSettings()), written out so that
# `--help` imports nothing heavy (a test keeps them equal).
DATASETS = ("digits", "photo-patches")
STYLES = ("bgr", "inverted", "mirrored", "thick")
DEFAULT_FINETUNE_STEPS = 100
DEFAULT_PRETRAIN_STEPS = 1000
DEFAULT_SEED = 0
DEFAULT_STYLE = "mirrored"
DEFAULT_LEARNING_RATES = (1e-3, 3e-3, 1e-2)
VERBOSE_FLAGS = ("--verbose", "--debug")

# One thread by default: this model's 8x8 convolutions gain little from a second one, a single thread makes every
# number bitwise reproducible whatever the core count, and it avoids the many-fold slowdown two spinning OpenMP
# threads suffer when other processes share the CPU.
DEFAULT_THREADS = 1
# Pretraining (only with --pretrain or settings other than the shipped base's): one thread too, which reproduces the
# shipped base bitwise. A second thread gains about 1.5x on an idle machine but loses many-fold on a shared one.
DEFAULT_PRETRAIN_THREADS = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's command line."""
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
        "--steps", type=int, default=None, help=f"fine-tuning steps per method (default: {DEFAULT_FINETUNE_STEPS})"
    )
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help=f"pretraining steps of the base model (default: {DEFAULT_PRETRAIN_STEPS}; other values pretrain a base "
        "instead of using the shipped one)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where pretrained base models are cached (default: the user cache folder's peft-sara/demo, e.g. "
        "~/.cache/peft-sara/demo)",
    )
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the pretrained-model cache")
    parser.add_argument(
        "--pretrain",
        action="store_true",
        help="pretrain the base model (or take it from the cache) even where the package ships it (the default "
        "settings on the digits); `python -m peft_sara.demo.pretrain_base --check` reproduces the shipped one",
    )
    parser.add_argument("--seed", type=int, default=None, help=f"seed of everything random (default: {DEFAULT_SEED})")
    parser.add_argument(
        "--style",
        choices=sorted(STYLES),
        default=None,
        help=f"the new style (default: {DEFAULT_STYLE}; photo-patches: bgr)",
    )
    parser.add_argument(
        "--learning-rates",
        type=float,
        nargs="+",
        default=None,
        help="learning rates swept for both methods; the middle one gives the saved adapters and the grids "
        f"(default: {' '.join(map(str, DEFAULT_LEARNING_RATES))})",
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
    parser.add_argument(
        "--verbose", "--debug", action="store_true", help="also print what optional libraries log as they load"
    )
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """Apply the command-line overrides to the default (or ``--quick``) settings."""
    from .settings import DemoSettings

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
    if any(flag in (sys.argv[1:] if argv is None else argv) for flag in VERBOSE_FLAGS):
        keep_import_noise()
    else:
        drop_import_noise()
    args = parse_args(argv)
    if args.threads < 1 or args.pretrain_threads < 1:
        raise SystemExit("--threads and --pretrain-threads must be at least 1.")
    import torch

    from ..registration import register
    from .run import run_demo
    from .settings import default_cache_root

    register()
    torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    cache_root = None if args.no_cache else (args.cache_dir or default_cache_root())
    return run_demo(
        settings, args.output_dir, cache_root, pretrain_threads=args.pretrain_threads, pretrain=args.pretrain
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m peft_sara.demo`` and ``peft-sara-demo``."""
    run_from_args(argv)
    return 0
