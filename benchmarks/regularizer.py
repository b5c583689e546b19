"""Cost of SaRA's nuclear-norm low-rank loss, and what it does to the rank of the learned update.

One run, same model/batch/seed: median SaRA training-step time without the loss (lambda_rank=0) and with it at the
default settings (one sampled layer per step, exact SVD) and with the randomized SVD; the overhead in % of the step.
Then a short training run with and without the loss, reporting the nuclear norm and effective rank of Delta_W.

    python -m benchmarks.regularizer --preset small --batch-size 4 --threads 1   # CPU (committed result)
    python -m benchmarks.regularizer --preset sd15                              # GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/regularizer.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from peft import get_peft_model

import peft_sara
from benchmarks.flags import RunSetup, add_common_arguments, add_selection_arguments, setup_run
from benchmarks.measure import PhaseClock, median, set_threads
from benchmarks.report import finish_machine_info, format_table, results_path, write_results
from benchmarks.workload import diffusion_loss, make_batch
from peft_sara.presets import build_model
from peft_sara.training import SaRATrainingHelper
from peft_sara.tuner.regularizers import delta_rank_stats

TIMING_COLUMNS = [
    ("setting", "setting", ""),
    ("step_s", "step (s)", ".4f"),
    ("regularizer_s", "reg (s)", ".4f"),
    ("regularizer_pct_of_step", "reg % of step", ".1f"),
    ("step_overhead_pct", "step vs none %", "+.1f"),
]
RANK_COLUMNS = [
    ("setting", "setting", ""),
    ("mean_effective_rank", "mean eff. rank", ".2f"),
    ("median_effective_rank", "median", ".2f"),
    ("mean_max_rank", "max rank", ".1f"),
    ("total_nuclear_norm", "sum ||dW||_*", ".4f"),
]


def sara_model(run: RunSetup, **config: Any):
    """The preset's model (seeded random weights) with a SaRA adapter selecting by the run's selection flags."""
    model = build_model(run.preset, seed=run.spec["seed"], device=run.device)
    return get_peft_model(model, peft_sara.SaRAConfig(**run.selection, **config))


def _sara_training(model, lr: float, total_steps: int, weight_decay: float = 1e-2, seed: int = 0):
    """AdamW on the model's trainable values and SaRA's training helper (low-rank loss, re-selection)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    return optimizer, SaRATrainingHelper(model, optimizer, total_steps=total_steps, seed=seed)


def time_steps(run: RunSetup, batch, steps: int, warmup: int, **config: Any) -> tuple[float, float, int]:
    """Median step time (s), median time spent in the regulariser's forward+backward (s), eligible layers."""
    model = sara_model(run, progressive_fraction=None, **config)
    optimizer, helper = _sara_training(model, lr=1e-4, total_steps=steps + warmup, seed=run.spec["seed"])
    step_times, regularizer_times = [], []
    for step in range(warmup + steps):
        clock = PhaseClock(run.device)
        loss = diffusion_loss(model, batch)
        clock.mark("forward")
        regularization = helper.regularization()
        if regularization.requires_grad:
            regularization.backward()
        clock.mark("regularizer")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        helper.step()
        clock.mark("rest")
        if step >= warmup:
            step_times.append(sum(clock.wall.values()))
            regularizer_times.append(clock.wall["regularizer"])
    return median(step_times), median(regularizer_times), len(helper.rank_layers)


def rank_after_training(run: RunSetup, steps: int, lr: float, **config: Any) -> dict:
    """Mean/median effective rank and total nuclear norm of Delta_W over the low-rank-eligible layers."""
    model = sara_model(run, init_weights=True, progressive_fraction=0.5, **config)
    seed = run.spec["seed"]
    optimizer, helper = _sara_training(model, lr=lr, total_steps=steps, seed=seed)
    for step in range(steps):
        batch = make_batch(run.preset, run.spec["batch_size"], seed=seed + step, device=run.device)
        loss = diffusion_loss(model, batch) + helper.regularization()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        helper.step()
    stats = [delta_rank_stats(layer, "default") for layer in helper.rank_layers]
    if not stats:
        return {"layers": 0}
    effective = [s["effective_rank"] for s in stats]
    return {
        "layers": len(stats),
        "mean_effective_rank": statistics.mean(effective),
        "median_effective_rank": statistics.median(effective),
        "mean_max_rank": statistics.mean(min(s["shape"]) for s in stats),
        "total_nuclear_norm": sum(s["nuclear_norm"] for s in stats),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "regularizer", batch_size=4)
    add_selection_arguments(parser, "SaRA threshold instead of a fraction (pre-trained weights only)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=40, help="steps of the rank experiment (0 skips it)")
    parser.add_argument("--lambda-rank", type=float, default=5e-3, help="the paper's appendix value")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank-min-dim", type=int, default=64, help="SaRAConfig.rank_min_dim (library default 64)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    run = setup_run(args)
    args.threads, preset, device = run.threads, run.preset, run.device
    set_threads(run.threads)
    batch = make_batch(preset, args.batch_size, seed=args.seed, device=device)
    common = dict(rank_min_dim=args.rank_min_dim)
    settings = {
        "no low-rank loss": dict(lambda_rank=0.0),
        "default (1 layer/step, exact SVD)": dict(lambda_rank=args.lambda_rank),
        "1 layer/step, randomized SVD q=32": dict(lambda_rank=args.lambda_rank, rank_method="randomized"),
        "all layers, randomized SVD q=32": dict(
            lambda_rank=args.lambda_rank, rank_method="randomized", rank_layers_per_step="all"
        ),
    }
    timing = {}
    for name, config in settings.items():
        step, regularizer, eligible = time_steps(run, batch, args.steps, args.warmup, **common, **config)
        timing[name] = {"step_s": step, "regularizer_s": regularizer, "eligible_layers": eligible}
    baseline = timing["no low-rank loss"]["step_s"]
    for row in timing.values():
        row["regularizer_pct_of_step"] = 100 * row["regularizer_s"] / row["step_s"]
        row["step_overhead_pct"] = 100 * (row["step_s"] / baseline - 1)
    print(f"\nLow-rank loss cost, preset={preset.name}, batch={args.batch_size}, device={device}")
    print(format_table([{"setting": name, **row} for name, row in timing.items()], TIMING_COLUMNS))

    ranks = {}
    if args.train_steps:
        for name, config in {
            "lambda_rank=0": dict(lambda_rank=0.0),
            f"lambda_rank={args.lambda_rank:g} (1 layer/step)": dict(lambda_rank=args.lambda_rank),
            f"lambda_rank={args.lambda_rank:g} (all layers)": dict(
                lambda_rank=args.lambda_rank, rank_layers_per_step="all"
            ),
        }.items():
            ranks[name] = rank_after_training(run, args.train_steps, args.lr, **common, **config)
        print(f"\nDelta_W after {args.train_steps} steps (lr {args.lr:g}, re-selection at half), eligible layers")
        print(format_table([{"setting": name, **row} for name, row in ranks.items() if row["layers"]], RANK_COLUMNS))
        for name, row in ranks.items():
            if not row["layers"]:
                print(f"{name}: no layer qualifies (min dimension > rank_min_dim)")

    finish_machine_info(run.machine)
    result = {
        "preset": preset.name,
        "batch_size": args.batch_size,
        "device": str(device),
        "machine": run.machine,
        "timing": timing,
        "rank": ranks,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    write_results(results_path(args.out, "regularizer", preset, args.batch_size, device), result)
    return result


if __name__ == "__main__":
    main()
