"""The demo's pictures: sample grids, the comparison figure, the trade-off plot and the loss curves.

The first half draws (grids of images, a figure of titled grids, loss and trade-off plots); the second half makes
the run's pictures from its models and records: :func:`save_pictures` samples and scores every model,
:func:`plot_tradeoff` and :func:`plot_losses` draw the fine-tuning runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel

from .diffusion import sample_images
from .judge import sample_scores
from .metrics import change_pct, lora_rank
from .records import DemoRun, MethodRun, class_names

METHOD_COLORS = {"SaRA": "tab:red", "LoRA": "tab:blue"}
CELL_SCALE = 6  # each 8x8 digit is drawn as a 48x48 block of pixels
GAP_VALUE = 128  # grey lines between digits, visible on both dark and light styles


def grid_array(images: torch.Tensor, per_row: int) -> np.ndarray:
    """uint8 array tiling ``images`` (N, C, H, W in [-1, 1]; C = 1 or 3) ``per_row`` to a row, with one-pixel grey
    gaps: (rows, columns) for grey images, (rows, columns, 3) for RGB."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    count, height, width = pixels.shape[:3]
    rows = -(-count // per_row)
    grid = np.full((rows * (height + 1) + 1, per_row * (width + 1) + 1, *pixels.shape[3:]), GAP_VALUE, dtype=np.uint8)
    for position, image in enumerate(pixels):
        row, column = divmod(position, per_row)
        grid[
            1 + row * (height + 1) : 1 + row * (height + 1) + height,
            1 + column * (width + 1) : 1 + column * (width + 1) + width,
        ] = image
    return grid


def save_grid(images: torch.Tensor, per_row: int, path: Path) -> None:
    """Save ``images`` as a PNG grid, scaled up (nearest neighbour) so single pixels stay crisp."""
    from PIL import Image

    grid = grid_array(images, per_row)
    picture = Image.fromarray(grid)
    picture.resize((grid.shape[1] * CELL_SCALE, grid.shape[0] * CELL_SCALE), Image.NEAREST).save(path)


def save_comparison_figure(
    panels: Sequence[Sequence[tuple[str, torch.Tensor]]],
    row_titles: Sequence[str],
    per_row: int,
    path: Path,
    captions: dict[tuple[str, str], str] | None = None,
) -> None:
    """One figure: a row of titled grids per class group (e.g. held-out target, base, SaRA, LoRA); ``captions``
    writes a line under the grid of (row title, panel title)."""
    captions = captions or {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(row) for row in panels)
    figure, axes = plt.subplots(len(panels), columns, figsize=(3.1 * columns, 2.5 * len(panels)), squeeze=False)
    for row_axes, row, row_title in zip(axes, panels, row_titles):
        for axis, (title, images) in zip(row_axes, row):
            axis.imshow(grid_array(images, per_row), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            axis.set_xlabel(captions.get((row_title, title), ""), fontsize=8)
            axis.set_title(title, fontsize=9)
            axis.set_xticks([])
            axis.set_yticks([])
        row_axes[0].set_ylabel(row_title, fontsize=9)
        for axis in row_axes[len(row) :]:
            axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    smoothed, running = [], None
    for value in values:
        running = value if running is None else weight * running + (1 - weight) * value
        smoothed.append(running)
    return smoothed


def save_loss_plot(curves: dict[str, Sequence[float]], markers: dict[str, int], path: Path, title: str) -> None:
    """Training loss per step (faint) and its moving average (bold) for each method; ``markers`` draws a dashed
    line at a named step (e.g. SaRA's progressive re-selection)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for (name, losses), color in zip(curves.items(), ("tab:red", "tab:blue", "tab:green")):
        steps = range(1, len(losses) + 1)
        axis.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8)
        axis.plot(steps, _smooth(losses), color=color, linewidth=2, label=f"{name} (moving average)")
    for label, step in markers.items():
        axis.axvline(step, color="gray", linestyle="--", linewidth=1)
        axis.text(step, 0.02, f" {label}", transform=axis.get_xaxis_transform(), fontsize=8, color="gray")
    axis.set_xlabel("fine-tuning step")
    axis.set_ylabel("diffusion loss (MSE on noise)")
    axis.set_title(title, fontsize=10)
    axis.legend(loc="upper right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@dataclass
class TradeoffCurve:
    """One training run on the trade-off plot: (x, y) at each checkpoint, the first one before training."""

    label: str
    color: str
    points: Sequence[tuple[float, float]]
    linestyle: str = "-"


def save_tradeoff_plot(
    curves: Sequence[TradeoffCurve], path: Path, title: str, xlabel: str, ylabel: str, note: str = ""
) -> None:
    """Every run's path through (new task learned, old task kept) space: a dot per checkpoint, a large dot at the
    end; the shared start (the base model) is a black star. Lower left is better on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 5))
    for curve in curves:
        xs, ys = zip(*curve.points)
        axis.plot(
            xs,
            ys,
            color=curve.color,
            linestyle=curve.linestyle,
            linewidth=1.6,
            marker="o",
            markersize=3,
            label=curve.label,
        )
        axis.plot(xs[-1], ys[-1], color=curve.color, marker="o", markersize=8, linestyle="none")
    if curves:
        start_x, start_y = curves[0].points[0]
        axis.plot(start_x, start_y, color="black", marker="*", markersize=14, linestyle="none", label="base model")
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="best")
    if note:
        figure.text(0.01, 0.01, note, fontsize=7, color="dimgray", ha="left", va="bottom", wrap=True)
    figure.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------------------ the run's pictures
def save_pictures(run: DemoRun, base: UNet2DModel, sara: MethodRun, lora: MethodRun) -> dict[str, float]:
    """Sample every model, score the samples with the judge, save the grids and the side-by-side comparison (the
    time they take goes to ``run``); returns the base model's scores (the methods' go to their ``samples``)."""
    settings, data, output_dir = run.settings, run.data, run.output_dir
    sampling_start = time.perf_counter()
    per_class, scored = settings.samples_per_class, max(settings.samples_per_class, settings.scored_samples_per_class)
    groups = {"styled_classes": settings.styled_classes, "other_classes": settings.other_classes}
    labels = {group: torch.tensor(classes).repeat_interleave(scored) for group, classes in groups.items()}
    shown = {group: torch.arange(len(labels[group])) % scored < per_class for group in groups}
    references = {"styled_classes": data.heldout_styled, "other_classes": data.heldout_other}
    models = {"base": base, "sara": sara.model, "lora": lora.model}
    samples, scores = {}, {}
    for name, model in models.items():
        drawn = {
            group: sample_images(model, run.noise_scheduler, labels[group], settings.sample_steps, run.sampling_seed)
            for group in groups
        }
        scores[name] = sample_scores(run.judge, drawn, labels, references)
        for group in groups:
            samples[name, group] = drawn[group][shown[group]]
            save_grid(samples[name, group], per_class, output_dir / f"samples_{name}_{group}.png")
    sara.samples, lora.samples = scores["sara"], scores["lora"]
    targets = {
        "styled_classes": _first_per_class(
            data.heldout_styled, data.heldout_styled_labels, groups["styled_classes"], per_class
        ),
        "other_classes": _first_per_class(
            data.heldout_other, data.heldout_other_labels, groups["other_classes"], per_class
        ),
    }
    save_grid(targets["styled_classes"], per_class, output_dir / "heldout_styled_classes.png")
    target_titles = {
        "styled_classes": f"held-out, {settings.style} (target)",
        "other_classes": "held-out, original style",
    }
    row_titles = {
        "styled_classes": f"classes {class_names(settings, settings.styled_classes)} (fine-tuned)",
        "other_classes": f"classes {class_names(settings, settings.other_classes)} (not fine-tuned)",
    }
    titles = {"base": "base model", "sara": "SaRA", "lora": f"LoRA r={lora_rank(lora.model)}"}
    captions = {}
    for group, styled in (("styled_classes", True), ("other_classes", False)):
        expected = f"{'in the new style' if styled else 'as before'}"
        for name in models:
            captions[row_titles[group], titles[name]] = (
                f"judged right class {expected}: {scores[name][f'{group}_accuracy']:.0%}"
            )
    save_comparison_figure(
        [
            [(target_titles[group], targets[group])] + [(titles[name], samples[name, group]) for name in models]
            for group in groups
        ],
        [row_titles[group] for group in groups],
        per_class,
        output_dir / "comparison.png",
        captions,
    )
    run.sampling_seconds = time.perf_counter() - sampling_start
    return scores["base"]


def plot_tradeoff(
    run: DemoRun, sweep: dict[str, list[MethodRun]], base_losses: dict[str, float], lora: MethodRun
) -> None:
    """The picture that explains SaRA: for each method and learning rate, the path of (new style learned, other
    classes kept) over the fine-tuning steps."""
    settings = run.settings
    curves = []
    for method, runs in sweep.items():
        for method_run in runs:
            points = [
                (
                    change_pct(base_losses["new_style"], losses["new_style"]),
                    change_pct(base_losses["other_classes"], losses["other_classes"]),
                )
                for _, losses in method_run.history.checkpoints
            ]
            name = method if method == "SaRA" else f"LoRA r={lora_rank(lora.model)}"
            curves.append(
                TradeoffCurve(
                    f"{name}, lr {method_run.learning_rate:g} ({method_run.trainable:,} params)",
                    METHOD_COLORS[method],
                    points,
                    _linestyle(method_run.learning_rate, settings.main_learning_rate),
                )
            )
    save_tradeoff_plot(
        curves,
        run.output_dir / "tradeoff.png",
        title=f"New style learned vs other classes kept ({settings.style} {class_names(settings, settings.styled_classes)};"
        f" a dot every {settings.checkpoint_every} steps)",
        xlabel=f"held-out loss change on {settings.style} {class_names(settings, settings.styled_classes)} (%, left = "
        "learned more)",
        ylabel=f"held-out loss change on {class_names(settings, settings.other_classes)} (%, down = kept more)",
        note="How to read this: lower left is better (new style learned, other classes kept); the star is the base "
        "model, each big dot where a run ended; a run whose big dot lies below another's at the same x forgot less "
        "for the same learning. One seed. For fronts over 3 seeds, 3 budgets, full fine-tuning, Super-Tuning and "
        "SHiRA: python -m benchmarks.quality.run_all",
    )


def _linestyle(learning_rate: float, main_learning_rate: float) -> str:
    """Solid for the main learning rate, dotted below it, dashed above."""
    if learning_rate == main_learning_rate:
        return "-"
    return ":" if learning_rate < main_learning_rate else "--"


def plot_losses(run: DemoRun, sara: MethodRun, lora: MethodRun) -> None:
    """Both methods' training-loss curves at the main learning rate, with SaRA's re-selection step marked."""
    settings = run.settings
    markers = {}
    if sara.history.reselected_at_step is not None:
        markers["SaRA re-selection"] = sara.history.reselected_at_step
    save_loss_plot(
        {
            f"SaRA ({sara.trainable:,} params)": sara.history.losses,
            f"LoRA r={lora_rank(lora.model)} ({lora.trainable:,} params)": lora.history.losses,
        },
        markers,
        run.output_dir / "loss_curves.png",
        title=f"Fine-tuning on {settings.style} {class_names(settings, settings.styled_classes)}, lr "
        f"{settings.main_learning_rate:g} (same batches, noise and seed)",
    )


def _first_per_class(images: torch.Tensor, labels: torch.Tensor, classes, count: int) -> torch.Tensor:
    return torch.cat([images[labels == index][:count] for index in classes])
