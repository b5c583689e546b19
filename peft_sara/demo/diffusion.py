"""The toy class-conditional diffusion model: building it, its loss, held-out evaluation, sampling, pretraining.

Everything random takes an explicit seed, so two runs with the same settings (and thread count) are identical.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch import nn
from tqdm.auto import tqdm

from ..atomic import folder_writer

NUM_TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"


def build_unet(unet_config: dict[str, Any], seed: int) -> UNet2DModel:
    """A freshly initialised (seeded) class-conditional ``UNet2DModel`` for 1-channel images."""
    torch.manual_seed(seed)
    return UNet2DModel(**unet_config)


def build_noise_scheduler() -> DDPMScheduler:
    """The DDPM noise schedule used for training and evaluation (DDIM sampling reuses its config)."""
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE)


def predict_noise(model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's noise prediction (works for the bare UNet and for a ``PeftModel`` around it)."""
    return model(noisy, timesteps, class_labels=labels).sample


def diffusion_loss(
    model: nn.Module,
    noise_scheduler: DDPMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """The usual epsilon-prediction MSE at the given noise and timesteps."""
    noisy = noise_scheduler.add_noise(images, noise, timesteps)
    return torch.nn.functional.mse_loss(predict_noise(model, noisy, timesteps, labels), noise)


class BatchSampler:
    """Endless seeded stream of (images, labels, noise, timesteps) training batches drawn with replacement."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        positions = torch.randint(0, len(self.labels), (self.batch_size,), generator=self.generator)
        images = self.images[positions]
        noise = torch.randn(images.shape, generator=self.generator)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (self.batch_size,), generator=self.generator)
        return images, self.labels[positions], noise, timesteps


@torch.no_grad()
def heldout_loss(
    model: nn.Module,
    noise_scheduler: DDPMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    draws: int,
    seed: int,
    batch_size: int = 512,
) -> float:
    """Mean diffusion loss over ``draws`` fixed (noise, timestep) pairs per image: the same pairs for every model."""
    generator = torch.Generator().manual_seed(seed)
    all_images = images.repeat(draws, 1, 1, 1)
    all_labels = labels.repeat(draws)
    noise = torch.randn(all_images.shape, generator=generator)
    timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(all_labels),), generator=generator)
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(all_labels), batch_size):
        chunk = slice(start, start + batch_size)
        loss = diffusion_loss(
            model, noise_scheduler, all_images[chunk], all_labels[chunk], noise[chunk], timesteps[chunk]
        )
        total += loss.item() * len(all_labels[chunk])
    model.train(was_training)
    return total / len(all_labels)


@torch.no_grad()
def sample_images(
    model: nn.Module, noise_scheduler: DDPMScheduler, labels: torch.Tensor, num_inference_steps: int, seed: int
) -> torch.Tensor:
    """DDIM samples (in [-1, 1]) of the given classes, from seeded starting noise shared by every model."""
    sampler = DDIMScheduler.from_config(noise_scheduler.config)
    sampler.set_timesteps(num_inference_steps)
    generator = torch.Generator().manual_seed(seed)
    config = _unet_config(model)
    images = torch.randn((len(labels), config.in_channels, config.sample_size, config.sample_size), generator=generator)
    was_training = model.training
    model.eval()
    for timestep in sampler.timesteps:
        batch_timesteps = torch.full((len(labels),), int(timestep), dtype=torch.long)
        images = sampler.step(predict_noise(model, images, batch_timesteps, labels), timestep, images).prev_sample
    model.train(was_training)
    return images.clamp(-1, 1)


def _unet_config(model: nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


@dataclass
class PretrainResult:
    """The pretrained base model and how it was obtained."""

    unet: UNet2DModel
    losses: list[float]
    seconds: float
    reused_from: str | None  # the cache folder it was loaded from, or None if trained in this run
    saved_to: str | None  # the cache folder it was written to in this run, if any
    shipped: bool = False  # the base model shipped with the package (``reused_from`` is its folder)


def pretrain(
    unet: UNet2DModel,
    noise_scheduler: DDPMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    ema_decay: float = 0.0,
) -> list[float]:
    """Train every weight of ``unet`` on all classes (AdamW, warmup + cosine schedule); returns the loss per step.

    With ``ema_decay`` > 0 the model ends with the exponential moving average of its weights (the usual trick for
    cleaner diffusion samples; the decay ramps up as ``(1 + t) / (10 + t)`` early on).
    """
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.0)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    batches = BatchSampler(images, labels, batch_size, seed)
    params = list(unet.parameters())
    averaged = [param.detach().clone() for param in params] if ema_decay > 0 else None
    losses = []
    unet.train()
    progress = tqdm(range(steps), desc="pretraining base model", unit="step", dynamic_ncols=True)
    for step in progress:
        loss = diffusion_loss(unet, noise_scheduler, *batches.next())
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if averaged is not None:
            decay = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(averaged, [param.detach() for param in params], 1 - decay)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{recent_mean(losses):.4f}")
    if averaged is not None:
        with torch.no_grad():
            torch._foreach_copy_(params, averaged)
    unet.eval()
    return losses


def recent_mean(values: list[float], window: int = 50) -> float:
    """Mean of the last ``window`` values (the smoothed loss shown in progress bars and recorded as final)."""
    recent = values[-window:]
    return sum(recent) / len(recent)


PRETRAIN_INFO_NAME = "pretrain_info.json"


def load_or_pretrain(
    unet_config: dict[str, Any],
    noise_scheduler: DDPMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    cache_folder: Path | None,
    ema_decay: float,
    threads: int | None = None,
) -> PretrainResult:
    """Load the pretrained base model from ``cache_folder`` if it holds one, else pretrain it (and cache it there).

    ``cache_folder=None`` disables the cache. The folder name should encode every setting that affects the weights
    (see :func:`peft_sara.demo.settings.cache_key`). ``threads``: torch threads while pretraining (restored after).
    """
    if cache_folder is not None and (cache_folder / PRETRAIN_INFO_NAME).is_file():
        info = json.loads((cache_folder / PRETRAIN_INFO_NAME).read_text())
        unet = UNet2DModel.from_pretrained(cache_folder).eval()
        return PretrainResult(unet, info["losses"], info["seconds"], reused_from=str(cache_folder), saved_to=None)
    start = time.perf_counter()
    unet = build_unet(unet_config, seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        losses = pretrain(unet, noise_scheduler, images, labels, steps, batch_size, learning_rate, seed, ema_decay)
    finally:
        torch.set_num_threads(previous_threads)
    seconds = time.perf_counter() - start
    saved_to = None
    if cache_folder is not None:
        _save_atomically(unet, {"losses": losses, "seconds": seconds}, cache_folder)
        saved_to = str(cache_folder)
    return PretrainResult(unet, losses, seconds, reused_from=None, saved_to=saved_to)


def _save_atomically(unet: UNet2DModel, info: dict[str, Any], cache_folder: Path) -> None:
    """Publish the model and its record as one unit (``peft_sara.atomic.folder_writer``: staged, fsynced, renamed),
    so a crash never leaves half a cache; a run that cached the same key meanwhile is replaced by an equal model."""
    with folder_writer(cache_folder) as staging:
        unet.save_pretrained(staging)
        (staging / PRETRAIN_INFO_NAME).write_text(json.dumps(info))
