"""The demo's orchestration: pretrain (or reuse) a base, fine-tune it with SaRA and LoRA, measure, and write
everything into the output folder. :func:`run_demo` is the recipe; each step below is one function."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from peft import PeftModel

from ..constants import __version__
from ..training import paper_learning_rate
from . import report
from .data import apply_style, load_digit_splits, of_classes
from .diffusion import PretrainResult, build_noise_scheduler, heldout_loss, load_or_pretrain, sample_images
from .finetune import (
    FinetuneHistory,
    adapted_module_names,
    finetune,
    make_lora_model,
    make_sara_model,
    reload_max_difference,
    selection_summary,
)
from .metrics import adapter_dir, collect_metrics, lora_rank, parameter_count
from .settings import DemoSettings, cache_key, default_cache_root

__all__ = ["DemoResult", "DemoSettings", "cache_key", "default_cache_root", "run_demo"]


@dataclass
class DemoResult:
    """What :func:`run_demo` produced (the models stay in memory for callers such as tests)."""

    metrics: dict[str, Any]
    output_dir: Path
    base_model: UNet2DModel
    sara_model: PeftModel
    lora_model: PeftModel


@dataclass
class DemoData:
    """The images of one run: all classes for pretraining, the styled fine-tuning set and the two held-out sets."""

    pretrain_images: torch.Tensor
    pretrain_labels: torch.Tensor
    finetune_images: torch.Tensor
    finetune_labels: torch.Tensor
    heldout_styled: torch.Tensor
    heldout_styled_labels: torch.Tensor
    heldout_other: torch.Tensor
    heldout_other_labels: torch.Tensor


@dataclass
class DemoRun:
    """What every step of one run shares: settings, folders, data, noise schedule, and the clock."""

    settings: DemoSettings
    output_dir: Path
    cache_folder: Path | None  # None: neither read nor write the pretrained-model cache
    data: DemoData
    noise_scheduler: DDPMScheduler
    start: float  # time.perf_counter() when the run began
    evaluation_seconds: float = 0.0
    sampling_seconds: float = 0.0

    @property
    def eval_seed(self) -> int:
        """Seed of the held-out evaluation noise."""
        return self.settings.seed + 1

    @property
    def sampling_seed(self) -> int:
        """Seed of the sampling noise, shared by every model."""
        return self.settings.seed + 2

    def evaluate(self, model) -> dict[str, float]:
        """Held-out loss on the new style and on the other classes (the time spent is added up)."""
        start = time.perf_counter()
        data, draws = self.data, self.settings.eval_draws
        losses = {
            "new_style": heldout_loss(
                model, self.noise_scheduler, data.heldout_styled, data.heldout_styled_labels, draws, self.eval_seed
            ),
            "other_classes": heldout_loss(
                model, self.noise_scheduler, data.heldout_other, data.heldout_other_labels, draws, self.eval_seed
            ),
        }
        self.evaluation_seconds += time.perf_counter() - start
        return losses


@dataclass
class MethodRun:
    """One fine-tuned model: its trainable count (before any re-selection), training history and held-out losses."""

    model: PeftModel
    trainable: int
    history: FinetuneHistory
    losses: dict[str, float]
    learning_rate: float


def _names(classes) -> str:
    return ", ".join(map(str, classes))


def run_demo(settings: DemoSettings, output_dir: Path, cache_root: Path | None) -> DemoResult:
    """Run the whole demo; ``cache_root=None`` neither reads nor writes the pretrained-model cache."""
    run_start = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    announce(settings, output_dir)
    cache_folder = cache_root / cache_key(settings) if cache_root is not None else None
    run = DemoRun(settings, output_dir, cache_folder, prepare_data(settings), build_noise_scheduler(), run_start)
    pretrained = load_base(run)
    base = pretrained.unet
    base_losses = evaluate_base(run, base)
    sara, selection = finetune_sara(run, base)
    lora = finetune_lora(run, base, sara)
    reload_difference = save_adapters(run, base, sara, lora)
    save_pictures(run, base, sara, lora)
    plot_losses(run, sara, lora)
    metrics = collect_metrics(run, pretrained, selection, base_losses, sara, lora, reload_difference)
    write_report(metrics, output_dir)
    return DemoResult(metrics, output_dir, base, sara.model, lora.model)


def announce(settings: DemoSettings, output_dir: Path) -> None:
    """Print what the run is about to do."""
    print(
        f"peft-sara {__version__} demo: teach a small digit diffusion model to draw {_names(settings.styled_classes)} "
        f"{settings.style}, with SaRA and with LoRA, and check what happens to {_names(settings.other_classes)}."
    )
    print(f"torch threads: {torch.get_num_threads()}   seed: {settings.seed}   output: {output_dir}")


def prepare_data(settings: DemoSettings) -> DemoData:
    """Split the digits, restyle the fine-tuning classes and hold out both groups for evaluation."""
    splits = load_digit_splits(settings.heldout_fraction, settings.seed)
    train_images, train_labels = of_classes(splits.train_images, splits.train_labels, settings.styled_classes)
    heldout_styled, heldout_styled_labels = of_classes(
        splits.heldout_images, splits.heldout_labels, settings.styled_classes
    )
    heldout_other, heldout_other_labels = of_classes(
        splits.heldout_images, splits.heldout_labels, settings.other_classes
    )
    return DemoData(
        pretrain_images=splits.train_images,
        pretrain_labels=splits.train_labels,
        finetune_images=apply_style(train_images, settings.style),
        finetune_labels=train_labels,
        heldout_styled=apply_style(heldout_styled, settings.style),
        heldout_styled_labels=heldout_styled_labels,
        heldout_other=heldout_other,
        heldout_other_labels=heldout_other_labels,
    )


def load_base(run: DemoRun) -> PretrainResult:
    """Pretrain the base model on all ten classes, or reuse it from the run's cache folder; print which."""
    settings = run.settings
    pretrained = load_or_pretrain(
        settings.unet_config,
        run.noise_scheduler,
        run.data.pretrain_images,
        run.data.pretrain_labels,
        steps=settings.pretrain_steps,
        batch_size=settings.pretrain_batch_size,
        learning_rate=settings.pretrain_learning_rate,
        seed=settings.seed,
        cache_folder=run.cache_folder,
    )
    if pretrained.reused_from:
        print(
            f"Reused the pretrained base model from the cache: {pretrained.reused_from} "
            f"(pretraining took {pretrained.seconds:.0f} s when it was made; --no-cache retrains)."
        )
    else:
        where = f", cached in {pretrained.saved_to}" if pretrained.saved_to else " (not cached: --no-cache)"
        print(
            f"Pretrained the base model ({parameter_count(pretrained.unet):,} parameters) on all 10 classes in "
            f"{pretrained.seconds:.0f} s{where}."
        )
    return pretrained


def evaluate_base(run: DemoRun, base: UNet2DModel) -> dict[str, float]:
    """The base model's held-out losses, the reference both methods are measured against."""
    losses = run.evaluate(base)
    settings = run.settings
    print(
        f"Base model held-out loss: new style ({settings.style} {_names(settings.styled_classes)}) "
        f"{losses['new_style']:.4f}, other classes ({_names(settings.other_classes)}, original style) "
        f"{losses['other_classes']:.4f}"
    )
    return losses


def finetune_sara(run: DemoRun, base: UNet2DModel) -> tuple[MethodRun, dict[str, Any]]:
    """Select SaRA's entries on a copy of ``base``, report the selection, fine-tune and evaluate it."""
    settings = run.settings
    model = make_sara_model(base, settings.trainable_fraction, settings.lambda_rank, settings.rank_min_dim)
    selection = selection_summary(model)
    trainable, _ = model.get_nb_trainable_parameters()
    median_cutoff = selection["cutoff_median"]
    print(
        f"SaRA selection: {selection['rule']} over {selection['layers']} layers -> {trainable:,} trainable "
        f"entries of {selection['targeted_weights']:,} targeted weights ({parameter_count(base):,} in the UNet); "
        f"per-layer |w| cutoffs {selection['cutoff_min']:.2e} .. {selection['cutoff_max']:.2e} "
        f"(median {median_cutoff:.2e})."
    )
    print(
        f"SaRA learning rate {settings.sara_learning_rate:g} (the paper's formula at the median cutoff would give "
        f"{paper_learning_rate(median_cutoff):.2e}, fitted for SD over 5,000 steps)."
    )
    return _train_and_evaluate(run, model, trainable, settings.sara_learning_rate, "SaRA"), selection


def finetune_lora(run: DemoRun, base: UNet2DModel, sara: MethodRun) -> MethodRun:
    """LoRA on the modules SaRA adapted, at the rank closest to SaRA's trainable count; fine-tune and evaluate it."""
    settings = run.settings
    targets = adapted_module_names(sara.model)
    model = make_lora_model(base, targets, sara.trainable, settings.seed)
    trainable, _ = model.get_nb_trainable_parameters()
    print(
        f"LoRA on the same {len(targets)} modules at rank {lora_rank(model)}: "
        f"{trainable:,} trainable parameters (SaRA: {sara.trainable:,}); learning rate {settings.lora_learning_rate:g}."
    )
    return _train_and_evaluate(run, model, trainable, settings.lora_learning_rate, "LoRA")


def _train_and_evaluate(run: DemoRun, model: PeftModel, trainable: int, learning_rate: float, method: str) -> MethodRun:
    """The shared fine-tuning loop (same batches, noise and seed for both methods), then the held-out losses."""
    settings = run.settings
    history = finetune(
        model,
        run.noise_scheduler,
        run.data.finetune_images,
        run.data.finetune_labels,
        steps=settings.finetune_steps,
        batch_size=settings.finetune_batch_size,
        learning_rate=learning_rate,
        seed=settings.seed,
        description=f"fine-tuning with {method}",
        use_sara_helper=method == "SaRA",
    )
    return MethodRun(model, trainable, history, run.evaluate(model), learning_rate)


def save_adapters(run: DemoRun, base: UNet2DModel, sara: MethodRun, lora: MethodRun) -> float:
    """Save both adapters; reload SaRA's into a fresh base and return the largest output difference."""
    sara_dir, lora_dir = adapter_dir(run.output_dir, "sara"), adapter_dir(run.output_dir, "lora")
    sara.model.save_pretrained(sara_dir)
    lora.model.save_pretrained(lora_dir)
    reload_difference = reload_max_difference(sara.model, base, sara_dir, run.settings.seed)
    print(
        f"Saved the SaRA adapter to {sara_dir}; reloaded into a fresh base with PeftModel.from_pretrained, it "
        f"reproduces the trained model's outputs (max |difference| {reload_difference:.1e})."
    )
    return reload_difference


def save_pictures(run: DemoRun, base: UNet2DModel, sara: MethodRun, lora: MethodRun) -> None:
    """Sample grids of every model and the side-by-side comparison (the time they take goes to ``run``)."""
    settings, data, output_dir = run.settings, run.data, run.output_dir
    sampling_start = time.perf_counter()
    per_class = settings.samples_per_class
    groups = {"styled_classes": settings.styled_classes, "other_classes": settings.other_classes}
    models = {"base": base, "sara": sara.model, "lora": lora.model}
    samples = {}
    for name, model in models.items():
        for group, classes in groups.items():
            labels = torch.tensor(classes).repeat_interleave(per_class)
            samples[name, group] = sample_images(
                model, run.noise_scheduler, labels, settings.sample_steps, run.sampling_seed
            )
            report.save_grid(samples[name, group], per_class, output_dir / f"samples_{name}_{group}.png")
    targets = {
        "styled_classes": _first_per_class(
            data.heldout_styled, data.heldout_styled_labels, groups["styled_classes"], per_class
        ),
        "other_classes": _first_per_class(
            data.heldout_other, data.heldout_other_labels, groups["other_classes"], per_class
        ),
    }
    report.save_grid(targets["styled_classes"], per_class, output_dir / "heldout_styled_classes.png")
    target_titles = {
        "styled_classes": f"held-out, {settings.style} (target)",
        "other_classes": "held-out, original style",
    }
    report.save_comparison_figure(
        [
            [
                (target_titles[group], targets[group]),
                ("base model", samples["base", group]),
                ("SaRA", samples["sara", group]),
                (f"LoRA r={lora_rank(lora.model)}", samples["lora", group]),
            ]
            for group in groups
        ],
        [
            f"classes {_names(settings.styled_classes)} (fine-tuned)",
            f"classes {_names(settings.other_classes)} (not fine-tuned)",
        ],
        per_class,
        output_dir / "comparison.png",
    )
    run.sampling_seconds = time.perf_counter() - sampling_start


def plot_losses(run: DemoRun, sara: MethodRun, lora: MethodRun) -> None:
    """Both methods' training-loss curves, with SaRA's re-selection step marked."""
    settings = run.settings
    markers = {}
    if sara.history.reselected_at_step is not None:
        markers["SaRA re-selection"] = sara.history.reselected_at_step
    report.save_loss_plot(
        {
            f"SaRA ({sara.trainable:,} params)": sara.history.losses,
            f"LoRA r={lora_rank(lora.model)} ({lora.trainable:,} params)": lora.history.losses,
        },
        markers,
        run.output_dir / "loss_curves.png",
        title=f"Fine-tuning on {settings.style} digits {_names(settings.styled_classes)} (same batches, noise and seed)",
    )


def _first_per_class(images: torch.Tensor, labels: torch.Tensor, classes, count: int) -> torch.Tensor:
    return torch.cat([images[labels == digit][:count] for digit in classes])


def write_report(metrics: dict[str, Any], output_dir: Path) -> None:
    """Write metrics.json and print the summary table."""
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    report.print_summary(metrics, output_dir)
