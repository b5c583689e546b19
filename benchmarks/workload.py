"""What a model benchmark feeds its model: a seeded batch of random inputs for a preset (latents,
timesteps, text embeddings and, for SDXL and SD3, the pooled text and size ids), the diffusion-style loss, and the
layers a target list names. The models themselves come from :mod:`peft_sara.presets`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_sara.presets import ModelPreset


def preset_summary(preset: ModelPreset) -> dict[str, Any]:
    """The preset fields recorded in every result JSON."""
    return {
        "name": preset.name,
        "description": preset.description,
        "config": preset.config,
        "latent_size": preset.latent_size,
        "text_tokens": preset.text_tokens,
    }


@dataclass
class Batch:
    """Model inputs (keyword arguments) and the regression target of the diffusion-style loss."""

    inputs: dict[str, torch.Tensor]
    target: torch.Tensor


def make_batch(
    preset: ModelPreset, batch_size: int, seed: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> Batch:
    """Random latents, timesteps, text embeddings and target, drawn from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed + 1)
    size = preset.latent_size
    latents = torch.randn(batch_size, preset.latent_channels, size, size, generator=generator)
    text = torch.randn(batch_size, preset.text_tokens, preset.text_dim, generator=generator)
    target = torch.randn(batch_size, preset.config["out_channels"], size, size, generator=generator)
    if preset.family == "unet":
        timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
        inputs = {"sample": latents, "timestep": timesteps, "encoder_hidden_states": text}
        if preset.has_time_ids:
            pooled = torch.randn(batch_size, preset.pooled_dim, generator=generator)
            pixels = float(size * 8)  # the VAE's 8x: original size, crop (0, 0), target size, as SDXL pipelines send
            time_ids = torch.tensor([pixels, pixels, 0.0, 0.0, pixels, pixels]).repeat(batch_size, 1)
            inputs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    else:
        timesteps = torch.rand(batch_size, generator=generator) * 1000
        pooled = torch.randn(batch_size, preset.pooled_dim, generator=generator)
        inputs = {
            "hidden_states": latents,
            "timestep": timesteps,
            "encoder_hidden_states": text,
            "pooled_projections": pooled,
        }
    return Batch(_to_device(inputs, device, dtype), target.to(device))


def _to_device(inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``inputs`` (nested dicts too) on ``device``, floating-point tensors in ``dtype``."""
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, dict):
            moved[key] = _to_device(value, device, dtype)
        else:
            moved[key] = value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return moved


def model_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's prediction (``.sample``) for keyword ``inputs``."""
    return model(**inputs, return_dict=False)[0]


def diffusion_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """MSE between the model's prediction and the batch target (the usual noise-prediction loss)."""
    return F.mse_loss(model_output(model, batch.inputs).float(), batch.target.float())


def target_layers(model: nn.Module, target_suffixes: Sequence[str]) -> dict[str, nn.Module]:
    """Full names -> modules of the Linear / Conv2d layers whose name ends with one of ``target_suffixes``.

    Uses PEFT's list rule (exact name or ``.suffix``), so the names are the ones SaRA with the same targets adapts.
    """
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if any(name == suffix or name.endswith("." + suffix) for suffix in target_suffixes):
            layers[name] = module
    return layers
