"""Adaptation vs preservation: SaRA against LoRA (same parameter count, and PEFT's default r=8), full fine-tuning,
PEFT's Super-Tuning (smallest-magnitude mode) and SHiRA, over training steps, budgets, a learning-rate sweep per
method and seeds. Also scores samples of every run at the middle budget with the judge (sample quality).

Writes ``tradeoff_<dataset>.json`` (every run's trajectory, the matched-loss comparison, sample scores) and three
figures: ``tradeoff_fronts_<dataset>.png`` (the fronts per budget), ``tradeoff_paths_<dataset>.png`` (the mean paths
at the middle budget) and ``sample_quality_<dataset>.png``.

    python -m benchmarks.quality.tradeoff                      # digits, full size (about 15 minutes on 2 cores)
    python -m benchmarks.quality.tradeoff --dataset photo-patches
    python -m benchmarks.quality.tradeoff --tiny --workers 1   # smoke test
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
    RESULTS_DIR,
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
from benchmarks.quality.methods import LABELS, MAIN_METHODS
from benchmarks.quality.plots import plot_fronts, plot_paths, plot_samples

UNBUDGETED = ("full", "lora_r8")  # their size does not follow the budget


def middle(values: tuple[float, ...]) -> float:
    """The middle entry of ``values`` (sorted)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def methods_for(settings: QualitySettings) -> tuple[str, ...]:
    """The methods compared on ``settings.dataset`` (photo patches: SaRA, LoRA and full fine-tuning)."""
    return MAIN_METHODS if settings.dataset == "digits" else ("sara", "lora", "full")


def budgets_for(method: str, settings: QualitySettings) -> tuple[float, ...]:
    """The budgets ``method`` runs at: all of them for SaRA and same-size LoRA on digits, else the middle one."""
    if settings.dataset == "digits" and method in ("sara", "lora"):
        return settings.budgets
    return (middle(settings.budgets),)


def make_jobs(settings: QualitySettings) -> list[Job]:
    """Every run: method x budget x learning rate x seed; samples are scored at the middle budget."""
    sampled_budget = middle(settings.budgets)
    return [
        Job(method, budget, rate, seed, sample=budget == sampled_budget)
        for method in methods_for(settings)
        for budget in budgets_for(method, settings)
        for rate in settings.learning_rates(method)
        for seed in settings.seeds
    ]


def summarize(runs: list[dict[str, Any]], settings: QualitySettings, context: Context) -> dict[str, Any]:
    """Forgetting at matched new-task loss per method and budget, and the per-rate table at the middle budget."""
    methods = methods_for(settings)
    budget = middle(settings.budgets)
    by_method_budget = group_runs(runs, "method", "budget")
    at_middle = {method: by_method_budget[method, budget] for method in methods}
    targets = reachable_targets(at_middle)
    matched = {}
    for (method, run_budget), method_runs in by_method_budget.items():
        matched[f"{method}@{run_budget:g}"] = {
            "method": method,
            "budget": run_budget,
            "trainable_params": method_runs[0]["trainable_params"],
            "note": method_runs[0]["note"],
            "forgetting_at_matched_new_task_change": matched_forgetting(method_runs, targets),
        }
    per_rate = []
    for method in methods:
        for (rate,), rate_runs in sorted(group_runs(at_middle[method], "learning_rate").items()):
            finals = [run["checkpoints"][-1] for run in rate_runs]
            base = context.base_losses
            row = {
                "method": method,
                "learning_rate": rate,
                "trainable_params": rate_runs[0]["trainable_params"],
                "new_task_change_pct": mean_and_spread(
                    [change_pct(base["new_style"], item["new_style"]) for item in finals]
                ),
                "untouched_change_pct": mean_and_spread(
                    [change_pct(base["other_classes"], item["other_classes"]) for item in finals]
                ),
            }
            if all("samples" in run for run in rate_runs):
                for key in rate_runs[0]["samples"]:
                    row[key] = mean_and_spread([run["samples"][key] for run in rate_runs])
            per_rate.append(row)
    return {"targets": targets, "matched": matched, "middle_budget": budget, "per_rate_at_middle_budget": per_rate}


def summary_markdown(summary: dict[str, Any], settings: QualitySettings) -> str:
    """The matched-loss table and the per-rate table, as markdown."""
    lines: list[str] = []
    add = lines.append
    targets = summary["targets"]
    add(f"Forgetting (untouched-classes loss change, %) at matched new-task loss change ({settings.dataset}):")
    add("| method | budget | params | " + " | ".join(f"at {target:+.0f}%" for target in targets) + " |")
    add("|---|---|---|" + "---|" * len(targets))
    for entry in summary["matched"].values():
        cells = [
            format_mean(row["mean"], row["std"], 1, row["reached"], row["seeds"])
            for row in entry["forgetting_at_matched_new_task_change"]
        ]
        budget = "-" if entry["method"] in UNBUDGETED else f"{entry['budget']:.0%}"
        add(f"| {LABELS[entry['method']]} | {budget} | {entry['trainable_params']:,} | " + " | ".join(cells) + " |")
    add("")
    add(f"At budget {summary['middle_budget']:.0%}, end of training, mean ± std over seeds:")
    add(
        "| method | lr | new task % | untouched % | new-style samples right | untouched samples right | FD new | FD untouched |"
    )
    add("|---|---|---|---|---|---|---|---|")
    for row in summary["per_rate_at_middle_budget"]:
        samples = [
            f"{100 * row[key][0]:.0f} ± {100 * row[key][1]:.0f}%"
            if "accuracy" in key
            else f"{row[key][0]:.1f} ± {row[key][1]:.1f}"
            for key in (
                "styled_classes_accuracy",
                "other_classes_accuracy",
                "styled_classes_frechet",
                "other_classes_frechet",
            )
            if key in row
        ]
        add(
            f"| {LABELS[row['method']]} | {row['learning_rate']:g} | {format_mean(*row['new_task_change_pct'])} | "
            f"{format_mean(*row['untouched_change_pct'])} | " + " | ".join(samples) + " |"
        )
    return "\n".join(lines)


def run(settings: QualitySettings, workers: int, output_dir: Path, cache_root: Path | None = None) -> dict[str, Any]:
    """Run the comparison, write the JSON and figures, print the tables; returns the JSON payload."""
    context = make_context(settings, cache_root)
    jobs = make_jobs(settings)
    print(f"trade-off on {settings.dataset}: {len(jobs)} fine-tuning runs on {workers} worker(s)")
    runs = run_jobs(context, jobs, workers)
    summary = summarize(runs, settings, context)
    base_samples = context.score_samples(context.base)
    payload = {"setup": describe_setup(context), "base_samples": base_samples, "summary": summary, "runs": runs}
    write_json(output_path(output_dir, "tradeoff", settings, "json"), payload)
    methods = methods_for(settings)
    budgets = tuple(sorted({run["budget"] for run in runs}))
    plot_fronts(
        runs,
        methods,
        budgets,
        output_path(output_dir, "tradeoff_fronts", settings, "png"),
        f"Trade-off fronts on {settings.dataset} ({context.demo.style} style): mean over {len(settings.seeds)} seeds "
        f"of each seed's front over {len(settings.sparse_learning_rates)} learning rates x {len(settings.checkpoints)}"
        " checkpoints",
    )
    middle_runs = [run for run in runs if run["budget"] == summary["middle_budget"]]
    plot_paths(
        middle_runs,
        methods,
        output_path(output_dir, "tradeoff_paths", settings, "png"),
        f"Training paths on {settings.dataset}, budget {summary['middle_budget']:.0%} (mean over seeds, checkpoints "
        f"at steps {', '.join(map(str, settings.checkpoints))})",
    )
    plot_samples(middle_runs, methods, base_samples, output_path(output_dir, "sample_quality", settings, "png"))
    print("\n" + summary_markdown(summary, settings))
    return payload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's command line (shared by the other quality scripts)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    return parser.parse_args(argv)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--dataset, --tiny, --workers, --output-dir, --cache-dir."""
    parser.add_argument("--dataset", choices=("digits", "photo-patches"), default="digits")
    parser.add_argument("--tiny", action="store_true", help="smoke-test settings (seconds)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one torch thread each (default 2)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help=f"default: {RESULTS_DIR}")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the demo's pretrained-model cache")


def settings_from(args: argparse.Namespace) -> QualitySettings:
    """The settings the command line asks for."""
    return QualitySettings.tiny_settings(args.dataset) if args.tiny else QualitySettings.for_dataset(args.dataset)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    run(settings_from(args), args.workers, args.output_dir, args.cache_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
