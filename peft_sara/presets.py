"""Diffusers denoiser configs by name: the real SD1.5, SDXL, SD3 Medium and FLUX.1-dev shapes (written out, nothing is
downloaded), scaled-down versions of them for CPUs and tests, and :class:`ModelPreset`: a config with the shapes of
its inputs, built with seeded random weights by :func:`build_model`.

The benchmarks, the tests and the memory planner take their models from here. Importing this module does not import
diffusers: :func:`model_class` imports it on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# ------------------------------------------------------------------------------------------------ real models
SD15_UNET: dict[str, Any] = {
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

SDXL_TIME_IDS = 6  # original size, crop top-left, target size: each embedded in addition_time_embed_dim
SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],  # diffusers' name for the number of heads: 64 channels per head
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
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled text + 6 time ids x 256
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

SD3_MEDIUM_TRANSFORMER: dict[str, Any] = {
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

FLUX1_DEV_TRANSFORMER: dict[str, Any] = {
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

# ------------------------------------------------------------------------------------------------ scaled down
# A ~230M-parameter SD1.5-shaped UNet (channels / 2): the largest model the planner's validation runs on a CPU.
SD15_HALF_UNET: dict[str, Any] = {**SD15_UNET, "block_out_channels": [160, 320, 640, 640]}

# SD1.5's block types and cross-attention width, channels / 10, one layer per block, 256 px (32x32 latents).
SD15_SMALL_UNET: dict[str, Any] = {
    **SD15_UNET,
    "block_out_channels": [32, 64, 128, 128],
    "layers_per_block": 1,
    "sample_size": 32,
}

# SD3's MMDiT with 4 joint blocks of width 256 and CLIP-sized text: small enough for a CPU.
SD3_SMALL_TRANSFORMER: dict[str, Any] = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 4,
    "attention_head_dim": 64,
    "num_attention_heads": 4,
    "joint_attention_dim": 768,
    "caption_projection_dim": 256,
    "pooled_projection_dim": 768,
    "pos_embed_max_size": 32,
}

# A few-hundred-thousand-parameter SD1.x-shaped UNet: the tests' model (a forward takes milliseconds).
TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

# The tiny UNet with SDXL's layout: text_time conditioning, linear projections, a deeper last block.
TINY_SDXL_UNET: dict[str, Any] = {
    **TINY_UNET,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 16 + SDXL_TIME_IDS * 8,  # pooled text (16) + the time ids
}

# A two-block SD3 transformer for tests.
TINY_SD3_TRANSFORMER: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 16,
}


# ------------------------------------------------------------------------------------------------ presets
@dataclass(frozen=True)
class ModelPreset:
    """A denoiser to build with random weights: a diffusers class (by ``family``) and its ``config``, with the shapes
    of one sample's inputs."""

    name: str
    family: str  # "unet" (UNet2DConditionModel) or "dit" (SD3Transformer2DModel)
    config: dict[str, Any]
    latent_size: int
    text_tokens: int
    sara_fraction: float  # trainable_fraction given to SaRA (random-init weights: a global threshold means little)
    description: str = ""
    pooled_dim: int = 0  # DiT and SDXL: size of the pooled text embedding

    @property
    def has_time_ids(self) -> bool:
        """Whether the UNet takes SDXL's extra conditioning (``added_cond_kwargs``: pooled text and size ids)."""
        return self.config.get("addition_embed_type") == "text_time"

    @property
    def latent_channels(self) -> int:
        """Channels of the latent input."""
        return self.config["in_channels"]

    @property
    def text_dim(self) -> int:
        """Width of the text embeddings the model attends to."""
        return self.config["cross_attention_dim"] if self.family == "unet" else self.config["joint_attention_dim"]

    @property
    def input_key(self) -> str:
        """Name of the latent input keyword."""
        return "sample" if self.family == "unet" else "hidden_states"


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            "small",
            "unet",
            SD15_SMALL_UNET,
            latent_size=32,
            text_tokens=77,
            sara_fraction=0.07,
            description="SD1.5-shaped UNet (same block types, cross-attention dim 768), channels / 10, 1 layer per block",
        ),
        ModelPreset(
            "sd15",
            "unet",
            SD15_UNET,
            latent_size=64,
            text_tokens=77,
            sara_fraction=0.06,  # threshold 2e-3 selects ~6% of the real SD1.5 UNet (paper)
            description="Stable Diffusion 1.5 UNet shapes (860M parameters), random weights; meant for a GPU",
        ),
        ModelPreset(
            "sdxl",
            "unet",
            SDXL_UNET,
            latent_size=128,
            text_tokens=77,
            sara_fraction=0.06,  # as sd15: random weights, so a fraction stands in for the paper's threshold
            pooled_dim=1280,
            description="Stable Diffusion XL UNet config (2.57B parameters), random weights, 1024 px; meant for a GPU",
        ),
        ModelPreset(
            "dit",
            "dit",
            SD3_SMALL_TRANSFORMER,
            latent_size=32,
            text_tokens=77,
            sara_fraction=0.07,
            pooled_dim=768,
            description="SD3-shaped MMDiT (SD3Transformer2DModel), 4 joint blocks of width 256; small enough for CPU",
        ),
        ModelPreset(
            "tiny",
            "unet",
            TINY_UNET,
            latent_size=8,
            text_tokens=6,
            sara_fraction=0.07,
            description="toy UNet for the smoke test",
        ),
        ModelPreset(
            "tiny-sdxl",
            "unet",
            TINY_SDXL_UNET,
            latent_size=8,
            text_tokens=6,
            sara_fraction=0.07,
            pooled_dim=16,
            description="toy UNet with SDXL's layout (text_time conditioning, linear projections, deeper last block)",
        ),
        ModelPreset(
            "tiny-dit",
            "dit",
            {**TINY_SD3_TRANSFORMER, "pos_embed_max_size": 8},  # a smaller position table than the tests'
            latent_size=8,
            text_tokens=5,
            sara_fraction=0.07,
            pooled_dim=16,
            description="toy SD3 transformer for the smoke test",
        ),
    )
}


def class_conditional_unet2d_config(
    image_size: int, channels: int, num_classes: int, block_out_channels: tuple[int, ...], attention_head_dim: int
) -> dict[str, Any]:
    """A small class-conditional diffusers ``UNet2DModel`` config (the demo's model): one resnet per level, attention
    at the lowest resolution, a class embedding added to the time embedding."""
    levels = len(block_out_channels)
    return {
        "sample_size": image_size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": block_out_channels,
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        "up_block_types": ("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        "num_class_embeds": num_classes,
        "norm_num_groups": 8,
        "attention_head_dim": attention_head_dim,
    }


def model_class(family: str) -> type[nn.Module]:
    """The diffusers class of a preset family, imported on first use (a launcher calls it once before forking, so
    its children do not each pay the import)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    return UNet2DConditionModel if family == "unet" else SD3Transformer2DModel


def build_model(
    preset: ModelPreset, seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The preset's model with seeded random weights (drawn in float32 on ``device``), in ``dtype``, in train mode.

    Drawing the weights on the device keeps a 2.6B-parameter GPU model's set-up to seconds; a given seed gives the same
    weights on every run on the same device type (CPU and CUDA weights differ).
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(preset.family)(**preset.config)
    model = model.to(device) if dtype == torch.float32 else model.to(device=device, dtype=dtype)
    return model.train()
