"""What one demo run carries between its steps: the images, the run's shared state, each fine-tuned model's record,
and what :func:`~peft_sara.demo.run.run_demo` returns."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from peft import PeftModel
from torch import nn

from .data import dataset_info
from .diffusion import heldout_loss
from .finetune import FinetuneHistory
from .judge import TrainedJudge
from .settings import DemoSettings


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


@dataclass
class MethodRun:
    """One fine-tuned model: its trainable count (before any re-selection), training history and held-out losses."""

    model: PeftModel
    trainable: int
    history: FinetuneHistory
    losses: dict[str, float]
    learning_rate: float
    samples: dict[str, float] = field(default_factory=dict)  # the judge's scores of its samples (main runs only)


@dataclass
class DemoResult:
    """What :func:`~peft_sara.demo.run.run_demo` produced (the models stay in memory for callers such as tests)."""

    metrics: dict[str, Any]
    output_dir: Path
    base_model: UNet2DModel
    sara_model: PeftModel
    lora_model: PeftModel


def class_names(settings: DemoSettings, classes: Sequence[int]) -> str:
    """The names of ``classes`` in ``settings``' dataset, comma-separated (for messages and plot titles)."""
    names = dataset_info(settings.dataset).class_names
    return ", ".join(names[index] for index in classes)
