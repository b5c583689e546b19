"""The quality benchmarks' figures (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .analysis import group_runs, mean_and_spread, mean_front, mean_trajectory, run_points
from .methods import COLORS, LABELS

X_LABEL = "new task: held-out loss change (%)  ← learned more"
Y_LABEL = "untouched classes: held-out loss change (%)  ↓ kept more"
LINESTYLES = (":", "-", "--", "-.")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)


def plot_fronts(
    runs: Sequence[dict[str, Any]], methods: Sequence[str], budgets: Sequence[float], path: Path, title: str
) -> None:
    """One panel per budget: each method's mean front over seeds (band: ± one standard deviation), and every
    checkpoint of every run as a faint dot."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(budgets), figsize=(5.2 * len(budgets), 4.6), squeeze=False, sharey=True)
    by_method_budget = group_runs(runs, "method", "budget")
    for axis, budget in zip(axes[0], budgets):
        for method in methods:
            method_runs = by_method_budget.get((method, budget)) or next(
                (
                    items
                    for (name, _), items in by_method_budget.items()
                    if name == method and method in ("full", "lora_r8")
                ),
                None,
            )
            if not method_runs:
                continue
            points = [point for run in method_runs for point in run_points(run)[1:]]
            axis.scatter(*zip(*points), s=6, color=COLORS[method], alpha=0.25, linewidths=0)
            lowest = min(point[0] for point in points)
            grid = [lowest + (0 - lowest) * index / 60 for index in range(61)]
            curve = mean_front(method_runs, grid)
            if curve:
                xs, means, spreads = zip(*curve)
                params = method_runs[0]["trainable_params"]
                axis.plot(xs, means, color=COLORS[method], linewidth=2, label=f"{LABELS[method]} ({params:,})")
                axis.fill_between(
                    xs,
                    [m - s for m, s in zip(means, spreads)],
                    [m + s for m, s in zip(means, spreads)],
                    color=COLORS[method],
                    alpha=0.15,
                    linewidth=0,
                )
        axis.plot(0, 0, marker="*", color="black", markersize=12, linestyle="none")
        axis.axhline(0, color="gray", linewidth=0.8)
        axis.set_title(f"budget {budget:.0%} of targeted weights", fontsize=10)
        axis.set_xlabel(X_LABEL, fontsize=8)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper right")
    axes[0][0].set_ylabel(Y_LABEL, fontsize=8)
    figure.suptitle(title, fontsize=10)
    _save(figure, path)


def plot_paths(runs: Sequence[dict[str, Any]], methods: Sequence[str], path: Path, title: str) -> None:
    """Mean path over seeds through the training steps, one line per method and learning rate (line style: lowest
    to highest rate), with ± one standard deviation crosses at the end."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5.5))
    for method in methods:
        by_rate = group_runs([run for run in runs if run["method"] == method], "learning_rate")
        for position, ((rate,), rate_runs) in enumerate(sorted(by_rate.items())):
            trajectory = mean_trajectory(rate_runs)
            xs, ys = [item[0] for item in trajectory], [item[1] for item in trajectory]
            axis.plot(xs, ys, color=COLORS[method], linestyle=LINESTYLES[position % 4], marker="o", markersize=2.5)
            axis.errorbar(
                xs[-1],
                ys[-1],
                xerr=trajectory[-1][2],
                yerr=trajectory[-1][3],
                color=COLORS[method],
                marker="o",
                markersize=6,
                label=f"{LABELS[method]}, lr {rate:g}",
            )
    axis.plot(0, 0, marker="*", color="black", markersize=12, linestyle="none", label="base model")
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set_xlabel(X_LABEL)
    axis.set_ylabel(Y_LABEL)
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6.5, ncol=2, loc="upper right")
    _save(figure, path)


def plot_samples(runs: Sequence[dict[str, Any]], methods: Sequence[str], base: dict[str, float], path: Path) -> None:
    """Sample quality per method and learning rate (mean ± std over seeds): the judge's accuracy on the fine-tuned
    classes in the new style (x) against its accuracy on the untouched classes (y), and the same for Fréchet
    distances."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = (
        ("accuracy", "fine-tuned classes judged right, in the new style", "untouched classes judged right", 100),
        (
            "frechet",
            "Fréchet distance, fine-tuned classes vs real (new style)",
            "Fréchet distance, untouched classes",
            1,
        ),
    )
    for axis, (metric, xlabel, ylabel, scale) in zip(axes, panels):
        for method in methods:
            by_rate = group_runs([run for run in runs if run["method"] == method and "samples" in run], "learning_rate")
            for position, ((rate,), rate_runs) in enumerate(sorted(by_rate.items())):
                xs = [run["samples"][f"styled_classes_{metric}"] * scale for run in rate_runs]
                ys = [run["samples"][f"other_classes_{metric}"] * scale for run in rate_runs]
                (mean_x, std_x), (mean_y, std_y) = mean_and_spread(xs), mean_and_spread(ys)
                axis.errorbar(
                    mean_x,
                    mean_y,
                    xerr=std_x,
                    yerr=std_y,
                    color=COLORS[method],
                    marker="osD"[position % 3],
                    markersize=5,
                    label=f"{LABELS[method]}, lr {rate:g}" if metric == "accuracy" else None,
                )
        axis.plot(
            base[f"styled_classes_{metric}"] * scale,
            base[f"other_classes_{metric}"] * scale,
            marker="*",
            color="black",
            markersize=12,
            linestyle="none",
            label="base model" if metric == "accuracy" else None,
        )
        axis.set_xlabel(xlabel + (" (%)" if scale == 100 else ""), fontsize=8)
        axis.set_ylabel(ylabel + (" (%)" if scale == 100 else ""), fontsize=8)
        axis.grid(alpha=0.3)
    axes[0].set_title("better: right and up", fontsize=9)
    axes[1].set_title("better: left and down", fontsize=9)
    figure.legend(fontsize=6.5, loc="center right")
    figure.tight_layout(rect=(0, 0, 0.8, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_zeroing(rows: Sequence[dict[str, Any]], metrics: Sequence[tuple[str, str]], path: Path, title: str) -> None:
    """One panel per metric: its change against the fraction of weights zeroed, one curve per rule (smallest,
    random, largest)."""
    plt = _pyplot()
    colors = {"smallest": "tab:red", "random": "tab:gray", "largest": "black"}
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 4), squeeze=False)
    for axis, (key, label) in zip(axes[0], metrics):
        for rule, color in colors.items():
            rule_rows = sorted((row for row in rows if row["rule"] == rule), key=lambda row: row["fraction"])
            if not rule_rows or key not in rule_rows[0]:
                continue
            axis.plot(
                [100 * row["fraction"] for row in rule_rows],
                [row[key] for row in rule_rows],
                color=color,
                marker="o",
                markersize=3,
                label=f"{rule} |w|" if rule != "random" else "random weights",
            )
        axis.set_xscale("log")
        axis.set_xlabel("weights zeroed in every adaptable layer (%)", fontsize=8)
        axis.set_ylabel(label, fontsize=8)
        if key.endswith("change_pct") or key.endswith("relative_change"):
            axis.set_yscale("symlog", linthresh=1)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    _save(figure, path)


def plot_export_error(variants: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Whole-adapter relative export error against the LoRA rank, one line per variant (mean over seeds)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.4))
    for method, report in variants.items():
        ranks = [item["rank"] for item in report["exports"] if item["rank"].isdigit()]
        errors = [item["error_mean"] for item in report["exports"] if item["rank"].isdigit()]
        axis.plot([int(rank) for rank in ranks], errors, marker="o", color=COLORS[method], label=LABELS[method])
    axis.set_xscale("log", base=2)
    axis.set_xlabel("LoRA rank of the export (every layer)")
    axis.set_ylabel("relative error ||ΔW - BA||_F / ||ΔW||_F (whole adapter)")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    _save(figure, path)
