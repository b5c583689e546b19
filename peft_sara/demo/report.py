"""The demo's report: metrics.json and the summary tables printed at the end of a run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
    source = {"shipped": "shipped with peft-sara", "cache": "reused from cache", "pretrained": "pretrained in this run"}
    print(
        f"Base model: {pretrained['parameters']:,} parameters, {source[pretrained['source']]}"
        + (f" ({pretrained['folder']})" if pretrained["folder"] else "")
        + f". Classifier accuracy on held-out real images: {metrics['judge']['heldout_accuracy']:.0%}."
    )
    print(
        f"Outputs in {output_dir}: tradeoff.png and comparison.png (start here), samples_*.png, "
        "heldout_styled_classes.png, loss_curves.png, sara_adapter/, lora_adapter/, metrics.json"
    )
    print(f"Total time {metrics['times']['total_seconds']:.0f} s.")


def write_report(metrics: dict[str, Any], output_dir: Path) -> None:
    """Write metrics.json and print the summary table."""
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print_summary(metrics, output_dir)
