"""``peft-sara analyze MODEL``: the paper's observation on a model: how many weights are tiny, per layer, and whether
zeroing them changes the output more than zeroing as many random weights."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .output import add_common_options, parse_arguments, print_json, print_table

if TYPE_CHECKING:
    import torch

# peft_sara.export.weight_analysis.DEFAULT_THRESHOLDS, written out so that `--help` imports nothing heavy (a test
# keeps the two equal)
DEFAULT_THRESHOLDS = (2e-4, 8e-4, 1e-3, 2e-3)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``peft-sara analyze``."""
    parser = argparse.ArgumentParser(
        prog="peft-sara analyze",
        description="For every Linear / Conv / Conv1D layer of a local diffusers or transformers model: the fraction "
        "of weights with |w| below each threshold (SaRA trains those), a histogram of log10 |w| (PNG), and, given "
        "sample inputs, the relative output change when those weights are zeroed versus zeroing as many random "
        "weights (the paper's test of 'temporarily ineffective' weights).",
    )
    parser.add_argument(
        "model", type=Path, help="local folder of a pipeline (model_index.json) or a model (config.json)"
    )
    parser.add_argument(
        "--component", default=None, help="pipeline component to analyse (default: the denoiser, unet / transformer)"
    )
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=list(DEFAULT_THRESHOLDS),
        help=f"magnitude thresholds (default: {' '.join(f'{t:g}' for t in DEFAULT_THRESHOLDS)})",
    )
    parser.add_argument(
        "--histogram", type=Path, default=Path("sara-weight-histogram.png"), help="where to write the histogram PNG"
    )
    parser.add_argument("--no-histogram", action="store_true", help="do not write the histogram")
    parser.add_argument(
        "--inputs",
        type=Path,
        default=None,
        help="a .safetensors file of forward keyword arguments (e.g. sample, timestep, encoder_hidden_states for a "
        "UNet): enables the zeroing test",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights zeroed for comparison")
    add_common_options(parser)
    return parser


def model_to_analyse(folder: Path, component: str | None) -> torch.nn.Module:
    """The model in ``folder``, or one component of the pipeline there (the denoiser by default)."""
    from ..export.sources import is_pipeline_folder, load_model_folder
    from ..pipelines import DENOISER_COMPONENTS

    if not is_pipeline_folder(folder):
        if component:
            raise SystemExit(f"--component applies to pipeline folders; '{folder}' holds a single model.")
        return load_model_folder(folder)
    candidates = [component] if component else [name for name in DENOISER_COMPONENTS if (folder / name).is_dir()]
    if not candidates or not (folder / candidates[0]).is_dir():
        raise SystemExit(f"The pipeline in '{folder}' has no component {component or DENOISER_COMPONENTS}.")
    return load_model_folder(folder / candidates[0])


def main(argv: list[str] | None = None) -> int:
    """Run ``peft-sara analyze``."""
    args = parse_arguments(build_parser(), argv)
    from safetensors.torch import load_file

    from ..conversion import save_histogram, small_weight_fractions, zeroing_effect
    from ..tuner.targets import coverage

    progress = not args.quiet and not args.json
    model = model_to_analyse(args.model, args.component)
    report = small_weight_fractions(model, args.thresholds, progress=progress)
    report["model"] = f"{args.model}" + (f" ({args.component})" if args.component else "")
    report["default_targets"] = str(coverage(model))
    report["histogram"] = None
    if not args.no_histogram:
        report["histogram"] = str(args.histogram) if save_histogram(model, args.histogram, args.thresholds) else None
    if args.inputs is not None:
        inputs = load_file(args.inputs)
        report["zeroing"] = zeroing_effect(model, inputs, args.thresholds, args.seed, progress=progress)
    if args.json:
        print_json(report)
        return 0
    keys = [f"{t:g}" for t in report["thresholds"]]
    rows = [{"module": row["module"], "weights": row["weights"], **row["fractions"]} for row in report["layers"]]
    print_table(rows, [("module", "layer"), ("weights", "weights")] + [(key, f"|w|<{key}") for key in keys])
    print()
    print(f"{type(model).__name__}: {report['weights']:,} weights in {len(rows)} layers; below each threshold:")
    print_table(
        [{"threshold": key, "fraction": report["fractions"][key]} for key in keys],
        [("threshold", "threshold"), ("fraction", "fraction")],
    )
    print(f"\nSaRA's default targets (no target_modules): {report['default_targets']}")
    if "zeroing" in report:
        print()
        print("relative output change when zeroing |w| < t versus as many random weights:")
        print_table(
            report["zeroing"],
            [
                ("threshold", "threshold"),
                ("zeroed_weights", "zeroed"),
                ("relative_change_small", "small weights"),
                ("relative_change_random", "random weights"),
            ],
        )
    if report["histogram"]:
        print(f"\nhistogram: {report['histogram']}")
    elif not args.no_histogram:
        print("\nno histogram: install matplotlib (`pip install peft-sara[demo]`)")
    return 0


__all__ = ["main", "build_parser"]
