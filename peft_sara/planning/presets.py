"""The models the planner knows by name: the diffusers configs of SD1.5, SDXL, SD3 and Flux.1-dev from
:mod:`peft_sara.presets` (nothing is downloaded), their input shapes, and SaRA's threshold -> trainable fraction table.

A model is a :class:`ModelSpec`: a diffusers class name, its ``config.json`` contents and the text conditioning the
training step feeds it. :func:`resolve_model` turns a preset name or a folder holding a diffusers ``config.json``
into one.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..presets import (
    FLUX1_DEV_TRANSFORMER,
    SD3_MEDIUM_TRANSFORMER,
    SD15_HALF_UNET,
    SD15_UNET,
    SDXL_UNET,
    TINY_UNET,
)


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


# A config decides how many blocks the planner builds and traces (the time grows with them; sizes cost nothing on fake
# tensors). The bounds are far above every real denoiser (SDXL: 180 block slots by the estimate below, FLUX.1-dev:
# 57 blocks, SD3.5 Large: 38) and keep any plan to minutes.
MAX_PLANNED_BLOCKS = 512
MAX_CONFIG_LIST = 64  # entries of any list, nested lists flattened (block types, channels per level)
MAX_CONFIG_INTEGER = 2**20  # any integer field (channels, dims, heads, sample size)
MAX_CONFIG_BYTES = 2**20  # config.json itself (real ones are about 2 KB)


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [item for element in value for item in _flatten(element)]
    return [value]


def _largest(value: Any) -> int:
    numbers = [item for item in _flatten(value) if isinstance(item, int) and not isinstance(item, bool)]
    return max(numbers, default=1)


def estimated_blocks(class_name: str, config: dict[str, Any]) -> int:
    """An upper estimate of the repeated blocks (resnets, transformer blocks) a denoiser config builds."""
    if class_name == "UNet2DConditionModel":
        levels = max(1, len(_flatten(config.get("block_out_channels", [1]))))
        per_level = _largest(config.get("layers_per_block", 2)) + 1
        return 2 * levels * per_level * max(1, _largest(config.get("transformer_layers_per_block", 1)))
    return _largest(config.get("num_layers", 1)) + _largest(config.get("num_single_layers", 0))


def check_planning_cost(class_name: str, config: dict[str, Any], source: str) -> None:
    """Raise ``ValueError`` naming the field if ``config`` would take the planner unboundedly long (see
    :data:`MAX_PLANNED_BLOCKS`): too many blocks, a list or an integer beyond any real model's."""
    for key, value in config.items():
        items = _flatten(value)
        if isinstance(value, (list, tuple)) and len(items) > MAX_CONFIG_LIST:
            raise ValueError(
                f"{source}: {key} has {len(items)} entries; the planner accepts at most {MAX_CONFIG_LIST}."
            )
        for item in items:
            if isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_CONFIG_INTEGER:
                raise ValueError(
                    f"{source}: {key} = {item} is beyond any real model's (at most {MAX_CONFIG_INTEGER:,} here)."
                )
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"{source}: {key} = {item} is not a finite number.")
    blocks = estimated_blocks(class_name, config)
    if blocks > MAX_PLANNED_BLOCKS:
        raise ValueError(
            f"{source}: this config builds about {blocks:,} blocks (num_layers / layers_per_block / "
            f"transformer_layers_per_block); the planner plans models of up to {MAX_PLANNED_BLOCKS}, far above any "
            "released denoiser."
        )


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
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is {path.stat().st_size:,} bytes: not a model config (at most {MAX_CONFIG_BYTES:,}).")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a JSON model config: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not a model config object.")
    class_name = config.get("_class_name")
    if class_name not in ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"):
        raise ValueError(
            f"{path}: the planner supports UNet2DConditionModel, SD3Transformer2DModel and FluxTransformer2DModel "
            f"configs, got _class_name={class_name!r}."
        )
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    check_planning_cost(class_name, config, str(path))
    if class_name == "UNet2DConditionModel":
        pooled_dim = 1280 if config.get("addition_embed_type") == "text_time" else 0
        return ModelSpec(path.parent.name, class_name, config, pooled_dim=pooled_dim)
    tokens = 512 if class_name == "FluxTransformer2DModel" else 77 + 256
    return ModelSpec(
        path.parent.name, class_name, config, text_tokens=tokens, pooled_dim=config["pooled_projection_dim"]
    )
