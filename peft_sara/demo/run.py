"""The demo's orchestration: pretrain (or reuse) a base, fine-tune it with SaRA and LoRA at each learning rate,
measure what each learned and kept, and write everything into the output folder. :func:`run_demo` is the recipe;
each step below is one function."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from peft import PeftModel
from torch import nn

from ..constants import __version__
from ..training import paper_learning_rate
from . import report
from .data import apply_style, dataset_info, load_splits, of_classes
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
from .judge import TrainedJudge, frechet_distance, train_judge
from .metrics import adapter_dir, change_pct, collect_metrics, lora_rank, parameter_count
from .settings import DemoSettings, cache_key, default_cache_root

__all__ = [
    "DemoData",
    "DemoResult",
    "DemoSettings",
    "cache_key",
    "change_pct",
    "default_cache_root",
    "pretrained_base",
    "prepare_data",
    "run_demo",
    "sample_judge",
    "sample_scores",
]

METHOD_COLORS = {"SaRA": "tab:red", "LoRA": "tab:blue"}


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
    heldout_all: torch.Tensor  # every held-out image, original style (the judge's test set)
    heldout_all_labels: torch.Tensor


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
    judge: TrainedJudge | None = None
    pretrain_threads: int | None = None  # torch threads while pretraining an uncached base (None: unchanged)

    @property
    def eval_seed(self) -> int:
        """Seed of the held-out evaluation noise."""
        return self.settings.seed + 1

    @property
    def sampling_seed(self) -> int:
        """Seed of the sampling noise, shared by every model."""
        return self.settings.seed + 2

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out loss on the new style and on the other classes (the time spent is added up)."""
        start = time.perf_counter()
        losses = heldout_losses(model, self.data, self.noise_scheduler, self.settings.eval_draws, self.eval_seed)
        self.evaluation_seconds += time.perf_counter() - start
        return losses


def heldout_losses(
    model: nn.Module, data: DemoData, noise_scheduler: DDPMScheduler, draws: int, seed: int
) -> dict[str, float]:
    """Held-out diffusion loss on the fine-tuned classes in the new style and on the other classes as they were."""
    return {
        "new_style": heldout_loss(model, noise_scheduler, data.heldout_styled, data.heldout_styled_labels, draws, seed),
        "other_classes": heldout_loss(
            model, noise_scheduler, data.heldout_other, data.heldout_other_labels, draws, seed
        ),
    }


@dataclass
class MethodRun:
    """One fine-tuned model: its trainable count (before any re-selection), training history and held-out losses."""

    model: PeftModel
    trainable: int
    history: FinetuneHistory
    losses: dict[str, float]
    learning_rate: float
    samples: dict[str, float] = field(default_factory=dict)  # the judge's scores of its samples (main runs only)


def _names(settings: DemoSettings, classes) -> str:
    names = dataset_info(settings.dataset).class_names
    return ", ".join(names[index] for index in classes)


def run_demo(
    settings: DemoSettings, output_dir: Path, cache_root: Path | None, pretrain_threads: int | None = None
) -> DemoResult:
    """Run the whole demo; ``cache_root=None`` neither reads nor writes the pretrained-model cache;
    ``pretrain_threads`` torch threads pretrain a base that is not cached (default: the current count)."""
    run_start = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    announce(settings, output_dir)
    cache_folder = cache_root / cache_key(settings) if cache_root is not None else None
    run = DemoRun(settings, output_dir, cache_folder, prepare_data(settings), build_noise_scheduler(), run_start)
    run.pretrain_threads = pretrain_threads
    pretrained = load_base(run)
    base = pretrained.unet
    base_losses = evaluate_base(run, base)
    run.judge = train_sample_judge(run)
    sweep = {"SaRA": [], "LoRA": []}
    for learning_rate in settings.learning_rates:
        keep = learning_rate == settings.main_learning_rate
        sara, selection = finetune_sara(run, base, learning_rate, announce_selection=not sweep["SaRA"])
        sweep["SaRA"].append(sara)
        sweep["LoRA"].append(finetune_lora(run, base, sara, learning_rate))
        if not keep:  # only the main learning rate's models are kept (saved, sampled)
            sweep["SaRA"][-1].model = sweep["LoRA"][-1].model = None
    sara = next(item for item in sweep["SaRA"] if item.learning_rate == settings.main_learning_rate)
    lora = next(item for item in sweep["LoRA"] if item.learning_rate == settings.main_learning_rate)
    reload_difference = save_adapters(run, base, sara, lora)
    base_samples = save_pictures(run, base, sara, lora)
    plot_tradeoff(run, sweep, base_losses, lora)
    plot_losses(run, sara, lora)
    metrics = collect_metrics(run, pretrained, selection, base_losses, sara, lora, reload_difference)
    metrics["samples"] = {"base": base_samples, "sara": sara.samples, "lora": lora.samples}
    metrics["judge"] = {"heldout_accuracy": run.judge.heldout_accuracy, "labels": "class x style"}
    metrics["sweep"] = {
        name.lower(): [_sweep_entry(item, base_losses) for item in runs] for name, runs in sweep.items()
    }
    metrics["times"]["total_seconds"] = time.perf_counter() - run.start
    write_report(metrics, output_dir)
    return DemoResult(metrics, output_dir, base, sara.model, lora.model)


def _sweep_entry(method: MethodRun, base_losses: dict[str, float]) -> dict[str, Any]:
    return {
        "learning_rate": method.learning_rate,
        "trainable_params": method.trainable,
        "new_style_loss_change_pct": change_pct(base_losses["new_style"], method.losses["new_style"]),
        "other_classes_loss_change_pct": change_pct(base_losses["other_classes"], method.losses["other_classes"]),
        "checkpoints": [{"step": step, **losses} for step, losses in method.history.checkpoints],
        "train_seconds": method.history.seconds,
    }


def announce(settings: DemoSettings, output_dir: Path) -> None:
    """Print what the run is about to do."""
    print(
        f"peft-sara {__version__} demo ({settings.dataset}): teach a small diffusion model to draw "
        f"{_names(settings, settings.styled_classes)} {settings.style}, with SaRA and with LoRA at the same number "
        f"of trainable parameters, and check what happens to {_names(settings, settings.other_classes)}."
    )
    print(f"torch threads: {torch.get_num_threads()}   seed: {settings.seed}   output: {output_dir}")


def prepare_data(settings: DemoSettings) -> DemoData:
    """Split the dataset, restyle the fine-tuning classes and hold out both groups for evaluation."""
    splits = load_splits(settings.dataset, settings.heldout_fraction, settings.seed)
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
        heldout_all=splits.heldout_images,
        heldout_all_labels=splits.heldout_labels,
    )


def pretrained_base(
    settings: DemoSettings, data: DemoData, cache_folder: Path | None, threads: int | None = None
) -> PretrainResult:
    """The pretrained base model of ``settings``: from ``cache_folder`` if it holds one, else trained (and cached)
    with ``threads`` torch threads (default: the current count)."""
    return load_or_pretrain(
        settings.unet_config,
        build_noise_scheduler(),
        data.pretrain_images,
        data.pretrain_labels,
        steps=settings.pretrain_steps,
        batch_size=settings.pretrain_batch_size,
        learning_rate=settings.pretrain_learning_rate,
        seed=settings.seed,
        cache_folder=cache_folder,
        ema_decay=settings.pretrain_ema_decay,
        threads=threads,
    )


def load_base(run: DemoRun) -> PretrainResult:
    """Pretrain the base model on all classes, or reuse it from the run's cache folder; print which."""
    pretrained = pretrained_base(run.settings, run.data, run.cache_folder, run.pretrain_threads)
    if pretrained.reused_from:
        print(
            f"Reused the pretrained base model from the cache: {pretrained.reused_from} "
            f"(pretraining took {pretrained.seconds:.0f} s when it was made; --no-cache retrains)."
        )
    else:
        where = f", cached in {pretrained.saved_to}" if pretrained.saved_to else " (not cached: --no-cache)"
        print(
            f"Pretrained the base model ({parameter_count(pretrained.unet):,} parameters) on all "
            f"{dataset_info(run.settings.dataset).num_classes} classes in {pretrained.seconds:.0f} s{where}."
        )
    return pretrained


def evaluate_base(run: DemoRun, base: UNet2DModel) -> dict[str, float]:
    """The base model's held-out losses, the reference both methods are measured against."""
    losses = run.evaluate(base)
    settings = run.settings
    print(
        f"Base model held-out loss: new style ({settings.style} {_names(settings, settings.styled_classes)}) "
        f"{losses['new_style']:.4f}, other classes ({_names(settings, settings.other_classes)}, original style) "
        f"{losses['other_classes']:.4f}"
    )
    return losses


def sample_judge(settings: DemoSettings, data: DemoData) -> TrainedJudge:
    """The classifier that scores samples (class and style), trained on the real training images of ``data``."""
    return train_judge(
        data.pretrain_images,
        data.pretrain_labels,
        data.heldout_all,
        data.heldout_all_labels,
        dataset_info(settings.dataset).num_classes,
        lambda images: apply_style(images, settings.style),
        epochs=settings.judge_epochs,
        seed=settings.seed,
    )


def train_sample_judge(run: DemoRun) -> TrainedJudge:
    """Train the sample judge of ``run`` and say how good it is."""
    judge = sample_judge(run.settings, run.data)
    print(
        f"Trained a small classifier of (class, style) on the real images to score samples: "
        f"{judge.heldout_accuracy:.0%} right on the held-out real images."
    )
    return judge


def finetune_sara(
    run: DemoRun, base: UNet2DModel, learning_rate: float, announce_selection: bool = True
) -> tuple[MethodRun, dict[str, Any]]:
    """Select SaRA's entries on a copy of ``base``, report the selection, fine-tune and evaluate it."""
    settings = run.settings
    model = make_sara_model(base, settings.trainable_fraction, settings.lambda_rank, settings.rank_min_dim)
    selection = selection_summary(model)
    trainable, _ = model.get_nb_trainable_parameters()
    if announce_selection:
        print(
            f"SaRA selection: {selection['rule']} over {selection['layers']} layers -> {trainable:,} trainable "
            f"entries of {selection['targeted_weights']:,} targeted weights ({parameter_count(base):,} in the UNet); "
            f"per-layer |w| cutoffs {selection['cutoff_min']:.2e} .. {selection['cutoff_max']:.2e} "
            f"(median {selection['cutoff_median']:.2e}). Learning rates {', '.join(map(str, settings.learning_rates))}"
            f" (the paper's formula at the median cutoff would give {paper_learning_rate(selection['cutoff_median']):.1e},"
            " fitted for SD over 5,000 steps)."
        )
    return _train_and_evaluate(run, model, trainable, learning_rate, "SaRA"), selection


def finetune_lora(run: DemoRun, base: UNet2DModel, sara: MethodRun, learning_rate: float) -> MethodRun:
    """LoRA on the modules SaRA adapted, at the rank closest to SaRA's trainable count; fine-tune and evaluate it."""
    targets = adapted_module_names(sara.model)
    model = make_lora_model(base, targets, sara.trainable, run.settings.seed)
    trainable, _ = model.get_nb_trainable_parameters()
    if learning_rate == run.settings.learning_rates[0]:
        print(
            f"LoRA on the same {len(targets)} modules at rank {lora_rank(model)}: "
            f"{trainable:,} trainable parameters (SaRA: {sara.trainable:,})."
        )
    return _train_and_evaluate(run, model, trainable, learning_rate, "LoRA")


def _train_and_evaluate(run: DemoRun, model: PeftModel, trainable: int, learning_rate: float, method: str) -> MethodRun:
    """The shared fine-tuning loop (same batches, noise and seed for both methods), then the held-out losses."""
    settings = run.settings
    every = settings.checkpoint_every
    history = finetune(
        model,
        run.noise_scheduler,
        run.data.finetune_images,
        run.data.finetune_labels,
        steps=settings.finetune_steps,
        batch_size=settings.finetune_batch_size,
        learning_rate=learning_rate,
        seed=settings.seed,
        description=f"fine-tuning with {method}, lr {learning_rate:g}",
        use_sara_helper=method == "SaRA",
        evaluate=run.evaluate,
        checkpoint_steps=sorted({*range(every, settings.finetune_steps, every), settings.finetune_steps}),
    )
    return MethodRun(model, trainable, history, history.checkpoints[-1][1], learning_rate)


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


def sample_scores(
    judge: TrainedJudge,
    samples: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    references: dict[str, torch.Tensor],
) -> dict[str, float]:
    """The judge's accuracy on the samples of each class group (fine-tuned classes: expected in the new style;
    other classes: in the original style) and the Fréchet distance of their features to the real ``references``."""
    scores = {}
    for group, styled in (("styled_classes", True), ("other_classes", False)):
        scores[f"{group}_accuracy"] = judge.accuracy(samples[group], labels[group], styled)
        scores[f"{group}_frechet"] = frechet_distance(judge.features(samples[group]), judge.features(references[group]))
    return scores


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
            report.save_grid(samples[name, group], per_class, output_dir / f"samples_{name}_{group}.png")
    sara.samples, lora.samples = scores["sara"], scores["lora"]
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
    row_titles = {
        "styled_classes": f"classes {_names(settings, settings.styled_classes)} (fine-tuned)",
        "other_classes": f"classes {_names(settings, settings.other_classes)} (not fine-tuned)",
    }
    titles = {"base": "base model", "sara": "SaRA", "lora": f"LoRA r={lora_rank(lora.model)}"}
    captions = {}
    for group, styled in (("styled_classes", True), ("other_classes", False)):
        expected = f"{'in the new style' if styled else 'as before'}"
        for name in models:
            captions[row_titles[group], titles[name]] = (
                f"judged right class {expected}: {scores[name][f'{group}_accuracy']:.0%}"
            )
    report.save_comparison_figure(
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
                report.TradeoffCurve(
                    f"{name}, lr {method_run.learning_rate:g} ({method_run.trainable:,} params)",
                    METHOD_COLORS[method],
                    points,
                    _linestyle(method_run.learning_rate, settings.main_learning_rate),
                )
            )
    report.save_tradeoff_plot(
        curves,
        run.output_dir / "tradeoff.png",
        title=f"New style learned vs other classes kept ({settings.style} {_names(settings, settings.styled_classes)};"
        f" a dot every {settings.checkpoint_every} steps)",
        xlabel=f"held-out loss change on {settings.style} {_names(settings, settings.styled_classes)} (%, left = "
        "learned more)",
        ylabel=f"held-out loss change on {_names(settings, settings.other_classes)} (%, down = kept more)",
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
    report.save_loss_plot(
        {
            f"SaRA ({sara.trainable:,} params)": sara.history.losses,
            f"LoRA r={lora_rank(lora.model)} ({lora.trainable:,} params)": lora.history.losses,
        },
        markers,
        run.output_dir / "loss_curves.png",
        title=f"Fine-tuning on {settings.style} {_names(settings, settings.styled_classes)}, lr "
        f"{settings.main_learning_rate:g} (same batches, noise and seed)",
    )


def _first_per_class(images: torch.Tensor, labels: torch.Tensor, classes, count: int) -> torch.Tensor:
    return torch.cat([images[labels == index][:count] for index in classes])


def write_report(metrics: dict[str, Any], output_dir: Path) -> None:
    """Write metrics.json and print the summary table."""
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    report.print_summary(metrics, output_dir)
