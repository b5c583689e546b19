"""Ablations as in the paper's Table 2, and the rank of the update.

At the middle budget, SaRA against: without progressive re-selection, without the low-rank loss, without both, the
low-rank loss on every layer at lambda 5e-3 (one that binds), and the largest-|w| or random entries of each layer
instead of the smallest (same count per layer). Each variant runs at the ablation learning rates and every seed;
every run also reports its update's nuclear norm and effective rank and the LoRA export error at several ranks.

Writes ``ablation_<dataset>.json``, ``ablation_<dataset>.png`` (mean paths through training) and
``export_error_<dataset>.png`` (export error vs LoRA rank).

    python -m benchmarks.quality.ablation
    python -m benchmarks.quality.ablation --tiny --workers 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from benchmarks.quality.analysis import format_mean, group_runs, matched_forgetting, mean_and_spread, reachable_targets
from benchmarks.quality.common import (
    Context,
    Job,
    QualitySettings,
    change_pct,
    describe_setup,
    make_context,
    output_path,
    run_jobs,
    write_json,
)
from benchmarks.quality.methods import ABLATIONS, LABELS
from benchmarks.quality.plots import plot_export_error, plot_paths
from benchmarks.quality.tradeoff import add_common_arguments, middle, settings_from

VARIANTS = ("sara", *ABLATIONS)


def make_jobs(settings: QualitySettings) -> list[Job]:
    """Every variant x ablation learning rate x seed at the middle budget, with rank statistics."""
    budget = middle(settings.budgets)
    return [
        Job(variant, budget, rate, seed, rank_stats=True)
        for variant in VARIANTS
        for rate in settings.ablation_learning_rates
        for seed in settings.seeds
    ]


def summarize(runs: list[dict[str, Any]], context: Context) -> dict[str, Any]:
    """Per variant: final losses, forgetting at matched new-task loss, rank statistics, export errors (mean ± std)."""
    by_variant = group_runs(runs, "method")
    # targets every variant but the strongly regularised one reaches (that one learns far less; it shows "not reached")
    targets = reachable_targets(
        {variant: items for (variant,), items in by_variant.items() if variant != "sara_rank_all"}
    )
    base = context.base_losses
    rows = {}
    for (variant,), variant_runs in by_variant.items():
        finals = [run["checkpoints"][-1] for run in variant_runs]
        ranks = [run["rank"] for run in variant_runs]
        exports = []
        for position, export in enumerate(ranks[0]["exports"]):
            errors = [item["exports"][position]["total_relative_error"] for item in ranks]
            mean, spread = mean_and_spread(errors)
            exports.append(
                {
                    "rank": export["rank"],
                    "error_mean": mean,
                    "error_std": spread,
                    "lora_parameters": export["lora_parameters"],
                    "mean_layer_rank": mean_and_spread(
                        [item["exports"][position]["mean_layer_rank"] for item in ranks]
                    )[0],
                }
            )
        rows[variant] = {
            "trainable_params": variant_runs[0]["trainable_params"],
            "new_task_change_pct": mean_and_spread([change_pct(base["new_style"], f["new_style"]) for f in finals]),
            "untouched_change_pct": mean_and_spread(
                [change_pct(base["other_classes"], f["other_classes"]) for f in finals]
            ),
            "forgetting_at_matched_new_task_change": matched_forgetting(variant_runs, targets),
            "nuclear_norm_total": mean_and_spread([item["nuclear_norm_total"] for item in ranks]),
            "mean_effective_rank": mean_and_spread([item["mean_effective_rank"] for item in ranks]),
            "mean_effective_rank_share": mean_and_spread([item["mean_effective_rank_share"] for item in ranks]),
            "trainable_after_reselection": [run["trainable_after_reselection"] for run in variant_runs],
            "exports": exports,
        }
    return {"targets": targets, "variants": rows}


def summary_markdown(summary: dict[str, Any]) -> str:
    """The ablation table (the paper's Table 2 layout) and the rank table, as markdown."""
    lines: list[str] = []
    add = lines.append
    targets = summary["targets"]
    add("Ablation (end of training; forgetting at matched new-task change), mean ± std over seeds:")
    header = ["variant", "new task %", "untouched %"] + [f"untouched at {t:+.0f}%" for t in targets]
    add("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for variant, row in summary["variants"].items():
        matched = [
            format_mean(item["mean"], item["std"], 1, item["reached"], item["seeds"])
            for item in row["forgetting_at_matched_new_task_change"]
        ]
        add(
            f"| {LABELS[variant]} | {format_mean(*row['new_task_change_pct'])} | "
            f"{format_mean(*row['untouched_change_pct'])} | " + " | ".join(matched) + " |"
        )
    exports = next(iter(summary["variants"].values()))["exports"]
    add("")
    add("Rank of the update and LoRA export error (whole adapter, relative Frobenius), mean over seeds:")
    header = ["variant", "nuclear norm", "effective rank"] + [f"error at r={item['rank']}" for item in exports]
    add("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for variant, row in summary["variants"].items():
        errors = [f"{item['error_mean']:.3f}" for item in row["exports"]]
        add(
            f"| {LABELS[variant]} | {row['nuclear_norm_total'][0]:.3g} | {row['mean_effective_rank'][0]:.1f} | "
            + " | ".join(errors)
            + " |"
        )
    return "\n".join(lines)


def run(settings: QualitySettings, workers: int, output_dir: Path, cache_root: Path | None = None) -> dict[str, Any]:
    """Run the ablations, write the JSON and figures, print the tables; returns the JSON payload."""
    context = make_context(settings, cache_root)
    jobs = make_jobs(settings)
    print(f"ablations on {settings.dataset}: {len(jobs)} fine-tuning runs on {workers} worker(s)")
    runs = run_jobs(context, jobs, workers)
    summary = summarize(runs, context)
    write_json(
        output_path(output_dir, "ablation", settings, "json"),
        {"setup": describe_setup(context), "summary": summary, "runs": runs},
    )
    plot_paths(
        runs,
        VARIANTS,
        output_path(output_dir, "ablation", settings, "png"),
        f"Ablations on {settings.dataset}, budget {middle(settings.budgets):.0%}: mean paths over seeds",
    )
    plot_export_error(
        summary["variants"],
        output_path(output_dir, "export_error", settings, "png"),
        f"How well each update travels as a LoRA ({settings.dataset}, budget {middle(settings.budgets):.0%})",
    )
    print("\n" + summary_markdown(summary))
    return {"summary": summary, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    run(settings_from(args), args.workers, args.output_dir, args.cache_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
