"""Turning runs into trade-off fronts and comparisons at matched new-task loss (pure functions, no torch).

A run's *points* are (x, y) = (change of the held-out loss on the new task, change of the held-out loss on the
untouched classes), both in % of the base model's, at every checkpoint; the base model is (0, 0). Lower left is
better: more learned, less forgotten. A method's *front* (at one budget and seed) is the lower-left Pareto front of
the points of all its learning rates and checkpoints; its *forgetting at matched new-task loss* x* is the front's
piecewise-linear interpolation at x* (undefined where the front never gets that far).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

Point = tuple[float, float]
REACH_TOLERANCE = 1e-6  # percentage points: a front that stops this close to a target reaches it (rounding)


def run_points(run: dict[str, Any]) -> list[Point]:
    """(new-task change %, untouched-classes change %) at each checkpoint of ``run``, the base model first."""
    base = run["checkpoints"][0]
    return [
        (
            100.0 * (item["new_style"] - base["new_style"]) / base["new_style"],
            100.0 * (item["other_classes"] - base["other_classes"]) / base["other_classes"],
        )
        for item in run["checkpoints"]
    ]


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """The points no other point beats on both axes, sorted by x (so y falls as x grows)."""
    front: list[Point] = []
    for x, y in sorted(set(points)):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def front_value(front: Sequence[Point], x: float) -> float | None:
    """The front's forgetting at new-task change ``x`` (linear between front points); None if never reached."""
    if not front or x < front[0][0] - REACH_TOLERANCE:
        return None
    x = max(x, front[0][0])
    for (x0, y0), (x1, y1) in zip(front, front[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else min(y0, y1)
    return front[-1][1]  # beyond the last point: no worse than it


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def group_runs(runs: Iterable[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    """``runs`` grouped by the values of ``keys``, in first-seen order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(tuple(run[key] for key in keys), []).append(run)
    return groups


def seed_fronts(runs: Iterable[dict[str, Any]]) -> dict[int, list[Point]]:
    """Per seed, the front over every learning rate and checkpoint of ``runs`` (one method at one budget)."""
    points: dict[int, list[Point]] = {}
    for run in runs:
        points.setdefault(run["seed"], []).extend(run_points(run))
    return {seed: pareto_front(items) for seed, items in sorted(points.items())}


def matched_forgetting(runs: Sequence[dict[str, Any]], targets: Sequence[float]) -> list[dict[str, Any]]:
    """For each new-task change target: the forgetting on the front of each seed, its mean and spread, and how many
    seeds reach the target at all."""
    fronts = seed_fronts(runs)
    rows = []
    for target in targets:
        values = [value for front in fronts.values() if (value := front_value(front, target)) is not None]
        mean, spread = mean_and_spread(values)
        rows.append(
            {
                "target": target,
                "mean": mean,
                "std": spread,
                "reached": len(values),
                "seeds": len(fronts),
                "values": values,
            }
        )
    return rows


def mean_front(runs: Sequence[dict[str, Any]], grid: Sequence[float]) -> list[tuple[float, float, float]]:
    """(x, mean, std) of the seeds' fronts on ``grid``, where every seed's front reaches x."""
    fronts = seed_fronts(runs)
    curve = []
    for x in grid:
        values = [front_value(front, x) for front in fronts.values()]
        if values and all(value is not None for value in values):
            mean, spread = mean_and_spread(values)  # type: ignore[arg-type]
            curve.append((x, mean, spread))
    return curve


def mean_trajectory(runs: Sequence[dict[str, Any]]) -> list[tuple[float, float, float, float]]:
    """(mean x, mean y, std x, std y) over seeds at each checkpoint of runs that share a method, budget and rate."""
    per_seed = [run_points(run) for run in runs]
    trajectory = []
    for step_points in zip(*per_seed):
        xs, ys = [point[0] for point in step_points], [point[1] for point in step_points]
        (mean_x, std_x), (mean_y, std_y) = mean_and_spread(xs), mean_and_spread(ys)
        trajectory.append((mean_x, mean_y, std_x, std_y))
    return trajectory


def reachable_targets(runs_by_method: dict[str, Sequence[dict[str, Any]]], count: int = 3) -> list[float]:
    """``count`` new-task change targets (%, rounded to 5) that every method's fronts reach for most seeds: evenly
    spread between the base model and the weakest method's reach."""
    reaches = []
    for runs in runs_by_method.values():
        fronts = seed_fronts(runs)
        reaches.append(statistics.median(front[0][0] for front in fronts.values()))
    weakest = max(reaches)  # the least negative best reach
    if weakest >= -5:
        return [-5.0]
    step = weakest / count
    targets = sorted({5 * round(step * (index + 1) / 5) for index in range(count)}, reverse=True)
    return [float(target) for target in targets if target < 0]


def format_mean(
    mean: float, spread: float, digits: int = 1, reached: int | None = None, seeds: int | None = None
) -> str:
    """``'12.3 ± 0.4'``; ``'not reached'`` or a ``(2/3 seeds)`` note when seeds fall short."""
    if reached == 0 or math.isnan(mean):
        return "not reached"
    text = f"{mean:+.{digits}f} ± {spread:.{digits}f}"
    if reached is not None and seeds is not None and reached < seeds:
        text += f" ({reached}/{seeds} seeds)"
    return text
