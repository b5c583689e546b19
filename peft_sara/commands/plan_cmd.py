"""``peft-sara plan``: the peak memory of a SaRA / LoRA / full fine-tuning step, predicted on fake tensors."""

from __future__ import annotations

import argparse
import sys
import time

from ..constants import DEFAULT_THRESHOLD
from .output import parse_arguments, print_json

# The planner's choices (peft_sara.planning: PRESETS, METHODS, DTYPES, OPTIMIZERS, QUANTIZATIONS), written out so that
# `--help` imports nothing heavy (a test keeps them equal)
PRESET_NAMES = ("sd15", "sdxl", "sd3", "flux-dev", "sd15-half", "tiny")
METHODS = ("sara", "lora", "full")
DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "adamw8bit")
QUANTIZATIONS = ("4bit", "8bit")


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``peft-sara plan``."""
    parser = argparse.ArgumentParser(
        prog="peft-sara plan",
        description="Predict the peak memory of one training step (weights, adapter, gradients, optimizer, "
        "activations, temporaries) without a GPU or the weights: the model and step run on fake tensors under "
        "torch's MemTracker. SaRA's entry count is modelled from the fraction (selection needs real weights).",
        epilog="example: peft-sara plan --model sdxl --method sara --fraction 0.02 --resolution 1024 "
        "--batch-size 1 --dtype bfloat16 --gradient-checkpointing",
    )
    parser.add_argument(
        "--model", required=True, help=f"a preset ({', '.join(PRESET_NAMES)}) or a folder with a diffusers config.json"
    )
    parser.add_argument("--method", required=True, choices=METHODS, help="how the model is trained")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--fraction", type=float, help="SaRA: fraction of each targeted weight trained")
    selection.add_argument(
        "--threshold",
        type=float,
        help=f"SaRA: |w| < threshold (default {DEFAULT_THRESHOLD}); its fraction comes from the paper's SD1.5 counts",
    )
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument(
        "--target-modules", nargs="+", default=None, help="modules to adapt (default: SaRA's defaults, LoRA too)"
    )
    parser.add_argument("--resolution", type=int, required=True, help="image size in pixels (square)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the base model")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument(
        "--base-quantization", choices=QUANTIZATIONS, default=None, help="bitsandbytes base (SaRA / LoRA only)"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


class StageProgress:
    """Progress lines on stderr (``plan: <stage>... 1.2 s``), one per stage the planner reports."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, stage: str) -> None:
        if self.enabled:
            print(f"peft-sara plan: {stage} ({time.perf_counter() - self.start:.1f} s)", file=sys.stderr, flush=True)


def _check(args: argparse.Namespace) -> str | None:
    if args.method != "sara" and (args.fraction is not None or args.threshold is not None):
        return "--fraction and --threshold apply to --method sara only"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run ``peft-sara plan``."""
    parser = build_parser()
    args = parse_arguments(parser, argv, check=_check)
    from ..planning import MethodSpec, PlanRequest, fraction_for_threshold, plan_training_memory, resolve_model
    from ..planning.report import format_plan

    fraction = args.fraction
    if args.method == "sara" and fraction is None:
        fraction = fraction_for_threshold(args.threshold if args.threshold is not None else DEFAULT_THRESHOLD)
    try:
        request = PlanRequest(
            resolve_model(args.model),
            MethodSpec(args.method, fraction, args.rank, tuple(args.target_modules) if args.target_modules else None),
            args.resolution,
            args.batch_size,
            args.dtype,
            args.gradient_checkpointing,
            args.optimizer,
            args.base_quantization,
        )
    except ValueError as error:
        parser.error(str(error))
    plan = plan_training_memory(request, progress=StageProgress(not args.quiet))
    if args.threshold is not None or (args.method == "sara" and args.fraction is None):
        threshold = args.threshold if args.threshold is not None else DEFAULT_THRESHOLD
        plan.assumptions.append(f"threshold {threshold:g} taken as fraction {fraction:.4g} (paper's SD1.5 counts)")
    if args.json:
        print_json(plan.to_dict())
    else:
        print(format_plan(plan))
    return 0
