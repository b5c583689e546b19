"""The inputs of one training step of a denoiser: latents, timestep, text conditioning and the regression target.

Text encoders and the VAE are not part of the step (their outputs are assumed precomputed or the encoders offloaded),
as in most diffusers training scripts once embeddings are cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .presets import ModelSpec

SDXL_TIME_IDS = 6  # original size, crop top-left, target size


@dataclass
class TrainingBatch:
    """Keyword inputs of the denoiser and the target its prediction is regressed on."""

    inputs: dict[str, object]
    target: torch.Tensor


def latent_size(model: ModelSpec, resolution: int) -> int:
    """Latent height / width for images of ``resolution`` pixels (a multiple of the VAE factor and, for Flux, of 2)."""
    size = resolution // model.vae_scale
    multiple = 2 if model.class_name != "UNet2DConditionModel" else 1
    if size < 1 or resolution % model.vae_scale or size % multiple:
        raise ValueError(
            f"Resolution {resolution} px does not give a whole latent for {model.name}: use a multiple of "
            f"{model.vae_scale * multiple}."
        )
    return size


def pooled_size(model: ModelSpec) -> int:
    """Size of the pooled text embedding (SDXL: the projection input less the embedded size / crop ids)."""
    if model.class_name == "UNet2DConditionModel" and model.config.get("addition_embed_type") == "text_time":
        config = model.config
        return config["projection_class_embeddings_input_dim"] - SDXL_TIME_IDS * config["addition_time_embed_dim"]
    return model.pooled_dim


def training_batch(model: ModelSpec, resolution: int, batch_size: int, dtype: torch.dtype) -> TrainingBatch:
    """Random inputs of one training step, on the current default device (fake tensors under a ``FakeTensorMode``)."""
    config = model.config
    size = latent_size(model, resolution)
    text_dim = config.get("cross_attention_dim") or config["joint_attention_dim"]
    text = torch.randn(batch_size, model.text_tokens, text_dim, dtype=dtype)
    if model.class_name == "FluxTransformer2DModel":
        # packed 2x2 latent patches; positions as (frame, row, column) ids
        tokens, channels = (size // 2) ** 2, config["in_channels"]
        latents = torch.randn(batch_size, tokens, channels, dtype=dtype)
        rows = torch.arange(size // 2).repeat_interleave(size // 2)
        columns = torch.arange(size // 2).repeat(size // 2)
        image_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).to(dtype)
        inputs = {
            "hidden_states": latents,
            "encoder_hidden_states": text,
            "pooled_projections": torch.randn(batch_size, pooled_size(model), dtype=dtype),
            "timestep": torch.rand(batch_size, dtype=dtype),
            "img_ids": image_ids,
            "txt_ids": torch.zeros(model.text_tokens, 3, dtype=dtype),
        }
        if config.get("guidance_embeds"):
            inputs["guidance"] = torch.full((batch_size,), 3.5, dtype=dtype)
        return TrainingBatch(inputs, torch.randn(batch_size, tokens, channels, dtype=dtype))
    latents = torch.randn(batch_size, config["in_channels"], size, size, dtype=dtype)
    target = torch.randn(batch_size, config.get("out_channels", config["in_channels"]), size, size, dtype=dtype)
    if model.class_name == "SD3Transformer2DModel":
        inputs = {
            "hidden_states": latents,
            "encoder_hidden_states": text,
            "pooled_projections": torch.randn(batch_size, pooled_size(model), dtype=dtype),
            "timestep": torch.rand(batch_size, dtype=dtype) * 1000,
        }
        return TrainingBatch(inputs, target)
    inputs = {"sample": latents, "timestep": torch.randint(0, 1000, (batch_size,)), "encoder_hidden_states": text}
    if config.get("addition_embed_type") == "text_time":
        pixels = float(resolution)
        time_ids = torch.tensor([pixels, pixels, 0.0, 0.0, pixels, pixels], dtype=dtype).repeat(batch_size, 1)
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch_size, pooled_size(model), dtype=dtype),
            "time_ids": time_ids,
        }
    return TrainingBatch(inputs, target)
