"""Tiny configs of diffusers' denoisers, transcribed from diffusers' own model tests.

Each entry is the ``init_dict`` (``get_init_dict`` / ``prepare_init_args_and_inputs_for_common``) and the dummy inputs
(``get_dummy_inputs``, at batch size 1 where the test takes a batch size) of the test file it names, in
huggingface/diffusers (tests/models/...; read at commit 58eb52c0, qwenimage21 at 12287d90). The installed diffusers
is 0.42.1. Configs are data: a value here differs from the test file only where a comment says so.

Denoiser classes of the installed diffusers that are not here, and why:
- ``Flux3Transformer2DModel``: diffusers' tests have no tiny config for it (no test file).
- ``CosmosTransformer3DModel``: its tiny config (``concat_padding_mask``) needs torchvision, not installed here.
- ``PRXTransformer2DModel``: its test config is 1792 wide (about 200M parameters), too slow for a CPU test.
- the other classes (audio, Kandinsky, the newest image / video models, ...) are not transcribed yet; their defaults
  come from the same rule, and benchmarks/model_zoo_table.py reports their coverage at the full-size default config
  (built on the meta device), as it does for Flux3 and Cosmos.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

TESTS = "tests/models/transformers/"
UNET_TESTS = "tests/models/unets/"


@dataclass(frozen=True)
class ZooModel:
    """One denoiser class: where its tiny config comes from, the config, and its inputs."""

    class_name: str
    family: str
    source: str
    init: dict[str, Any]
    inputs: Callable[[torch.Generator], dict[str, Any]]


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def _timesteps(generator: torch.Generator, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 1000, (batch,), generator=generator)


def _flux_inputs(g: torch.Generator) -> dict[str, Any]:  # test_models_transformer_flux.py
    return {
        "hidden_states": _randn(g, 1, 16, 4),
        "encoder_hidden_states": _randn(g, 1, 48, 32),
        "pooled_projections": _randn(g, 1, 32),
        "img_ids": _randn(g, 16, 3),
        "txt_ids": _randn(g, 48, 3),
        "timestep": torch.tensor([1.0]),
    }


def _flux2_inputs(g: torch.Generator) -> dict[str, Any]:
    height = width = 4
    sequence_length = 48
    image_ids = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1))
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(sequence_length))
    return {
        "hidden_states": _randn(g, 1, height * width, 4),
        "encoder_hidden_states": _randn(g, 1, sequence_length, 32),
        "img_ids": image_ids.unsqueeze(0),
        "txt_ids": text_ids.unsqueeze(0),
        "timestep": torch.tensor([1.0]),
        "guidance": torch.tensor([1.0]),
    }


def _krea2_inputs(g: torch.Generator) -> dict[str, Any]:
    grid, text_seq_len, in_channels, num_text_layers, text_hidden_dim = 2, 4, 16, 3, 16
    position_ids = torch.zeros(text_seq_len + grid * grid, 3)
    position_ids[text_seq_len:, 1] = torch.arange(grid).repeat_interleave(grid)
    position_ids[text_seq_len:, 2] = torch.arange(grid).repeat(grid)
    mask = torch.ones(1, text_seq_len, dtype=torch.bool)
    mask[:, -1] = False
    return {
        "hidden_states": _randn(g, 1, grid * grid, in_channels),
        "encoder_hidden_states": _randn(g, 1, text_seq_len, num_text_layers, text_hidden_dim),
        "timestep": torch.tensor([0.5]),
        "position_ids": position_ids,
        "encoder_attention_mask": mask,
    }


def _qwenimage_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 1, 16, 16),
        "encoder_hidden_states": _randn(g, 1, 8, 16),
        "encoder_hidden_states_mask": torch.ones(1, 8, dtype=torch.long),
        "timestep": torch.tensor([1.0]),
        "img_shapes": [(1, 4, 4)],
    }


def _qwenimage21_inputs(g: torch.Generator) -> dict[str, Any]:
    text_len, height, width = 4, 2, 2
    img_mask = torch.zeros(1, text_len + height * width // 4, dtype=torch.bool)
    img_mask[:, text_len:] = True
    return {
        "hidden_states": _randn(g, 1, height * width, 4),
        "encoder_hidden_states": _randn(g, 1, text_len, 8),
        "encoder_hidden_states_mask": torch.ones(1, text_len, dtype=torch.long),
        "timestep": torch.tensor([1.0]),
        "img_shapes": [[(1, height, width)]],
        "img_mask": img_mask,
    }


def _zimage_inputs(g: torch.Generator) -> dict[str, Any]:
    return {"x": [_randn(g, 16, 1, 16, 16)], "cap_feats": [_randn(g, 16, 16)], "t": torch.tensor([0.0])}


def _wan_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 1, 4, 2, 16, 16),
        "encoder_hidden_states": _randn(g, 1, 12, 16),
        "timestep": _timesteps(g),
    }


def _wan_vace_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 1, 16, 2, 16, 16),
        "encoder_hidden_states": _randn(g, 1, 12, 32),
        "control_hidden_states": _randn(g, 1, 48, 2, 16, 16),
        "timestep": _timesteps(g),
    }


def _ltx_inputs(g: torch.Generator) -> dict[str, Any]:  # batch 2 in the test
    return {
        "hidden_states": _randn(g, 1, 2 * 16 * 16, 4),
        "encoder_hidden_states": _randn(g, 1, 16, 16),
        "timestep": _timesteps(g),
        "encoder_attention_mask": torch.ones(1, 16, dtype=torch.bool),
        "num_frames": 2,
        "height": 16,
        "width": 16,
    }


def _ltx2_inputs(g: torch.Generator) -> dict[str, Any]:  # batch 2 in the test
    return {
        "hidden_states": _randn(g, 1, 2 * 16 * 16, 4),
        "audio_hidden_states": _randn(g, 1, 9, 4),
        "encoder_hidden_states": _randn(g, 1, 16, 16),
        "audio_encoder_hidden_states": _randn(g, 1, 16, 16),
        "timestep": _randn(g, 1).abs() * 1000,
        "encoder_attention_mask": torch.ones(1, 16, dtype=torch.bool),
        "num_frames": 2,
        "height": 16,
        "width": 16,
        "audio_num_frames": 9,
        "fps": 25.0,
    }


def _hunyuan_video_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 1, 4, 1, 16, 16),
        "timestep": _timesteps(g).float(),
        "encoder_hidden_states": _randn(g, 1, 12, 16),
        "pooled_projections": _randn(g, 1, 8),
        "encoder_attention_mask": torch.ones(1, 12),
        "guidance": _timesteps(g).float(),
    }


def _hunyuan_video15_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 1, 4, 1, 8, 8),
        "timestep": torch.tensor([1.0]),
        "encoder_hidden_states": _randn(g, 1, 6, 16),
        "encoder_hidden_states_2": _randn(g, 1, 4, 8),
        "encoder_attention_mask": torch.ones(1, 6),
        "encoder_attention_mask_2": torch.ones(1, 4),
        "image_embeds": torch.zeros(1, 3, 12),
    }


def _cogvideox_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 1, 1, 4, 8, 8),
        "encoder_hidden_states": _randn(g, 1, 8, 8),
        "timestep": _timesteps(g),
    }


def _cogview4_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 1, 4, 8, 8),
        "encoder_hidden_states": _randn(g, 1, 8, 8),
        "timestep": _timesteps(g),
        "original_size": torch.tensor([[64, 64]]),
        "target_size": torch.tensor([[64, 64]]),
        "crop_coords": torch.tensor([[0, 0]]),
    }


def _sana_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 1, 4, 32, 32),
        "encoder_hidden_states": _randn(g, 1, 8, 8),
        "timestep": _timesteps(g),
    }


def _hidream_inputs(g: torch.Generator) -> dict[str, Any]:  # the llama states' second axis is the number of layers
    return {
        "hidden_states": _randn(g, 1, 4, 32, 32),
        "encoder_hidden_states_t5": _randn(g, 1, 8, 8),
        "encoder_hidden_states_llama3": _randn(g, 2, 1, 8, 4),
        "pooled_embeds": _randn(g, 1, 8),
        "timesteps": _timesteps(g),
    }


def _chroma_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 1, 16, 4),
        "encoder_hidden_states": _randn(g, 1, 48, 32),
        "img_ids": _randn(g, 16, 3),
        "txt_ids": _randn(g, 48, 3),
        "timestep": torch.tensor([1.0]),
    }


def _lumina2_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 1, 4, 16, 16),
        "encoder_hidden_states": _randn(g, 1, 16, 32),
        "timestep": torch.rand(1, generator=g),
        "encoder_attention_mask": torch.ones(1, 16, dtype=torch.bool),
    }


def _auraflow_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 1, 4, 32, 32),
        "encoder_hidden_states": _randn(g, 1, 256, 32),
        "timestep": _timesteps(g),
    }


def _sd3_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 1, 4, 32, 32),
        "encoder_hidden_states": _randn(g, 1, 154, 32),
        "pooled_projections": _randn(g, 1, 64),
        "timestep": _timesteps(g),
    }


def _dit_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 1, 4, 8, 8),
        "timestep": _timesteps(g),
        "class_labels": torch.randint(0, 4, (1,), generator=g),
    }


def _pixart_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 1, 4, 8, 8),
        "timestep": _timesteps(g),
        "encoder_hidden_states": _randn(g, 1, 8, 8),
        "added_cond_kwargs": {"aspect_ratio": None, "resolution": None},
    }


def _unet2d_condition_inputs(g: torch.Generator) -> dict[str, Any]:  # batch 4 in the test
    return {
        "sample": _randn(g, 1, 4, 16, 16),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": _randn(g, 1, 4, 8),
    }


def _unet2d_inputs(g: torch.Generator) -> dict[str, Any]:  # batch 4 in the test
    return {"sample": _randn(g, 1, 3, 32, 32), "timestep": torch.tensor([10])}


def _unet_motion_inputs(g: torch.Generator) -> dict[str, Any]:  # batch 4 in the test; 4 frames
    return {
        "sample": _randn(g, 1, 4, 4, 16, 16),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": _randn(g, 4, 4, 16),
    }


def _video_inputs(channels: int, frames: int, size: int, text_dim: int, text_len: int):
    """hidden_states (B, C, F, H, W), encoder_hidden_states and an integer timestep, as most video tests build them."""

    def make(g: torch.Generator) -> dict[str, Any]:
        return {
            "hidden_states": _randn(g, 1, channels, frames, size, size),
            "encoder_hidden_states": _randn(g, 1, text_len, text_dim),
            "timestep": _timesteps(g),
        }

    return make


def _mochi_inputs(g: torch.Generator) -> dict[str, Any]:
    return {**_video_inputs(4, 2, 16, 16, 16)(g), "encoder_attention_mask": torch.ones(1, 16, dtype=torch.bool)}


def _latte_inputs(g: torch.Generator) -> dict[str, Any]:
    return {**_video_inputs(4, 1, 8, 8, 8)(g), "enable_temporal_attentions": True}


def _chronoedit_inputs(g: torch.Generator) -> dict[str, Any]:
    return {**_video_inputs(16, 2, 8, 32, 12)(g), "encoder_hidden_states_image": None}


def _easyanimate_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        **_video_inputs(4, 2, 16, 16, 16)(g),
        "timestep_cond": None,
        "encoder_hidden_states_t5": None,
        "inpaint_latents": None,
        "control_latents": None,
    }


def _cogview3plus_inputs(g: torch.Generator) -> dict[str, Any]:
    return {**_cogview4_inputs(g)}


def _longcat_image_inputs(g: torch.Generator) -> dict[str, Any]:
    return {**_chroma_inputs(g), "guidance": torch.tensor([3.5])}


def _hunyuan_dit_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 1, 4, 8, 8),
        "encoder_hidden_states": _randn(g, 1, 4, 8),
        "text_embedding_mask": torch.ones(1, 4),
        "encoder_hidden_states_t5": _randn(g, 1, 4, 8),
        "text_embedding_mask_t5": torch.ones(1, 4),
        "timestep": _timesteps(g).float(),
        "image_meta_size": torch.tensor([[1024.0, 1024.0, 16.0, 16.0, 0.0, 0.0]]),
        "style": torch.zeros(1, dtype=torch.long),
        "image_rotary_emb": [torch.ones(1, 8), torch.zeros(1, 8)],
    }


def _lumina_next_inputs(g: torch.Generator) -> dict[str, Any]:
    return {
        "hidden_states": _randn(g, 1, 4, 16, 16),
        "encoder_hidden_states": _randn(g, 1, 16, 32),
        "timestep": torch.rand(1, generator=g),
        "encoder_mask": _randn(g, 1, 16),
        "image_rotary_emb": _randn(g, 384, 384, 4),
        "cross_attention_kwargs": {},
    }


def _omnigen_inputs(g: torch.Generator) -> dict[str, Any]:
    sequence_length, height, width = 24, 8, 8
    attention_length = sequence_length + 1 + height * width // 2 // 2
    return {
        "hidden_states": _randn(g, 1, 4, height, width),
        "timestep": torch.rand(1, generator=g),
        "input_ids": torch.randint(0, 10, (1, sequence_length), generator=g),
        "input_img_latents": [_randn(g, 1, 4, height, width)],
        "input_image_sizes": {0: [[0, height * width // 2 // 2]]},
        "attention_mask": torch.ones(1, attention_length, attention_length),
        "position_ids": torch.arange(attention_length).unsqueeze(0),
    }


def _unet3d_inputs(g: torch.Generator) -> dict[str, Any]:  # batch 4 in the test; 4 frames
    return {
        "sample": _randn(g, 1, 4, 4, 16, 16),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": _randn(g, 1, 4, 8),
    }


def _unet_spatiotemporal_inputs(g: torch.Generator) -> dict[str, Any]:  # batch 2 in the test; 2 frames
    return {
        "sample": _randn(g, 1, 2, 4, 32, 32),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": _randn(g, 1, 1, 32),
        "added_time_ids": torch.tensor([[6, 127, 0.02]]),
    }


ZOO: list[ZooModel] = [
    ZooModel(
        "UNet2DConditionModel",
        "Stable Diffusion 1.x / 2.x / XL (UNet)",
        UNET_TESTS + "test_models_unet_2d_condition.py",
        {
            "block_out_channels": (4, 8),
            "norm_num_groups": 4,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 8,
            "attention_head_dim": 2,
            "out_channels": 4,
            "in_channels": 4,
            "layers_per_block": 1,
            "sample_size": 16,
        },
        _unet2d_condition_inputs,
    ),
    ZooModel(
        "UNet2DModel",
        "DDPM / unconditional UNet",
        UNET_TESTS + "test_models_unet_2d.py",
        {
            "block_out_channels": (4, 8),
            "norm_num_groups": 2,
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
            "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": 3,
            "out_channels": 3,
            "in_channels": 3,
            "layers_per_block": 2,
            "sample_size": 32,
        },
        _unet2d_inputs,
    ),
    ZooModel(
        "UNetMotionModel",
        "AnimateDiff (UNet + motion modules)",
        UNET_TESTS + "test_models_unet_motion.py",
        {
            "block_out_channels": (16, 32),
            "norm_num_groups": 16,
            "down_block_types": ("CrossAttnDownBlockMotion", "DownBlockMotion"),
            "up_block_types": ("UpBlockMotion", "CrossAttnUpBlockMotion"),
            "cross_attention_dim": 16,
            "num_attention_heads": 2,
            "out_channels": 4,
            "in_channels": 4,
            "layers_per_block": 1,
            "sample_size": 16,
        },
        _unet_motion_inputs,
    ),
    ZooModel(
        "SD3Transformer2DModel",
        "Stable Diffusion 3 / 3.5",
        TESTS + "test_models_transformer_sd3.py",
        {
            "sample_size": 32,
            "patch_size": 1,
            "in_channels": 4,
            "num_layers": 4,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "caption_projection_dim": 32,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 64,
            "out_channels": 4,
            "pos_embed_max_size": 96,
            "dual_attention_layers": (),
            "qk_norm": None,
        },
        _sd3_inputs,
    ),
    ZooModel(
        "FluxTransformer2DModel",
        "FLUX.1",
        TESTS + "test_models_transformer_flux.py",
        {
            "patch_size": 1,
            "in_channels": 4,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "axes_dims_rope": [4, 4, 8],
        },
        _flux_inputs,
    ),
    ZooModel(
        "Flux2Transformer2DModel",
        "FLUX.2",
        TESTS + "test_models_transformer_flux2.py",
        {
            "patch_size": 1,
            "in_channels": 4,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "timestep_guidance_channels": 256,
            "axes_dims_rope": [4, 4, 4, 4],
        },
        _flux2_inputs,
    ),
    ZooModel(
        "Krea2Transformer2DModel",
        "Krea 2",
        TESTS + "test_models_transformer_krea2.py",
        {
            "in_channels": 16,
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 32,
            "timestep_embed_dim": 8,
            "text_hidden_dim": 16,
            "num_text_layers": 3,
            "text_num_attention_heads": 2,
            "text_num_key_value_heads": 1,
            "text_intermediate_size": 16,
            "num_layerwise_text_blocks": 1,
            "num_refiner_text_blocks": 1,
            "axes_dims_rope": (4, 2, 2),
            "rope_theta": 1000.0,
            "norm_eps": 1e-5,
        },
        _krea2_inputs,
    ),
    ZooModel(
        "QwenImageTransformer2DModel",
        "Qwen-Image",
        TESTS + "test_models_transformer_qwenimage.py",
        {
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 4,
            "joint_attention_dim": 16,
            "guidance_embeds": False,
            "axes_dims_rope": (8, 4, 4),
        },
        _qwenimage_inputs,
    ),
    ZooModel(
        "QwenImage21Transformer2DModel",
        "Qwen-Image 2.1",
        TESTS + "test_models_transformer_qwenimage21.py",
        {
            "patch_size": 1,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "context_in_dim": 8,
            "mlp_ratio": 2,
            "axes_dims_rope": (4, 6, 6),
        },
        _qwenimage21_inputs,
    ),
    ZooModel(
        "ZImageTransformer2DModel",
        "Z-Image",
        TESTS + "test_models_transformer_z_image.py",
        {
            "all_patch_size": (2,),
            "all_f_patch_size": (1,),
            "in_channels": 16,
            "dim": 16,
            "n_layers": 1,
            "n_refiner_layers": 1,
            "n_heads": 1,
            "n_kv_heads": 2,
            "qk_norm": True,
            "cap_feat_dim": 16,
            "rope_theta": 256.0,
            "t_scale": 1000.0,
            "axes_dims": [8, 4, 4],
            "axes_lens": [256, 32, 32],
        },
        _zimage_inputs,
    ),
    ZooModel(
        "WanTransformer3DModel",
        "Wan 2.1 / 2.2",
        TESTS + "test_models_transformer_wan.py",
        {
            "patch_size": (1, 2, 2),
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "in_channels": 4,
            "out_channels": 4,
            "text_dim": 16,
            "freq_dim": 256,
            "ffn_dim": 32,
            "num_layers": 2,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 32,
        },
        _wan_inputs,
    ),
    ZooModel(
        "WanVACETransformer3DModel",
        "Wan VACE",
        TESTS + "test_models_transformer_wan_vace.py",
        {
            "patch_size": (1, 2, 2),
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": 32,
            "freq_dim": 256,
            "ffn_dim": 32,
            "num_layers": 4,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 32,
            "vace_layers": [0, 2],
            "vace_in_channels": 48,
        },
        _wan_vace_inputs,
    ),
    ZooModel(
        "LTXVideoTransformer3DModel",
        "LTX-Video",
        TESTS + "test_models_transformer_ltx.py",
        {
            "in_channels": 4,
            "out_channels": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 16,
            "num_layers": 1,
            "qk_norm": "rms_norm_across_heads",
            "caption_channels": 16,
        },
        _ltx_inputs,
    ),
    ZooModel(
        "LTX2VideoTransformer3DModel",
        "LTX-2 (video + audio)",
        TESTS + "test_models_transformer_ltx2.py",
        {
            "in_channels": 4,
            "out_channels": 4,
            "patch_size": 1,
            "patch_size_t": 1,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 16,
            "audio_in_channels": 4,
            "audio_out_channels": 4,
            "audio_num_attention_heads": 2,
            "audio_attention_head_dim": 4,
            "audio_cross_attention_dim": 8,
            "num_layers": 2,
            "qk_norm": "rms_norm_across_heads",
            "caption_channels": 16,
            "rope_double_precision": False,
        },
        _ltx2_inputs,
    ),
    ZooModel(
        "HunyuanVideoTransformer3DModel",
        "HunyuanVideo",
        TESTS + "test_models_transformer_hunyuan_video.py",
        {
            "in_channels": 4,
            "out_channels": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 10,
            "num_layers": 1,
            "num_single_layers": 1,
            "num_refiner_layers": 1,
            "patch_size": 1,
            "patch_size_t": 1,
            "guidance_embeds": True,
            "text_embed_dim": 16,
            "pooled_projection_dim": 8,
            "rope_axes_dim": (2, 4, 4),
            "image_condition_type": None,
        },
        _hunyuan_video_inputs,
    ),
    ZooModel(
        "HunyuanVideo15Transformer3DModel",
        "HunyuanVideo 1.5",
        TESTS + "test_models_transformer_hunyuan_1_5.py",
        {
            "in_channels": 4,
            "out_channels": 4,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "num_layers": 2,
            "num_refiner_layers": 1,
            "mlp_ratio": 2.0,
            "patch_size": 1,
            "patch_size_t": 1,
            "text_embed_dim": 16,
            "text_embed_2_dim": 8,
            "image_embed_dim": 12,
            "rope_axes_dim": (2, 2, 4),
            "target_size": 16,
            "task_type": "t2v",
        },
        _hunyuan_video15_inputs,
    ),
    ZooModel(
        "CogVideoXTransformer3DModel",
        "CogVideoX",
        TESTS + "test_models_transformer_cogvideox.py",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "in_channels": 4,
            "out_channels": 4,
            "time_embed_dim": 2,
            "text_embed_dim": 8,
            "num_layers": 2,
            "sample_width": 8,
            "sample_height": 8,
            "sample_frames": 8,
            "patch_size": 2,
            "patch_size_t": None,
            "temporal_compression_ratio": 4,
            "max_text_seq_length": 8,
        },
        _cogvideox_inputs,
    ),
    ZooModel(
        "CogView4Transformer2DModel",
        "CogView4",
        TESTS + "test_models_transformer_cogview4.py",
        {
            "patch_size": 2,
            "in_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 4,
            "num_attention_heads": 4,
            "out_channels": 4,
            "text_embed_dim": 8,
            "time_embed_dim": 8,
            "condition_dim": 4,
        },
        _cogview4_inputs,
    ),
    ZooModel(
        "SanaTransformer2DModel",
        "Sana",
        TESTS + "test_models_transformer_sana.py",
        {
            "patch_size": 1,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 1,
            "attention_head_dim": 4,
            "num_attention_heads": 2,
            "num_cross_attention_heads": 2,
            "cross_attention_head_dim": 4,
            "cross_attention_dim": 8,
            "caption_channels": 8,
            "sample_size": 32,
        },
        _sana_inputs,
    ),
    ZooModel(
        "HiDreamImageTransformer2DModel",
        "HiDream-I1",
        TESTS + "test_models_transformer_hidream.py",
        {
            "patch_size": 2,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "caption_channels": [8, 4],
            "text_emb_dim": 8,
            "num_routed_experts": 2,
            "num_activated_experts": 2,
            "axes_dims_rope": (4, 2, 2),
            "max_resolution": (32, 32),
            "llama_layers": (0, 1),
            "force_inference_output": True,
        },
        _hidream_inputs,
    ),
    ZooModel(
        "ChromaTransformer2DModel",
        "Chroma",
        TESTS + "test_models_transformer_chroma.py",
        {
            "patch_size": 1,
            "in_channels": 4,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "axes_dims_rope": [4, 4, 8],
            "approximator_num_channels": 8,
            "approximator_hidden_dim": 16,
            "approximator_layers": 1,
        },
        _chroma_inputs,
    ),
    ZooModel(
        "Lumina2Transformer2DModel",
        "Lumina-Image 2.0",
        TESTS + "test_models_transformer_lumina2.py",
        {
            "sample_size": 16,
            "patch_size": 2,
            "in_channels": 4,
            "hidden_size": 24,
            "num_layers": 2,
            "num_refiner_layers": 1,
            "num_attention_heads": 3,
            "num_kv_heads": 1,
            "multiple_of": 2,
            "ffn_dim_multiplier": None,
            "norm_eps": 1e-5,
            "scaling_factor": 1.0,
            "axes_dim_rope": (4, 2, 2),
            "axes_lens": (128, 128, 128),
            "cap_feat_dim": 32,
        },
        _lumina2_inputs,
    ),
    ZooModel(
        "AuraFlowTransformer2DModel",
        "AuraFlow",
        TESTS + "test_models_transformer_aura_flow.py",
        {
            "sample_size": 32,
            "patch_size": 2,
            "in_channels": 4,
            "num_mmdit_layers": 1,
            "num_single_dit_layers": 1,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "caption_projection_dim": 32,
            "joint_attention_dim": 32,
            "out_channels": 4,
            "pos_embed_max_size": 256,
        },
        _auraflow_inputs,
    ),
    ZooModel(
        "DiTTransformer2DModel",
        "DiT (class-conditional)",
        TESTS + "test_models_dit_transformer2d.py",
        {
            "in_channels": 4,
            "out_channels": 8,
            "activation_fn": "gelu-approximate",
            "num_attention_heads": 2,
            "attention_head_dim": 4,
            "attention_bias": True,
            "num_layers": 1,
            "norm_type": "ada_norm_zero",
            "num_embeds_ada_norm": 8,
            "patch_size": 2,
            "sample_size": 8,
        },
        _dit_inputs,
    ),
    ZooModel(
        "PixArtTransformer2DModel",
        "PixArt-alpha / sigma",
        TESTS + "test_models_pixart_transformer2d.py",
        {
            "sample_size": 8,
            "num_layers": 1,
            "patch_size": 2,
            "attention_head_dim": 2,
            "num_attention_heads": 2,
            "in_channels": 4,
            "cross_attention_dim": 8,
            "out_channels": 8,
            "attention_bias": True,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 8,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "use_additional_conditions": False,
            "caption_channels": None,
        },
        _pixart_inputs,
    ),
]

ZOO += [
    ZooModel(
        "UNet3DConditionModel",
        "ModelScope text-to-video (UNet3D)",
        UNET_TESTS + "test_models_unet_3d_condition.py",
        {
            "block_out_channels": (4, 8),
            "norm_num_groups": 4,
            "down_block_types": ("CrossAttnDownBlock3D", "DownBlock3D"),
            "up_block_types": ("UpBlock3D", "CrossAttnUpBlock3D"),
            "cross_attention_dim": 8,
            "attention_head_dim": 2,
            "out_channels": 4,
            "in_channels": 4,
            "layers_per_block": 1,
            "sample_size": 16,
        },
        _unet3d_inputs,
    ),
    ZooModel(
        "UNetSpatioTemporalConditionModel",
        "Stable Video Diffusion",
        UNET_TESTS + "test_models_unet_spatiotemporal.py",
        {
            "block_out_channels": (32, 64),
            "down_block_types": ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            "up_block_types": ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            "cross_attention_dim": 32,
            "num_attention_heads": 8,
            "out_channels": 4,
            "in_channels": 4,
            "layers_per_block": 2,
            "sample_size": 32,
            "projection_class_embeddings_input_dim": 32 * 3,
            "addition_time_embed_dim": 32,
        },
        _unet_spatiotemporal_inputs,
    ),
    ZooModel(
        "MochiTransformer3DModel",
        "Mochi 1",
        TESTS + "test_models_transformer_mochi.py",
        {
            "patch_size": 2,
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "num_layers": 2,
            "pooled_projection_dim": 16,
            "in_channels": 4,
            "out_channels": None,
            "qk_norm": "rms_norm",
            "text_embed_dim": 16,
            "time_embed_dim": 4,
            "activation_fn": "swiglu",
            "max_sequence_length": 16,
        },
        _mochi_inputs,
    ),
    ZooModel(
        "AllegroTransformer3DModel",
        "Allegro",
        TESTS + "test_models_transformer_allegro.py",
        {
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 1,
            "cross_attention_dim": 16,
            "sample_width": 8,
            "sample_height": 8,
            "sample_frames": 8,
            "caption_channels": 8,
        },
        _video_inputs(4, 2, 8, 8, 16),
    ),
    ZooModel(
        "LatteTransformer3DModel",
        "Latte",
        TESTS + "test_models_transformer_latte.py",
        {
            "sample_size": 8,
            "num_layers": 1,
            "patch_size": 2,
            "attention_head_dim": 4,
            "num_attention_heads": 2,
            "caption_channels": 8,
            "in_channels": 4,
            "cross_attention_dim": 8,
            "out_channels": 8,
            "attention_bias": True,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 1000,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
        },
        _latte_inputs,
    ),
    ZooModel(
        "SkyReelsV2Transformer3DModel",
        "SkyReels V2",
        TESTS + "test_models_transformer_skyreels_v2.py",
        {
            "patch_size": (1, 2, 2),
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "in_channels": 4,
            "out_channels": 4,
            "text_dim": 16,
            "freq_dim": 256,
            "ffn_dim": 32,
            "num_layers": 2,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 32,
        },
        _video_inputs(4, 2, 16, 16, 12),
    ),
    ZooModel(
        "ChronoEditTransformer3DModel",
        "ChronoEdit",
        TESTS + "test_models_transformer_chronoedit.py",
        {
            "patch_size": (1, 2, 2),
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": 32,
            "freq_dim": 16,
            "ffn_dim": 32,
            "num_layers": 2,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": 1e-06,
            "image_dim": None,
            "added_kv_proj_dim": None,
            "rope_max_seq_len": 64,
            "pos_embed_seq_len": None,
            "rope_temporal_skip_len": 8,
        },
        _chronoedit_inputs,
    ),
    ZooModel(
        "SanaVideoTransformer3DModel",
        "Sana Video",
        TESTS + "test_models_transformer_sana_video.py",
        {
            "in_channels": 16,
            "out_channels": 16,
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "num_layers": 2,
            "num_cross_attention_heads": 2,
            "cross_attention_head_dim": 12,
            "cross_attention_dim": 24,
            "caption_channels": 16,
            "mlp_ratio": 2.5,
            "dropout": 0.0,
            "attention_bias": False,
            "sample_size": 8,
            "patch_size": (1, 2, 2),
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 32,
        },
        _video_inputs(16, 2, 16, 16, 12),
    ),
    ZooModel(
        "EasyAnimateTransformer3DModel",
        "EasyAnimate",
        TESTS + "test_models_transformer_easyanimate.py",
        {
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "in_channels": 4,
            "mmdit_layers": 2,
            "num_layers": 2,
            "out_channels": 4,
            "patch_size": 2,
            "sample_height": 60,
            "sample_width": 90,
            "text_embed_dim": 16,
            "time_embed_dim": 8,
            "time_position_encoding_type": "3d_rope",
            "timestep_activation_fn": "silu",
        },
        _easyanimate_inputs,
    ),
    ZooModel(
        "CogView3PlusTransformer2DModel",
        "CogView3-Plus",
        TESTS + "test_models_transformer_cogview3plus.py",
        {
            "patch_size": 2,
            "in_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 4,
            "num_attention_heads": 2,
            "out_channels": 4,
            "text_embed_dim": 8,
            "time_embed_dim": 8,
            "condition_dim": 2,
            "pos_embed_max_size": 8,
            "sample_size": 8,
        },
        _cogview3plus_inputs,
    ),
    ZooModel(
        "BriaTransformer2DModel",
        "Bria",
        TESTS + "test_models_transformer_bria.py",
        {
            "patch_size": 1,
            "in_channels": 4,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": None,
            "axes_dims_rope": [0, 4, 4],
        },
        _chroma_inputs,
    ),
    ZooModel(
        "LongCatImageTransformer2DModel",
        "LongCat-Image",
        TESTS + "test_models_transformer_longcat_image.py",
        {
            "patch_size": 1,
            "in_channels": 4,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "axes_dims_rope": [4, 4, 8],
        },
        _longcat_image_inputs,
    ),
    ZooModel(
        "OvisImageTransformer2DModel",
        "Ovis-Image",
        TESTS + "test_models_transformer_ovis_image.py",
        {
            "patch_size": 1,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "axes_dims_rope": (4, 4, 8),
        },
        _chroma_inputs,
    ),
    ZooModel(
        "HunyuanDiT2DModel",
        "Hunyuan-DiT",
        TESTS + "test_models_transformer_hunyuan_dit.py",
        {
            "sample_size": 8,
            "patch_size": 2,
            "in_channels": 4,
            "num_layers": 1,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "cross_attention_dim": 8,
            "cross_attention_dim_t5": 8,
            "pooled_projection_dim": 4,
            "hidden_size": 16,
            "text_len": 4,
            "text_len_t5": 4,
            "activation_fn": "gelu-approximate",
        },
        _hunyuan_dit_inputs,
    ),
    ZooModel(
        "LuminaNextDiT2DModel",
        "Lumina-Next",
        TESTS + "test_models_transformer_lumina.py",
        {
            "sample_size": 16,
            "patch_size": 2,
            "in_channels": 4,
            "hidden_size": 24,
            "num_layers": 2,
            "num_attention_heads": 3,
            "num_kv_heads": 1,
            "multiple_of": 16,
            "ffn_dim_multiplier": None,
            "norm_eps": 1e-5,
            "learn_sigma": False,
            "qk_norm": True,
            "cross_attention_dim": 32,
            "scaling_factor": 1.0,
        },
        _lumina_next_inputs,
    ),
    ZooModel(
        "OmniGenTransformer2DModel",
        "OmniGen",
        TESTS + "test_models_transformer_omnigen.py",
        {
            "hidden_size": 16,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "intermediate_size": 32,
            "num_layers": 20,
            "pad_token_id": 0,
            "vocab_size": 1000,
            "in_channels": 4,
            "time_step_dim": 4,
            "rope_scaling": {"long_factor": list(range(1, 3)), "short_factor": list(range(1, 3))},
        },
        _omnigen_inputs,
    ),
]


def build(entry: ZooModel, seed: int = 0) -> torch.nn.Module:
    """The entry's model, seeded, in eval mode (diffusers is imported here, not at module import)."""
    import diffusers

    torch.manual_seed(seed)
    return getattr(diffusers, entry.class_name)(**entry.init).eval()


def inputs(entry: ZooModel, seed: int = 1) -> dict[str, Any]:
    """The entry's dummy inputs, seeded."""
    return entry.inputs(torch.Generator().manual_seed(seed))


def output_tensor(output: Any) -> torch.Tensor:
    """The denoiser's prediction, whatever it returns (a ``sample`` output, a tuple, a list of tensors)."""
    if hasattr(output, "sample"):
        output = output.sample
    if isinstance(output, (tuple, list)):
        output = output[0]
    if isinstance(output, (tuple, list)):  # Z-Image returns a list of per-sample tensors
        output = torch.stack(list(output))
    return output


__all__ = ["ZOO", "ZooModel", "build", "inputs", "output_tensor"]
