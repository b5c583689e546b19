"""The demo's outputs: sample grids, the comparison figure, the loss-curve plot and the printed summary table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with columns padded to their widest cell."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = "  ".join("-" * width for width in widths)
    render = lambda cells: "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths))  # noqa: E731
    return "\n".join([render(header), line, *(render(row) for row in rows)])


def human_bytes(size: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def print_summary(metrics: dict[str, Any], output_dir: Path) -> None:
    """The tables printed at the end of the demo."""
    data, sara, lora, samples = metrics["data"], metrics["sara"], metrics["lora"], metrics["samples"]
    styled = ",".join(map(str, data["styled_classes"]))
    other = ",".join(map(str, data["other_classes"]))
    rows = []
    for name, values, scores in (
        ("base model", None, samples["base"]),
        ("SaRA", sara, samples["sara"]),
        (f"LoRA r={lora['rank']}", lora, samples["lora"]),
    ):
        losses = ["-", "-", "-", "-", "-"]
        if values is not None:
            losses = [
                f"{values['trainable_params']:,}",
                f"{values['new_style_loss_after']:.4f} ({values['new_style_loss_change_pct']:+.1f}%)",
                f"{values['other_classes_loss_after']:.4f} ({values['other_classes_loss_change_pct']:+.1f}%)",
                human_bytes(values["adapter_file_bytes"]),
                f"{values['train_seconds']:.0f} s",
            ]
        rows.append(
            [
                name,
                *losses[:3],
                f"{scores['styled_classes_accuracy']:.0%} / {scores['styled_classes_frechet']:.1f}",
                f"{scores['other_classes_accuracy']:.0%} / {scores['other_classes_frechet']:.1f}",
                *losses[3:],
            ]
        )
    settings = metrics["settings"]
    print()
    print(
        f"Summary at lr {sara['learning_rate']:g}: fine-tuned on {data['finetune_images']} {data['style']} images of "
        f"{styled} ({settings['finetune_steps']} steps, batch {settings['finetune_batch_size']}). Held-out loss "
        f"(lower is better) on {data['heldout_styled_images']} {data['style']} images of {styled} and on "
        f"{data['heldout_other_images']} original images of {other} (base: {metrics['base']['new_style_loss']:.4f}, "
        f"{metrics['base']['other_classes_loss']:.4f}). Samples: share a classifier of (class, style) finds right "
        f"/ Fréchet distance to real images in its feature space (lower is better)."
    )
    print(
        format_table(
            [
                "model",
                "trainable",
                f"new-style loss ({styled})",
                f"other-classes loss ({other})",
                f"samples {styled}: right / FD",
                f"samples {other}: right / FD",
                "adapter file",
                "train time",
            ],
            rows,
        )
    )
    sweep_rows = []
    for sara_run, lora_run in zip(metrics["sweep"]["sara"], metrics["sweep"]["lora"]):
        sweep_rows.append(
            [
                f"{sara_run['learning_rate']:g}",
                f"{sara_run['new_style_loss_change_pct']:+.1f}% / {sara_run['other_classes_loss_change_pct']:+.1f}%",
                f"{lora_run['new_style_loss_change_pct']:+.1f}% / {lora_run['other_classes_loss_change_pct']:+.1f}%",
            ]
        )
    print()
    print("Every learning rate (held-out loss change: new style / other classes; tradeoff.png draws the whole path):")
    print(format_table(["lr", "SaRA", f"LoRA r={lora['rank']}"], sweep_rows))
    if sara["reselected_at_step"] is not None:
        print(
            f"SaRA selection: {metrics['selection']['rule']}; progressive re-selection at step "
            f"{sara['reselected_at_step']} left {sara['trainable_after_reselection']:,} of "
            f"{sara['trainable_params']:,} entries trainable. Adapter reload max |diff| "
            f"{sara['reload_max_abs_diff']:.1e}."
        )
    pretrained = metrics["pretrained_model"]
    source = "reused from cache" if pretrained["reused_from_cache"] else "pretrained in this run"
    print(
        f"Base model: {pretrained['parameters']:,} parameters, {source}"
        + (f" ({pretrained['cache_folder']})" if pretrained["cache_folder"] else "")
        + f". Classifier accuracy on held-out real images: {metrics['judge']['heldout_accuracy']:.0%}."
    )
    print(
        f"Outputs in {output_dir}: tradeoff.png and comparison.png (start here), samples_*.png, "
        "heldout_styled_classes.png, loss_curves.png, sara_adapter/, lora_adapter/, metrics.json"
    )
    print(f"Total time {metrics['times']['total_seconds']:.0f} s.")
