"""The demo's orchestration: pretrain (or reuse) a base, fine-tune it with SaRA and LoRA at each learning rate,
measure what each learned and kept, and write everything into the output folder. :func:`run_demo` is the recipe;
each step below is one function (the run's records are in ``records.py``, its pictures in ``plots.py``, metrics.json
in ``metrics.py`` and the printed summary in ``report.py``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from peft import PeftModel

from ..constants import __version__
from ..training import paper_learning_rate
from .data import apply_style, dataset_info, load_splits, of_classes
from .diffusion import PretrainResult, build_noise_scheduler, load_or_pretrain
from .finetune import (
    adapted_module_names,
    finetune,
    make_lora_model,
    make_sara_model,
    reload_max_difference,
    selection_summary,
)
from .judge import TrainedJudge, train_judge
from .metrics import adapter_dir, collect_metrics, lora_rank, parameter_count, sweep_entry
from .plots import plot_losses, plot_tradeoff, save_pictures
from .pretrain_base import shipped_base
from .records import DemoData, DemoResult, DemoRun, MethodRun, class_names
from .report import write_report
from .settings import DemoSettings, cache_key


def run_demo(
    settings: DemoSettings,
    output_dir: Path,
    cache_root: Path | None,
    pretrain_threads: int | None = None,
    pretrain: bool = False,
) -> DemoResult:
    """Run the whole demo. The base model is the one shipped with the package when ``settings`` pretrain exactly
    that one (the defaults on the digits) and ``pretrain`` is False; otherwise it is read from or pretrained into
    the cache (``cache_root=None`` neither reads nor writes it; ``pretrain_threads`` torch threads pretrain a base
    that is not cached, default: the current count)."""
    run_start = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    announce(settings, output_dir)
    cache_folder = cache_root / cache_key(settings) if cache_root is not None else None
    run = DemoRun(settings, output_dir, cache_folder, prepare_data(settings), build_noise_scheduler(), run_start)
    run.pretrain_threads = pretrain_threads
    pretrained = load_base(run, use_shipped=not pretrain)
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
    metrics["sweep"] = {name.lower(): [sweep_entry(item, base_losses) for item in runs] for name, runs in sweep.items()}
    metrics["times"]["total_seconds"] = time.perf_counter() - run.start
    write_report(metrics, output_dir)
    return DemoResult(metrics, output_dir, base, sara.model, lora.model)


def announce(settings: DemoSettings, output_dir: Path) -> None:
    """Print what the run is about to do."""
    print(
        f"peft-sara {__version__} demo ({settings.dataset}): teach a small diffusion model to draw "
        f"{class_names(settings, settings.styled_classes)} {settings.style}, with SaRA and with LoRA at the same number "
        f"of trainable parameters, and check what happens to {class_names(settings, settings.other_classes)}."
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
    settings: DemoSettings,
    data: DemoData,
    cache_folder: Path | None,
    threads: int | None = None,
    use_shipped: bool = True,
) -> PretrainResult:
    """The pretrained base model of ``settings``: the one shipped with the package when ``use_shipped`` and
    ``settings`` pretrain exactly that one (:mod:`peft_sara.demo.pretrain_base`), else from ``cache_folder`` if it
    holds one, else trained (and cached) with ``threads`` torch threads (default: the current count)."""
    shipped = shipped_base(settings) if use_shipped else None
    if shipped is not None:
        return shipped
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


def load_base(run: DemoRun, use_shipped: bool = True) -> PretrainResult:
    """The base model (see :func:`pretrained_base`); print where it came from."""
    pretrained = pretrained_base(run.settings, run.data, run.cache_folder, run.pretrain_threads, use_shipped)
    if pretrained.shipped:
        print(
            f"Using the pretrained base model shipped with peft-sara ({parameter_count(pretrained.unet):,} "
            f"parameters, {run.settings.pretrain_steps} steps on all "
            f"{dataset_info(run.settings.dataset).num_classes} classes; --pretrain trains it anew, "
            "`python -m peft_sara.demo.pretrain_base --check` reproduces it)."
        )
    elif pretrained.reused_from:
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
        f"Base model held-out loss: new style ({settings.style} {class_names(settings, settings.styled_classes)}) "
        f"{losses['new_style']:.4f}, other classes ({class_names(settings, settings.other_classes)}, original style) "
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
