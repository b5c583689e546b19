"""How well a trained SaRA adapter travels as a LoRA: export error vs rank, with and without the low-rank loss.

Fine-tunes the built-in demo's digit UNet (``peft_sara.demo``: same base, data, style, steps and learning rate) once
per ``lambda_rank``, then exports each adapter with ``peft_sara.conversion.convert_to_lora`` at several ranks and
reports the whole-adapter relative Frobenius error ``sqrt(sum ||E_l||^2 / sum ||Delta_W_l||^2)``, the worst layer's,
and the LoRA parameter count (SaRA's stored entries for comparison).

    python -m benchmarks.export_rank                       # default demo settings (base cached by the demo)
    python -m benchmarks.export_rank --quick               # tiny settings, under a minute
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/export_rank.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from peft_sara.conversion import convert_to_lora, parse_rank
from peft_sara.demo.data import apply_style, load_digit_splits, of_classes
from peft_sara.demo.diffusion import build_noise_scheduler, load_or_pretrain
from peft_sara.demo.finetune import finetune, make_sara_model
from peft_sara.demo.settings import DemoSettings, cache_key, default_cache_root
from peft_sara.tuner.layer import count_entries

DEFAULT_RANKS = ("1", "2", "4", "8", "16", "0.9", "0.99", "full")
DEFAULT_LAMBDAS = (0.0, 5e-4, 5e-3)  # off; the official script's value (the demo's); the paper appendix's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export_rank", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the demo's tiny settings")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the demo's)")
    parser.add_argument("--ranks", nargs="+", default=list(DEFAULT_RANKS), help="ranks: integers, fractions, full")
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS), help="lambda_rank values")
    parser.add_argument("--rank-layers-per-step", default="1", help="layers the loss samples per step (or 'all')")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the demo's pretrained-model cache")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/export_rank.json"), help="JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    steps = args.steps or settings.finetune_steps
    ranks = [parse_rank(rank) for rank in args.ranks]
    splits = load_digit_splits(settings.heldout_fraction, settings.seed)
    images, labels = of_classes(splits.train_images, splits.train_labels, settings.styled_classes)
    images = apply_style(images, settings.style)
    scheduler = build_noise_scheduler()
    cache_root = args.cache_dir or default_cache_root()
    base = load_or_pretrain(
        settings.unet_config,
        scheduler,
        splits.train_images,
        splits.train_labels,
        steps=settings.pretrain_steps,
        batch_size=settings.pretrain_batch_size,
        learning_rate=settings.pretrain_learning_rate,
        seed=settings.seed,
        cache_folder=cache_root / cache_key(settings),
    ).unet
    per_step = "all" if args.rank_layers_per_step == "all" else int(args.rank_layers_per_step)
    runs = []
    for lambda_rank in args.lambdas:
        model = make_sara_model(base, settings.trainable_fraction, lambda_rank, settings.rank_min_dim)
        model.peft_config["default"].rank_layers_per_step = per_step  # read by the training helper
        start = time.perf_counter()
        history = finetune(
            model,
            scheduler,
            images,
            labels,
            steps=steps,
            batch_size=settings.finetune_batch_size,
            learning_rate=settings.sara_learning_rate,
            seed=settings.seed,
            description=f"SaRA, lambda_rank={lambda_rank:g}",
            use_sara_helper=True,
        )
        results = []
        for rank in ranks:
            export = convert_to_lora(model, rank=rank, component="unet")
            results.append(
                {
                    "rank": rank,
                    "total_relative_error": export.total_error,
                    "max_layer_relative_error": export.max_error,
                    "lora_parameters": export.parameter_count(),
                    "mean_layer_rank": sum(f.rank for _, f in export.layers()) / len(export.layers()),
                }
            )
        runs.append(
            {
                "lambda_rank": lambda_rank,
                "final_loss": sum(history.losses[-20:]) / len(history.losses[-20:]),
                "sara_entries": count_entries(model.get_base_model(), "default"),
                "seconds": time.perf_counter() - start,
                "exports": results,
            }
        )
    report = {
        "settings": "quick" if args.quick else "default",
        "finetune_steps": steps,
        "rank_layers_per_step": args.rank_layers_per_step,
        "trainable_fraction": settings.trainable_fraction,
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwrote {args.output}")
    return 0


def print_table(report: dict) -> None:
    """Relative error of the whole adapter per rank (rows) and lambda_rank (columns)."""
    runs = report["runs"]
    header = ["rank", *[f"lambda={run['lambda_rank']:g}" for run in runs], "LoRA params"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for position, row in enumerate(runs[0]["exports"]):
        errors = [f"{run['exports'][position]['total_relative_error']:.3f}" for run in runs]
        print(" | ".join([str(row["rank"]), *errors, f"{row['lora_parameters']:,}"]))
    print(" | ".join(["SaRA entries", *[f"{run['sara_entries']:,}" for run in runs], ""]))


if __name__ == "__main__":
    raise SystemExit(main())
