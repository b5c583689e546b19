"""What metrics.json records about a demo run: settings, seeds, data sizes, the base model, both methods, times,
and every learning rate's run of the sweep."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from ..constants import __version__
from ..training import paper_learning_rate
from .diffusion import PretrainResult, recent_mean
from .records import DemoRun, MethodRun
from .settings import LEARNING_RATE_CHOICE


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(param.numel() for param in model.parameters())


def lora_rank(model: PeftModel) -> int:
    """The rank of ``model``'s LoRA adapter."""
    return model.peft_config["default"].r


def adapter_dir(output_dir: Path, method: str) -> Path:
    """Where ``method``'s adapter is saved (``sara`` or ``lora``)."""
    return output_dir / f"{method}_adapter"


def change_pct(before: float, after: float) -> float:
    """``100 * (after - before) / before``: a held-out loss change in % of the base model's."""
    return 100.0 * (after - before) / before


def _method_metrics(method: MethodRun, base_losses: dict[str, float], folder: Path) -> dict[str, Any]:
    """The numbers both methods report: losses before / after, training time and the adapter file's size."""
    losses = method.losses
    return {
        "learning_rate": method.learning_rate,
        "trainable_params": method.trainable,
        "new_style_loss_before": base_losses["new_style"],
        "new_style_loss_after": losses["new_style"],
        "new_style_loss_change_pct": change_pct(base_losses["new_style"], losses["new_style"]),
        "other_classes_loss_before": base_losses["other_classes"],
        "other_classes_loss_after": losses["other_classes"],
        "other_classes_loss_change": losses["other_classes"] - base_losses["other_classes"],
        "other_classes_loss_change_pct": change_pct(base_losses["other_classes"], losses["other_classes"]),
        "final_train_loss": recent_mean(method.history.losses),
        "train_seconds": method.history.seconds,
        "adapter_dir": str(folder),
        "adapter_file_bytes": (folder / "adapter_model.safetensors").stat().st_size,
    }


def collect_metrics(
    run: DemoRun,
    pretrained: PretrainResult,
    selection: dict[str, Any],
    base_losses: dict[str, float],
    sara: MethodRun,
    lora: MethodRun,
    reload_difference: float,
) -> dict[str, Any]:
    """Everything metrics.json records: settings, seeds, data sizes, the base model, both methods and the times."""
    settings, data, seed = run.settings, run.data, run.settings.seed
    sara_metrics = _method_metrics(sara, base_losses, adapter_dir(run.output_dir, "sara"))
    sara_metrics.update(
        {
            "trainable_after_reselection": sara.history.trainable_after_reselection,
            "reselected_at_step": sara.history.reselected_at_step,
            "final_rank_loss": sara.history.rank_losses[-1] if sara.history.rank_losses else 0.0,
            "reload_max_abs_diff": reload_difference,
        }
    )
    lora_metrics = _method_metrics(lora, base_losses, adapter_dir(run.output_dir, "lora"))
    lora_metrics["rank"] = lora_rank(lora.model)
    return {
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
            "evaluation_noise": run.eval_seed,
            "sampling_noise": run.sampling_seed,
        },
        "data": {
            "dataset": settings.dataset,
            "style": settings.style,
            "styled_classes": list(settings.styled_classes),
            "other_classes": list(settings.other_classes),
            "finetune_images": len(data.finetune_labels),
            "heldout_styled_images": len(data.heldout_styled_labels),
            "heldout_other_images": len(data.heldout_other_labels),
        },
        "pretrained_model": {
            "parameters": parameter_count(pretrained.unet),
            "source": "shipped" if pretrained.shipped else "cache" if pretrained.reused_from else "pretrained",
            "reused_from_cache": pretrained.reused_from is not None and not pretrained.shipped,
            "cache_folder": str(run.cache_folder) if run.cache_folder is not None else None,
            "folder": pretrained.reused_from or pretrained.saved_to,
            "pretrain_seconds": pretrained.seconds,
            "final_pretrain_loss": recent_mean(pretrained.losses),
        },
        "selection": {
            **selection,
            "trainable_fraction": settings.trainable_fraction,
            "paper_learning_rate_at_median_cutoff": paper_learning_rate(selection["cutoff_median"]),
        },
        "base": {"new_style_loss": base_losses["new_style"], "other_classes_loss": base_losses["other_classes"]},
        "sara": sara_metrics,
        "lora": lora_metrics,
        "times": {
            "pretrain_seconds": pretrained.seconds if pretrained.reused_from is None else 0.0,
            "sara_train_seconds": sara.history.seconds,
            "lora_train_seconds": lora.history.seconds,
            "evaluation_seconds": run.evaluation_seconds,
            "sampling_seconds": run.sampling_seconds,
            "total_seconds": time.perf_counter() - run.start,
        },
        "outputs": sorted(path.name for path in run.output_dir.iterdir()) + ["metrics.json"],
    }


def sweep_entry(method: MethodRun, base_losses: dict[str, float]) -> dict[str, Any]:
    """One run of the learning-rate sweep as metrics.json records it: its final losses' change and its checkpoints."""
    return {
        "learning_rate": method.learning_rate,
        "trainable_params": method.trainable,
        "new_style_loss_change_pct": change_pct(base_losses["new_style"], method.losses["new_style"]),
        "other_classes_loss_change_pct": change_pct(base_losses["other_classes"], method.losses["other_classes"]),
        "checkpoints": [{"step": step, **losses} for step, losses in method.history.checkpoints],
        "train_seconds": method.history.seconds,
    }
