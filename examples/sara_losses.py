"""How a batch becomes a loss in the SaRA scripts: VAE latents, the denoiser's text (and SDXL size / crop)
conditioning computed as each pipeline computes it, and the denoising losses (DDPM with Min-SNR and offset noise;
rectified flow for SD3 and Flux), as in diffusers' LoRA scripts."""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr
from sara_models import FLOW_MATCHING, pipeline_kind
from torch import nn

MAX_SEQUENCE_LENGTH = {"sd3": 77, "flux": 512}  # T5 prompt length by default


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixel_values: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """Scaled (and shifted, for SD3) VAE latents of ``[-1, 1]`` images, sampled from the latent distribution."""
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).to(weight_dtype)


# ----------------------------------------------------------------------------------------------------- conditioning
def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """CLIP token ids, padded / truncated to the tokenizer's length, as the pipelines tokenize."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_prompts(
    pipe: DiffusionPipeline,
    prompts: list[str],
    device: torch.device,
    text_encoders: dict[str, nn.Module] | None = None,
    max_sequence_length: int | None = None,
) -> dict[str, Any]:
    """The denoiser's text conditioning, as keyword arguments of its forward, computed as the pipeline computes it.

    ``text_encoders`` replaces pipeline components by name (the prepared, possibly DDP-wrapped, encoders that train);
    gradients flow only when one of them trains. SDXL's ``time_ids`` come from :func:`sdxl_time_ids`.
    """
    text_encoders = text_encoders or {}
    with torch.set_grad_enabled(bool(text_encoders) and torch.is_grad_enabled()):
        kind = pipeline_kind(pipe)
        max_sequence_length = max_sequence_length or MAX_SEQUENCE_LENGTH.get(kind)
        if kind == "flux":  # T5 sequence, pooled CLIP, and the text tokens' positions
            embeds, pooled, text_ids = pipe.encode_prompt(
                prompts, prompts, device=device, max_sequence_length=max_sequence_length
            )
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}
        if kind == "sd3":  # two CLIP encoders + T5 (zeros when T5 is absent)
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompts,
                None,
                None,
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=max_sequence_length,
            )
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if kind == "sd":
            text_encoder = text_encoders.get("text_encoder", pipe.text_encoder)
            return {"encoder_hidden_states": text_encoder(tokenize(pipe.tokenizer, prompts).to(device))[0]}
        # SDXL: both encoders' penultimate hidden states, concatenated; the pooled output of the second.
        hidden_states = []
        for name, tokenizer in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
            text_encoder = text_encoders.get(name, getattr(pipe, name))
            output = text_encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
            pooled = output[0]
        return {"encoder_hidden_states": torch.cat(hidden_states, dim=-1), "added_cond_kwargs": {"text_embeds": pooled}}


def sdxl_time_ids(batch: dict[str, Any], resolution: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's size and crop conditioning per example: original (h, w), crop top-left (y, x), target (h, w)."""
    rows = [
        [*size, *crop, resolution, resolution] for size, crop in zip(batch["original_sizes"], batch["crop_top_lefts"])
    ]
    return torch.tensor(rows, device=device, dtype=dtype)


def image_conditioning(
    pipe: DiffusionPipeline,
    batch: dict[str, Any],
    prompts: list[str],
    args: argparse.Namespace,
    device: torch.device,
    text_encoders: dict[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """:func:`encode_prompts`, plus SDXL's time ids for the batch's images."""
    conditioning = encode_prompts(pipe, prompts, device, text_encoders, getattr(args, "max_sequence_length", None))
    if pipeline_kind(pipe) == "sdxl":
        dtype = conditioning["encoder_hidden_states"].dtype
        conditioning["added_cond_kwargs"]["time_ids"] = sdxl_time_ids(batch, args.resolution, device, dtype)
    return conditioning


# ---------------------------------------------------------------------------------------------------------- losses
def ddpm_loss(
    denoiser: nn.Module,
    noise_scheduler: DDPMScheduler,
    latents: torch.Tensor,
    conditioning: dict[str, Any],
    args: argparse.Namespace,
) -> torch.Tensor:
    """Per-example denoising loss of DDPM models (any latent rank: images or videos): epsilon or v-prediction target,
    MSE, optional offset noise and Min-SNR weighting, as diffusers' LoRA scripts."""
    noise = torch.randn_like(latents)
    if args.noise_offset:
        offset_shape = (*latents.shape[:2], *[1] * (latents.ndim - 2))
        noise = noise + args.noise_offset * torch.randn(offset_shape, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
    ).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {prediction_type!r}.")
    model_pred = denoiser(noisy_latents, timesteps, **conditioning, return_dict=False)[0]
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    if args.snr_gamma is not None:
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=args.snr_gamma)
        loss = loss * (weights / snr if prediction_type == "epsilon" else weights / (snr + 1))
    return loss


def flow_matching_loss(
    pipe: DiffusionPipeline,
    denoiser: nn.Module,
    noise_scheduler: FlowMatchEulerDiscreteScheduler,
    latents: torch.Tensor,
    conditioning: dict[str, Any],
    args: argparse.Namespace,
) -> torch.Tensor:
    """Per-example rectified-flow loss of SD3 and Flux, as diffusers' ``train_dreambooth_lora_sd3.py`` /
    ``train_dreambooth_lora_flux.py`` (Flux: packed 2 x 2 latent patches, image / text positions, guidance)."""
    noise = torch.randn_like(latents)
    u = compute_density_for_timestep_sampling(
        args.weighting_scheme, latents.shape[0], logit_mean=0.0, logit_std=1.0, mode_scale=1.29
    )
    indices = (u * noise_scheduler.config.num_train_timesteps).long()
    timesteps = noise_scheduler.timesteps[indices].to(latents.device)
    # The training scheduler never runs set_timesteps, so sigmas[i] belongs to timesteps[i].
    sigmas = noise_scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
    noisy_latents = (1.0 - sigmas) * latents + sigmas * noise
    if pipeline_kind(pipe) == "flux":
        batch, channels, height, width = latents.shape
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), args.guidance_scale, device=latents.device, dtype=torch.float32)
        model_pred = denoiser(
            hidden_states=pipe._pack_latents(noisy_latents, batch, channels, height, width),
            timestep=timesteps / 1000,
            guidance=guidance,
            img_ids=pipe._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype),
            **conditioning,
            return_dict=False,
        )[0]
        scale = pipe.vae_scale_factor
        model_pred = pipe._unpack_latents(model_pred, height * scale, width * scale, scale)
        target = noise - latents
    else:
        model_pred = denoiser(hidden_states=noisy_latents, timestep=timesteps, **conditioning, return_dict=False)[0]
        if args.precondition_outputs:
            model_pred = model_pred * (-sigmas) + noisy_latents
            target = latents
        else:
            target = noise - latents
    weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)
    return (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(len(target), -1).mean(1)


def denoising_loss(
    pipe: DiffusionPipeline,
    denoiser: nn.Module,
    noise_scheduler: Any,
    latents: torch.Tensor,
    conditioning: dict[str, Any],
    args: argparse.Namespace,
) -> torch.Tensor:
    """The per-example training loss of the pipeline's kind of denoiser (flow matching for SD3 / Flux, else DDPM)."""
    if pipeline_kind(pipe) in FLOW_MATCHING:
        return flow_matching_loss(pipe, denoiser, noise_scheduler, latents, conditioning, args)
    return ddpm_loss(denoiser, noise_scheduler, latents, conditioning, args)
