"""The demo's settings, command line and orchestration: pretrain (or reuse) a base, fine-tune it with SaRA and LoRA,
measure, and write everything into the output folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from peft import PeftModel

from .. import __version__
from ..training import paper_learning_rate
from . import report
from .data import apply_style, load_digit_splits, of_classes
from .diffusion import build_noise_scheduler, heldout_loss, load_or_pretrain, sample_images
from .finetune import (
    FinetuneHistory,
    adapted_module_names,
    finetune,
    make_lora_model,
    make_sara_model,
    reload_max_difference,
    selection_summary,
)

CACHE_FORMAT_VERSION = 1  # bump when the pretraining code changes what a cached model contains
# How the default learning rates were chosen; copied into metrics.json. The sweep's numbers (held-out loss after
# fine-tuning, new style / other classes; base 0.2436 / 0.1525), default settings, 1 thread:
#   lr      SaRA              LoRA r=2
#   1e-3    0.1803 / 0.1661   0.1812 / 0.1676
#   3e-3    0.1679 / 0.1712   0.1677 / 0.1716
#   1e-2    0.1617 / 0.1837   0.1584 / 0.1804
LEARNING_RATE_CHOICE = (
    "Swept {1e-3, 3e-3, 1e-2} for each method with the default settings. For both, a larger learning rate fits the "
    "new style better and forgets more; 3e-3 sits in the middle of that trade-off for both, so both use it. The "
    "paper's 1e-3 * exp(-350 * threshold) (about 2e-4 at this model's median cutoff) is fitted to Stable Diffusion "
    "over 5,000 steps; here 3e-4 cut the new-style loss by 20% in 200 steps where 3e-3 cut it by 33% (SaRA, "
    "measured on an earlier 600-step base)."
)


def _unet_config(block_out_channels: tuple[int, ...], attention_head_dim: int) -> dict[str, Any]:
    return {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": block_out_channels,
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "num_class_embeds": 10,  # class-conditional: an embedding per digit, added to the timestep embedding
        "norm_num_groups": 8,
        "attention_head_dim": attention_head_dim,
    }


@dataclass
class DemoSettings:
    """Every knob of the demo. ``DemoSettings()`` is the default run, :meth:`quick` a tiny one for tests."""

    unet_config: dict[str, Any] = field(default_factory=lambda: _unet_config((32, 64), 32))
    pretrain_steps: int = 500
    pretrain_batch_size: int = 64
    pretrain_learning_rate: float = 2e-3
    finetune_steps: int = 200
    finetune_batch_size: int = 32
    # Learning rates, one per method (see LEARNING_RATE_CHOICE).
    sara_learning_rate: float = 3e-3
    lora_learning_rate: float = 3e-3
    # SaRA: the smallest 5% of every targeted weight by |w|. A per-layer fraction rather than the paper's global
    # threshold, because a briefly trained random-init model has layer-dependent weight scales, unlike SD.
    trainable_fraction: float = 0.05
    lambda_rank: float = 5e-4  # the official training script's value
    rank_min_dim: int = 16  # the library default (64) would exclude every layer of this small UNet
    style: str = "mirrored"
    styled_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    other_classes: tuple[int, ...] = (5, 6, 7, 8, 9)
    heldout_fraction: float = 0.2
    eval_draws: int = 4  # (noise, timestep) pairs per held-out image
    sample_steps: int = 25  # DDIM steps for the sample grids
    samples_per_class: int = 8
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        """A tiny configuration (well under a minute on 2 CPU cores) that exercises every step."""
        return cls(
            unet_config=_unet_config((16, 32), 16),
            pretrain_steps=40,
            pretrain_batch_size=32,
            finetune_steps=30,
            finetune_batch_size=16,
            eval_draws=1,
            sample_steps=10,
            samples_per_class=4,
        )


def cache_key(settings: DemoSettings) -> str:
    """Short hash of everything that determines the pretrained weights."""
    relevant = {
        "format": CACHE_FORMAT_VERSION,
        "unet": settings.unet_config,
        "steps": settings.pretrain_steps,
        "batch_size": settings.pretrain_batch_size,
        "learning_rate": settings.pretrain_learning_rate,
        "heldout_fraction": settings.heldout_fraction,
        "seed": settings.seed,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    """``platformdirs``' user cache dir if installed, else ``$XDG_CACHE_HOME`` or ``~/.cache``; plus ``peft-sara/demo``."""
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("peft-sara")) / "demo"
    except ImportError:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "peft-sara" / "demo"


@dataclass
class DemoResult:
    """What :func:`run_demo` produced (the models stay in memory for callers such as tests)."""

    metrics: dict[str, Any]
    output_dir: Path
    base_model: UNet2DModel
    sara_model: PeftModel
    lora_model: PeftModel


def _file_size(folder: Path, name: str = "adapter_model.safetensors") -> int:
    return (folder / name).stat().st_size


def _relative_change(before: float, after: float) -> float:
    return 100.0 * (after - before) / before


def _method_metrics(
    history: FinetuneHistory,
    learning_rate: float,
    trainable: int,
    base_losses: dict[str, float],
    losses: dict[str, float],
    adapter_dir: Path,
) -> dict[str, Any]:
    return {
        "learning_rate": learning_rate,
        "trainable_params": trainable,
        "new_style_loss_before": base_losses["new_style"],
        "new_style_loss_after": losses["new_style"],
        "new_style_loss_change_pct": _relative_change(base_losses["new_style"], losses["new_style"]),
        "other_classes_loss_before": base_losses["other_classes"],
        "other_classes_loss_after": losses["other_classes"],
        "other_classes_loss_change": losses["other_classes"] - base_losses["other_classes"],
        "other_classes_loss_change_pct": _relative_change(base_losses["other_classes"], losses["other_classes"]),
        "final_train_loss": sum(history.losses[-50:]) / len(history.losses[-50:]),
        "train_seconds": history.seconds,
        "adapter_dir": str(adapter_dir),
        "adapter_file_bytes": _file_size(adapter_dir),
    }


def run_demo(settings: DemoSettings, output_dir: Path, cache_root: Path | None) -> DemoResult:
    """Run the whole demo; ``cache_root=None`` neither reads nor writes the pretrained-model cache."""
    run_start = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    seed = settings.seed
    eval_seed, sampling_seed = seed + 1, seed + 2
    styled_names = ", ".join(map(str, settings.styled_classes))
    other_names = ", ".join(map(str, settings.other_classes))
    print(
        f"peft-sara {__version__} demo: teach a small digit diffusion model to draw {styled_names} "
        f"{settings.style}, with SaRA and with LoRA, and check what happens to {other_names}."
    )
    print(f"torch threads: {torch.get_num_threads()}   seed: {seed}   output: {output_dir}")

    # ------------------------------------------------------------------------------------------------ data
    splits = load_digit_splits(settings.heldout_fraction, seed)
    train_images, train_labels = of_classes(splits.train_images, splits.train_labels, settings.styled_classes)
    finetune_images = apply_style(train_images, settings.style)
    heldout_styled, heldout_styled_labels = of_classes(
        splits.heldout_images, splits.heldout_labels, settings.styled_classes
    )
    heldout_styled = apply_style(heldout_styled, settings.style)
    heldout_other, heldout_other_labels = of_classes(
        splits.heldout_images, splits.heldout_labels, settings.other_classes
    )
    noise_scheduler = build_noise_scheduler()

    # ------------------------------------------------------------------------------------------------ base model
    cache_folder = cache_root / cache_key(settings) if cache_root is not None else None
    pretrained = load_or_pretrain(
        settings.unet_config,
        noise_scheduler,
        splits.train_images,
        splits.train_labels,
        steps=settings.pretrain_steps,
        batch_size=settings.pretrain_batch_size,
        learning_rate=settings.pretrain_learning_rate,
        seed=seed,
        cache_folder=cache_folder,
    )
    base = pretrained.unet
    base_parameters = sum(param.numel() for param in base.parameters())
    if pretrained.reused_from:
        print(
            f"Reused the pretrained base model from the cache: {pretrained.reused_from} "
            f"(pretraining took {pretrained.seconds:.0f} s when it was made; --no-cache retrains)."
        )
    else:
        where = f", cached in {pretrained.saved_to}" if pretrained.saved_to else " (not cached: --no-cache)"
        print(
            f"Pretrained the base model ({base_parameters:,} parameters) on all 10 classes in "
            f"{pretrained.seconds:.0f} s{where}."
        )

    def evaluate(model) -> dict[str, float]:
        return {
            "new_style": heldout_loss(
                model, noise_scheduler, heldout_styled, heldout_styled_labels, settings.eval_draws, eval_seed
            ),
            "other_classes": heldout_loss(
                model, noise_scheduler, heldout_other, heldout_other_labels, settings.eval_draws, eval_seed
            ),
        }

    evaluation_start = time.perf_counter()
    base_losses = evaluate(base)
    evaluation_seconds = time.perf_counter() - evaluation_start
    print(
        f"Base model held-out loss: new style ({settings.style} {styled_names}) {base_losses['new_style']:.4f}, "
        f"other classes ({other_names}, original style) {base_losses['other_classes']:.4f}"
    )

    # ------------------------------------------------------------------------------------------------ SaRA
    sara_model = make_sara_model(base, settings.trainable_fraction, settings.lambda_rank, settings.rank_min_dim)
    selection = selection_summary(sara_model)
    sara_trainable, _ = sara_model.get_nb_trainable_parameters()
    sara_median_cutoff = selection["cutoff_median"]
    print(
        f"SaRA selection: {selection['rule']} over {selection['layers']} layers -> {sara_trainable:,} trainable "
        f"entries of {selection['targeted_weights']:,} targeted weights ({base_parameters:,} in the UNet); "
        f"per-layer |w| cutoffs {selection['cutoff_min']:.2e} .. {selection['cutoff_max']:.2e} "
        f"(median {sara_median_cutoff:.2e})."
    )
    print(
        f"SaRA learning rate {settings.sara_learning_rate:g} (the paper's formula at the median cutoff would give "
        f"{paper_learning_rate(sara_median_cutoff):.2e}, fitted for SD over 5,000 steps)."
    )
    sara_history = finetune(
        sara_model,
        noise_scheduler,
        finetune_images,
        train_labels,
        steps=settings.finetune_steps,
        batch_size=settings.finetune_batch_size,
        learning_rate=settings.sara_learning_rate,
        seed=seed,
        description="fine-tuning with SaRA",
        use_sara_helper=True,
    )
    evaluation_start = time.perf_counter()
    sara_losses = evaluate(sara_model)
    evaluation_seconds += time.perf_counter() - evaluation_start

    # ------------------------------------------------------------------------------------------------ LoRA
    lora_model = make_lora_model(base, adapted_module_names(sara_model), sara_trainable, seed)
    lora_trainable, _ = lora_model.get_nb_trainable_parameters()
    lora_rank = lora_model.peft_config["default"].r
    print(
        f"LoRA on the same {selection['layers']} modules at rank {lora_rank}: {lora_trainable:,} trainable "
        f"parameters (SaRA: {sara_trainable:,}); learning rate {settings.lora_learning_rate:g}."
    )
    lora_history = finetune(
        lora_model,
        noise_scheduler,
        finetune_images,
        train_labels,
        steps=settings.finetune_steps,
        batch_size=settings.finetune_batch_size,
        learning_rate=settings.lora_learning_rate,
        seed=seed,
        description="fine-tuning with LoRA",
        use_sara_helper=False,
    )
    evaluation_start = time.perf_counter()
    lora_losses = evaluate(lora_model)
    evaluation_seconds += time.perf_counter() - evaluation_start

    # ------------------------------------------------------------------------------------------------ adapters
    sara_dir, lora_dir = output_dir / "sara_adapter", output_dir / "lora_adapter"
    sara_model.save_pretrained(sara_dir)
    lora_model.save_pretrained(lora_dir)
    reload_difference = reload_max_difference(sara_model, base, sara_dir, seed)
    print(
        f"Saved the SaRA adapter to {sara_dir}; reloaded into a fresh base with PeftModel.from_pretrained, it "
        f"reproduces the trained model's outputs (max |difference| {reload_difference:.1e})."
    )

    # ------------------------------------------------------------------------------------------------ pictures
    sampling_start = time.perf_counter()
    per_class = settings.samples_per_class
    styled_labels = torch.tensor(settings.styled_classes).repeat_interleave(per_class)
    other_labels = torch.tensor(settings.other_classes).repeat_interleave(per_class)
    models = {"base": base, "sara": sara_model, "lora": lora_model}
    samples = {}
    for name, model in models.items():
        for group, labels in (("styled_classes", styled_labels), ("other_classes", other_labels)):
            samples[name, group] = sample_images(model, noise_scheduler, labels, settings.sample_steps, sampling_seed)
            report.save_grid(samples[name, group], per_class, output_dir / f"samples_{name}_{group}.png")
    targets = {
        "styled_classes": _first_per_class(heldout_styled, heldout_styled_labels, settings.styled_classes, per_class),
        "other_classes": _first_per_class(heldout_other, heldout_other_labels, settings.other_classes, per_class),
    }
    report.save_grid(targets["styled_classes"], per_class, output_dir / "heldout_styled_classes.png")
    report.save_comparison_figure(
        [
            [
                (f"held-out, {settings.style} (target)", targets["styled_classes"]),
                ("base model", samples["base", "styled_classes"]),
                ("SaRA", samples["sara", "styled_classes"]),
                (f"LoRA r={lora_rank}", samples["lora", "styled_classes"]),
            ],
            [
                ("held-out, original style", targets["other_classes"]),
                ("base model", samples["base", "other_classes"]),
                ("SaRA", samples["sara", "other_classes"]),
                (f"LoRA r={lora_rank}", samples["lora", "other_classes"]),
            ],
        ],
        [f"classes {styled_names} (fine-tuned)", f"classes {other_names} (not fine-tuned)"],
        per_class,
        output_dir / "comparison.png",
    )
    sampling_seconds = time.perf_counter() - sampling_start
    markers = {}
    if sara_history.reselected_at_step is not None:
        markers["SaRA re-selection"] = sara_history.reselected_at_step
    report.save_loss_plot(
        {
            f"SaRA ({sara_trainable:,} params)": sara_history.losses,
            f"LoRA r={lora_rank} ({lora_trainable:,} params)": lora_history.losses,
        },
        markers,
        output_dir / "loss_curves.png",
        title=f"Fine-tuning on {settings.style} digits {styled_names} (same batches, noise and seed)",
    )

    # ------------------------------------------------------------------------------------------------ metrics
    sara_metrics = _method_metrics(
        sara_history, settings.sara_learning_rate, sara_trainable, base_losses, sara_losses, sara_dir
    )
    sara_metrics.update(
        {
            "trainable_after_reselection": sara_history.trainable_after_reselection,
            "reselected_at_step": sara_history.reselected_at_step,
            "final_rank_loss": sara_history.rank_losses[-1] if sara_history.rank_losses else 0.0,
            "reload_max_abs_diff": reload_difference,
        }
    )
    lora_metrics = _method_metrics(
        lora_history, settings.lora_learning_rate, lora_trainable, base_losses, lora_losses, lora_dir
    )
    lora_metrics["rank"] = lora_rank
    metrics = {
        "peft_sara_version": __version__,
        "settings": {**dataclasses.asdict(settings), "torch_threads": torch.get_num_threads()},
        "learning_rate_choice": LEARNING_RATE_CHOICE,
        "seeds": {
            "data_split": seed,
            "model_init": seed,
            "pretraining_batches": seed,
            "finetuning_batches": seed,
            "lora_init": seed,
            "rank_loss_layer_sampling": seed,
            "evaluation_noise": eval_seed,
            "sampling_noise": sampling_seed,
        },
        "data": {
            "style": settings.style,
            "styled_classes": list(settings.styled_classes),
            "other_classes": list(settings.other_classes),
            "finetune_images": len(train_labels),
            "heldout_styled_images": len(heldout_styled_labels),
            "heldout_other_images": len(heldout_other_labels),
        },
        "pretrained_model": {
            "parameters": base_parameters,
            "reused_from_cache": pretrained.reused_from is not None,
            "cache_folder": str(cache_folder) if cache_folder is not None else None,
            "pretrain_seconds": pretrained.seconds,
            "final_pretrain_loss": sum(pretrained.losses[-50:]) / len(pretrained.losses[-50:]),
        },
        "selection": {
            **selection,
            "trainable_fraction": settings.trainable_fraction,
            "paper_learning_rate_at_median_cutoff": paper_learning_rate(sara_median_cutoff),
        },
        "base": {"new_style_loss": base_losses["new_style"], "other_classes_loss": base_losses["other_classes"]},
        "sara": sara_metrics,
        "lora": lora_metrics,
        "times": {
            "pretrain_seconds": pretrained.seconds if pretrained.reused_from is None else 0.0,
            "sara_train_seconds": sara_history.seconds,
            "lora_train_seconds": lora_history.seconds,
            "evaluation_seconds": evaluation_seconds,
            "sampling_seconds": sampling_seconds,
            "total_seconds": time.perf_counter() - run_start,
        },
        "outputs": sorted(path.name for path in output_dir.iterdir()) + ["metrics.json"],
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    report.print_summary(metrics, output_dir)
    return DemoResult(metrics, output_dir, base, sara_model, lora_model)


def _first_per_class(images: torch.Tensor, labels: torch.Tensor, classes, count: int) -> torch.Tensor:
    return torch.cat([images[labels == digit][:count] for digit in classes])
