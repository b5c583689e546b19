"""The models the planner knows by name: the diffusers configs of SD1.5, SDXL, SD3 and Flux.1-dev, written out here
(nothing is downloaded), their input shapes, and SaRA's threshold -> trainable fraction table.

A model is a :class:`ModelSpec`: a diffusers class name, its ``config.json`` contents and the text conditioning the
training step feeds it. :func:`resolve_model` turns a preset name or a folder holding a diffusers ``config.json``
into one.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """A diffusers denoiser to plan for, without its weights.

    ``class_name`` is the diffusers class (``UNet2DConditionModel``, ``SD3Transformer2DModel`` or
    ``FluxTransformer2DModel``), ``config`` its ``config.json``; ``text_tokens`` the length of the (precomputed) text
    embedding sequence of one sample; ``pooled_dim`` the size of the pooled text embedding (SDXL, SD3, Flux; 0 for
    none); ``vae_scale`` the VAE's downsampling factor (pixels per latent cell).
    """

    name: str
    class_name: str
    config: dict[str, Any]
    text_tokens: int = 77
    pooled_dim: int = 0
    vae_scale: int = 8
    description: str = ""
    default_resolution: int = field(default=512)


SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

SD3_MEDIUM_TRANSFORMER = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}

FLUX1_DEV_TRANSFORMER = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

# A ~230M-parameter SD1.5-shaped UNet (channels / 2): the largest model the validation runs for real on a CPU.
SD15_HALF_UNET = {**SD15_UNET, "block_out_channels": [160, 320, 640, 640], "attention_head_dim": 8}

# A few-thousand-parameter UNet for tests (real and fake runs take well under a second).
TINY_UNET = {
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 8,
}

PRESETS: dict[str, ModelSpec] = {
    "sd15": ModelSpec("sd15", "UNet2DConditionModel", SD15_UNET, description="Stable Diffusion 1.5 UNet (860M)"),
    "sdxl": ModelSpec(
        "sdxl",
        "UNet2DConditionModel",
        SDXL_UNET,
        pooled_dim=1280,
        description="Stable Diffusion XL base UNet (2.6B)",
        default_resolution=1024,
    ),
    "sd3": ModelSpec(
        "sd3",
        "SD3Transformer2DModel",
        SD3_MEDIUM_TRANSFORMER,
        text_tokens=77 + 256,  # CLIP tokens + the pipeline's default T5 max_sequence_length
        pooled_dim=2048,
        description="Stable Diffusion 3 Medium MMDiT (2.0B)",
        default_resolution=1024,
    ),
    "flux-dev": ModelSpec(
        "flux-dev",
        "FluxTransformer2DModel",
        FLUX1_DEV_TRANSFORMER,
        text_tokens=512,  # FLUX.1-dev's T5 max_sequence_length
        pooled_dim=768,
        description="FLUX.1-dev transformer (11.9B)",
        default_resolution=1024,
    ),
    "sd15-half": ModelSpec(
        "sd15-half", "UNet2DConditionModel", SD15_HALF_UNET, description="SD1.5-shaped UNet, channels / 2 (~230M)"
    ),
    "tiny": ModelSpec(
        "tiny",
        "UNet2DConditionModel",
        TINY_UNET,
        text_tokens=6,
        description="toy UNet for tests",
        default_resolution=64,
    ),
}

# SaRA's threshold -> fraction of the UNet's weights selected, measured by the paper on the pre-trained SD1.5 UNet
# (|w| < theta selects ~5M, ~20M and ~50M of its 860M parameters). Between points the fraction is interpolated
# linearly (through 0); beyond the last, extrapolated from it. A plan from a threshold on another model assumes the
# same weight-magnitude distribution near zero: pass --fraction where the real count is known.
THRESHOLD_FRACTIONS: tuple[tuple[float, float], ...] = (
    (0.0, 0.0),
    (2e-4, 5e6 / 860e6),
    (8e-4, 20e6 / 860e6),
    (2e-3, 50e6 / 860e6),
)


def fraction_for_threshold(threshold: float) -> float:
    """The trainable fraction a global ``|w| < threshold`` selects, from :data:`THRESHOLD_FRACTIONS` (see there)."""
    if threshold <= 0:
        raise ValueError(f"A SaRA threshold must be > 0, got {threshold}.")
    thresholds = [point[0] for point in THRESHOLD_FRACTIONS]
    position = min(bisect.bisect_left(thresholds, threshold), len(thresholds) - 1)
    (low_t, low_f), (high_t, high_f) = THRESHOLD_FRACTIONS[position - 1], THRESHOLD_FRACTIONS[position]
    return min(1.0, low_f + (high_f - low_f) * (threshold - low_t) / (high_t - low_t))


def resolve_model(preset_or_dir: str) -> ModelSpec:
    """A preset by name, or the model whose diffusers ``config.json`` is in the folder ``preset_or_dir`` (or is that
    file). The config's ``_class_name`` names the class; SDXL-style ``addition_embed_type="text_time"`` UNets get a
    1280-wide pooled embedding, transformers their ``pooled_projection_dim``."""
    if preset_or_dir in PRESETS:
        return PRESETS[preset_or_dir]
    path = Path(preset_or_dir)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"Unknown model {preset_or_dir!r}: pass a preset ({', '.join(PRESETS)}) or a folder holding a diffusers "
            "model's config.json."
        )
    config = json.loads(path.read_text())
    class_name = config.get("_class_name")
    if class_name not in ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"):
        raise ValueError(
            f"{path}: the planner supports UNet2DConditionModel, SD3Transformer2DModel and FluxTransformer2DModel "
            f"configs, got _class_name={class_name!r}."
        )
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    if class_name == "UNet2DConditionModel":
        pooled_dim = 1280 if config.get("addition_embed_type") == "text_time" else 0
        return ModelSpec(path.parent.name, class_name, config, pooled_dim=pooled_dim)
    tokens = 512 if class_name == "FluxTransformer2DModel" else 77 + 256
    return ModelSpec(
        path.parent.name, class_name, config, text_tokens=tokens, pooled_dim=config["pooled_projection_dim"]
    )
