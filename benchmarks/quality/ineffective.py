"""Are the smallest weights "temporarily ineffective"? Zero the smallest |w| of every adaptable layer (Linear, Conv)
and compare with zeroing as many random weights, or the largest ones.

On the demo's pretrained base (``--dataset``) it measures the held-out denoising loss (every class, original style)
and the judge's scores of samples (accuracy, Fréchet distance to real images), plus the relative change of the
model's output on a fixed batch. On any local diffusers model (``--model DIR``) it measures the output change on
``--inputs`` (a .safetensors file of forward keyword arguments), or on seeded random inputs for a ``UNet2DModel`` /
``UNet2DConditionModel``. Also measures the paper's global thresholds (|w| < 2e-4, 8e-4, 2e-3).

Writes ``ineffective_<dataset or model>.json`` and ``.png`` (change vs fraction zeroed, three curves per metric).

    python -m benchmarks.quality.ineffective                        # digits
    python -m benchmarks.quality.ineffective --dataset photo-patches
    python -m benchmarks.quality.ineffective --model path/to/unet   # any local model folder
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import torch
from safetensors.torch import load_file
from torch import nn

from benchmarks.quality.common import (
    RESULTS_DIR,
    QualitySettings,
    change_pct,
    describe_setup,
    make_context,
    write_json,
)
from benchmarks.quality.plots import plot_zeroing
from peft_sara.commands.analyze_cmd import model_to_analyse
from peft_sara.conversion import DEFAULT_THRESHOLDS
from peft_sara.demo.diffusion import build_noise_scheduler, heldout_loss, sample_images
from peft_sara.demo.judge import frechet_distance
from peft_sara.export.weight_analysis import adaptable_layers, first_tensor

FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
RULES = ("smallest", "random", "largest")
RANDOM_SEEDS = (0, 1, 2)
THRESHOLDS = tuple(threshold for threshold in DEFAULT_THRESHOLDS if threshold != 1e-3)  # the paper's three budgets


def chosen_entries(weight: torch.Tensor, rule: str, count: int, generator: torch.Generator) -> torch.Tensor:
    """Flat indices of ``count`` entries of ``weight``: its smallest or largest |w|, or random ones."""
    magnitudes = weight.detach().reshape(-1).abs().float()
    if rule == "smallest":
        return torch.argsort(magnitudes, stable=True)[:count]
    if rule == "largest":
        return torch.argsort(magnitudes, descending=True, stable=True)[:count]
    return torch.randperm(magnitudes.numel(), generator=generator)[:count]


@contextmanager
def zeroed(model: nn.Module, rule: str, counts: Callable[[torch.Tensor], int], seed: int = 0) -> Iterator[int]:
    """Zero ``counts(weight)`` entries chosen by ``rule`` in every adaptable layer; restore them bitwise on exit.
    Yields the number of weights zeroed."""
    generator = torch.Generator().manual_seed(seed)
    backups = []
    total = 0
    try:
        for _, module in adaptable_layers(model):
            flat = module.weight.data.view(-1)
            indices = chosen_entries(module.weight, rule, counts(module.weight), generator)
            backups.append((flat, indices, flat[indices].clone()))
            flat[indices] = 0
            total += indices.numel()
        yield total
    finally:
        for flat, indices, saved in backups:
            flat[indices] = saved


def fraction_counts(fraction: float) -> Callable[[torch.Tensor], int]:
    """``round(fraction * numel)`` entries of every layer."""
    return lambda weight: round(fraction * weight.numel())


def threshold_counts(threshold: float) -> Callable[[torch.Tensor], int]:
    """As many entries of every layer as have ``|w| < threshold`` (the paper's global rule)."""
    return lambda weight: int((weight.detach().abs().float() < threshold).sum())


@torch.no_grad()
def output_change(model: nn.Module, inputs: Mapping[str, Any], reference: torch.Tensor) -> float:
    """``||f'(x) - f(x)|| / ||f(x)||`` of the (zeroed) model against the reference output."""
    changed = first_tensor(model(**inputs)).float()
    return float(torch.linalg.vector_norm(changed - reference) / torch.linalg.vector_norm(reference).clamp_min(1e-30))


def measure_rules(
    model: nn.Module, measure: Callable[[], dict[str, float]], scales: Sequence[tuple[str, float, Callable]]
) -> list[dict[str, Any]]:
    """``measure()`` with each rule at each scale (random: the mean over :data:`RANDOM_SEEDS`)."""
    rows = []
    for kind, value, counts in scales:
        for rule in RULES:
            seeds = RANDOM_SEEDS if rule == "random" else (0,)
            measured = []
            for seed in seeds:
                with zeroed(model, rule, counts, seed) as total:
                    measured.append(measure())
            row = {"rule": rule, kind: value, "zeroed_weights": total}
            for key in measured[0]:
                values = [item[key] for item in measured]
                row[key] = statistics.fmean(values)
                if len(values) > 1:
                    row[f"{key}_std"] = statistics.stdev(values)
            rows.append(row)
    return rows


def demo_model_rows(settings: QualitySettings, cache_root: Path | None) -> tuple[dict[str, Any], list, list]:
    """Zeroing on the demo's pretrained base: loss, samples and output change at each fraction and threshold."""
    context = make_context(settings, cache_root)
    base, data, demo = context.base, context.data, context.demo
    scheduler = build_noise_scheduler()
    eval_seed, sampling_seed = demo.seed + 1, demo.seed + 2
    draws = 2
    classes = torch.arange(len(demo.styled_classes) + len(demo.other_classes))
    sample_labels = classes.repeat_interleave(settings.samples_per_class)
    generator = torch.Generator().manual_seed(demo.seed + 3)
    size = demo.unet_config["sample_size"]
    batch = {
        "sample": torch.randn((64, demo.unet_config["in_channels"], size, size), generator=generator),
        "timestep": torch.randint(0, 1000, (64,), generator=generator),
        "class_labels": torch.randint(0, len(classes), (64,), generator=generator),
    }
    with torch.no_grad():
        reference = first_tensor(base(**batch)).float()
    real_features = context.judge.features(data.heldout_all)

    def measure() -> dict[str, float]:
        loss = heldout_loss(base, scheduler, data.heldout_all, data.heldout_all_labels, draws, eval_seed)
        samples = sample_images(base, scheduler, sample_labels, settings.sample_steps, sampling_seed)
        return {
            "heldout_loss": loss,
            "sample_accuracy": context.judge.accuracy(samples, sample_labels, styled=False),
            "sample_frechet": frechet_distance(context.judge.features(samples), real_features),
            "output_change_pct": output_change(base, batch, reference),
        }

    reference_metrics = measure()
    fractions = FRACTIONS if not settings.tiny else (0.05, 0.2)
    rows = measure_rules(base, measure, [("fraction", value, fraction_counts(value)) for value in fractions])
    threshold_rows = measure_rules(base, measure, [("threshold", t, threshold_counts(t)) for t in THRESHOLDS])
    weights = sum(module.weight.numel() for _, module in adaptable_layers(base))
    for row in rows + threshold_rows:
        row["fraction_zeroed"] = row["zeroed_weights"] / weights
        row["heldout_loss_change_pct"] = change_pct(reference_metrics["heldout_loss"], row["heldout_loss"])
    setup = describe_setup(context)
    setup["reference"] = reference_metrics
    setup["adaptable_weights"] = weights
    return setup, rows, threshold_rows


def example_inputs(model: nn.Module, seed: int = 0, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Seeded random forward inputs for a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (else: pass --inputs)."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None or name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise SystemExit(
            f"No built-in inputs for a {name}; pass --inputs FILE.safetensors (forward keyword arguments)."
        )
    generator = torch.Generator().manual_seed(seed)
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    inputs = {
        "sample": torch.randn((batch_size, config.in_channels, size, size), generator=generator),
        "timestep": torch.randint(0, 1000, (batch_size,), generator=generator),
    }
    if name == "UNet2DConditionModel":
        inputs["encoder_hidden_states"] = torch.randn((batch_size, 77, config.cross_attention_dim), generator=generator)
    elif config.num_class_embeds:
        inputs["class_labels"] = torch.randint(0, config.num_class_embeds, (batch_size,), generator=generator)
    return inputs


def local_model_rows(folder: Path, inputs_file: Path | None, component: str | None) -> tuple[dict, list, list]:
    """Zeroing on a local model: the relative output change at each fraction and threshold."""
    model = model_to_analyse(folder, component).eval()
    inputs = load_file(inputs_file) if inputs_file is not None else example_inputs(model)
    with torch.no_grad():
        reference = first_tensor(model(**inputs)).float()

    def measure() -> dict[str, float]:
        return {"output_change_pct": output_change(model, inputs, reference)}

    rows = measure_rules(model, measure, [("fraction", value, fraction_counts(value)) for value in FRACTIONS])
    threshold_rows = measure_rules(model, measure, [("threshold", t, threshold_counts(t)) for t in THRESHOLDS])
    weights = sum(module.weight.numel() for _, module in adaptable_layers(model))
    for row in rows + threshold_rows:
        row["fraction_zeroed"] = row["zeroed_weights"] / weights
    setup = {"model": str(folder), "inputs": str(inputs_file) if inputs_file else "seeded random", "weights": weights}
    return setup, rows, threshold_rows


def rows_markdown(rows: list[dict[str, Any]], keys: Sequence[str], kind: str) -> str:
    """A markdown table: one line per scale, one column per rule and metric."""
    scales = sorted({row[kind] for row in rows})
    header = [kind] + [f"{key} ({rule})" for key in keys for rule in RULES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scale in scales:
        cells = [f"{scale:g}"]
        for key in keys:
            for rule in RULES:
                row = next(item for item in rows if item[kind] == scale and item["rule"] == rule)
                cells.append(f"{row[key]:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(
    settings: QualitySettings,
    output_dir: Path,
    cache_root: Path | None = None,
    model: Path | None = None,
    inputs: Path | None = None,
    component: str | None = None,
) -> dict[str, Any]:
    """Run the zeroing test, write the JSON and figure, print the tables; returns the JSON payload."""
    start = time.process_time()
    if model is None:
        setup, rows, threshold_rows = demo_model_rows(settings, cache_root)
        name = settings.dataset
        metrics = [
            ("heldout_loss_change_pct", "held-out denoising loss change (%)"),
            ("sample_accuracy", "samples judged right (share)"),
            ("sample_frechet", "Fréchet distance of samples to real"),
            ("output_change_pct", "relative output change on a fixed batch"),
        ]
    else:
        setup, rows, threshold_rows = local_model_rows(model, inputs, component)
        name = model.name
        metrics = [("output_change_pct", "relative output change")]
    payload = {
        "setup": setup,
        "fractions": rows,
        "thresholds": threshold_rows,
        "cpu_seconds": time.process_time() - start,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / f"ineffective_{name}.json", payload)
    plot_zeroing(
        rows,
        metrics,
        output_dir / f"ineffective_{name}.png",
        f"Zeroing the smallest, random or largest weights of every layer ({name})",
    )
    print("\n" + summary_markdown(payload, [key for key, _ in metrics], name))
    return payload


def summary_markdown(payload: dict[str, Any], keys: Sequence[str], name: str) -> str:
    """Both zeroing tables, as markdown."""
    return "\n".join(
        [
            f"Zeroing a fraction of every adaptable layer ({name}); random: mean of {len(RANDOM_SEEDS)} seeds",
            rows_markdown(payload["fractions"], keys, "fraction"),
            "",
            f"The paper's global thresholds (|w| < t; random and largest: as many weights per layer) ({name}):",
            rows_markdown(payload["thresholds"], [*keys, "fraction_zeroed"], "threshold"),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("digits", "photo-patches"), default="digits")
    parser.add_argument("--tiny", action="store_true", help="smoke-test settings")
    parser.add_argument("--model", type=Path, default=None, help="a local diffusers model or pipeline folder instead")
    parser.add_argument("--component", default=None, help="pipeline component (default: the denoiser)")
    parser.add_argument("--inputs", type=Path, default=None, help=".safetensors of forward keyword arguments")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = QualitySettings.tiny_settings(args.dataset) if args.tiny else QualitySettings.for_dataset(args.dataset)
    run(settings, args.output_dir, args.cache_dir, args.model, args.inputs, args.component)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
