"""Cost of SaRA's nuclear-norm low-rank loss, and what it does to the rank of the learned update.

One run, same model/batch/seed: median SaRA training-step time without the loss (lambda_rank=0) and with it at the
default settings (one sampled layer per step, exact SVD) and with the randomized SVD; the overhead in % of the step.
Then a short training run with and without the loss, reporting the nuclear norm and effective rank of Delta_W.

    python -m benchmarks.regularizer --preset small --batch-size 4 --threads 1   # CPU (committed result)
    python -m benchmarks.regularizer --preset sd15                              # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peft import get_peft_model  # noqa: E402

import peft_sara  # noqa: E402
from benchmarks.common import PRESETS, RESULTS_DIR, build_model, diffusion_loss, machine_info, make_batch, set_threads  # noqa: E402
from peft_sara.regularizers import delta_rank_stats  # noqa: E402
from peft_sara.training import SaRATrainingHelper  # noqa: E402


def sara_model(preset, device, **config):
    model = build_model(preset, seed=0, device=device)
    return get_peft_model(model, peft_sara.SaRAConfig(trainable_fraction=preset.sara_fraction, **config))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(preset, device, batch, steps, warmup, **config):
    """Median step time (s) and median time spent in the regulariser's forward+backward (s)."""
    model = sara_model(preset, device, progressive_fraction=None, **config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    helper = SaRATrainingHelper(model, optimizer, total_steps=steps + warmup)
    step_times, regularizer_times = [], []
    for step in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        loss = diffusion_loss(model, batch)
        synchronize(device)
        regularizer_start = time.perf_counter()
        regularization = helper.regularization()
        if regularization.requires_grad:
            regularization.backward()
        synchronize(device)
        regularizer_time = time.perf_counter() - regularizer_start
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        helper.step()
        synchronize(device)
        if step >= warmup:
            step_times.append(time.perf_counter() - start)
            regularizer_times.append(regularizer_time)
    return statistics.median(step_times), statistics.median(regularizer_times), len(helper.rank_layers)


def rank_after_training(preset, device, batch_size, steps, lr, **config):
    """Mean/median effective rank and total nuclear norm of Delta_W over the low-rank-eligible layers."""
    model = sara_model(preset, device, init_weights=True, progressive_fraction=0.5, **config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-2)
    helper = SaRATrainingHelper(model, optimizer, total_steps=steps, seed=0)
    for step in range(steps):
        batch = make_batch(preset, batch_size, seed=step, device=device)
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=40, help="steps of the rank experiment (0 skips it)")
    parser.add_argument("--lambda-rank", type=float, default=5e-3, help="the paper's appendix value")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank-min-dim", type=int, default=64, help="SaRAConfig.rank_min_dim (library default 64)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    set_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset]
    batch = make_batch(preset, args.batch_size, seed=0, device=device)
    timing = {}
    common = dict(rank_min_dim=args.rank_min_dim)
    settings = {
        "no low-rank loss": dict(lambda_rank=0.0),
        "default (1 layer/step, exact SVD)": dict(lambda_rank=args.lambda_rank),
        "1 layer/step, randomized SVD q=32": dict(lambda_rank=args.lambda_rank, rank_method="randomized"),
        "all layers, randomized SVD q=32": dict(lambda_rank=args.lambda_rank, rank_method="randomized",
                                                rank_layers_per_step="all"),
    }
    for name, config in settings.items():
        step, regularizer, eligible = time_steps(preset, device, batch, args.steps, args.warmup, **common, **config)
        timing[name] = {"step_s": step, "regularizer_s": regularizer, "eligible_layers": eligible}
    baseline = timing["no low-rank loss"]["step_s"]
    print(f"\nLow-rank loss cost, preset={preset.name}, batch={args.batch_size}, device={device}")
    print(f"{'setting':40s} {'step (s)':>10s} {'reg (s)':>10s} {'reg % of step':>14s} {'step vs none':>13s}")
    for name, row in timing.items():
        row["regularizer_pct_of_step"] = 100 * row["regularizer_s"] / row["step_s"]
        row["step_overhead_pct"] = 100 * (row["step_s"] / baseline - 1)
        print(f"{name:40s} {row['step_s']:10.4f} {row['regularizer_s']:10.4f} "
              f"{row['regularizer_pct_of_step']:13.1f}% {row['step_overhead_pct']:+12.1f}%")

    ranks = {}
    if args.train_steps:
        for name, config in {
            "lambda_rank=0": dict(lambda_rank=0.0),
            f"lambda_rank={args.lambda_rank:g} (1 layer/step)": dict(lambda_rank=args.lambda_rank),
            f"lambda_rank={args.lambda_rank:g} (all layers)": dict(lambda_rank=args.lambda_rank,
                                                                   rank_layers_per_step="all"),
        }.items():
            ranks[name] = rank_after_training(preset, device, args.batch_size, args.train_steps, args.lr, **common,
                                              **config)
        print(f"\nDelta_W after {args.train_steps} steps (lr {args.lr:g}, re-selection at half), eligible layers")
        print(f"{'setting':40s} {'mean eff. rank':>15s} {'median':>8s} {'max rank':>9s} {'sum ||dW||_*':>13s}")
        for name, row in ranks.items():
            if not row["layers"]:
                print(f"{name:40s} no layer qualifies (min dimension > rank_min_dim)")
                continue
            print(f"{name:40s} {row['mean_effective_rank']:15.2f} {row['median_effective_rank']:8.2f} "
                  f"{row['mean_max_rank']:9.1f} {row['total_nuclear_norm']:13.4f}")

    result = {"preset": preset.name, "batch_size": args.batch_size, "device": str(device),
              "machine": machine_info(device, args.threads), "timing": timing, "rank": ranks, "args": {
                  k: str(v) for k, v in vars(args).items()}}
    out = args.out or RESULTS_DIR / f"regularizer-{preset.name}-bs{args.batch_size}-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
