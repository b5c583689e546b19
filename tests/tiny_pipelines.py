"""Tiny diffusers pipelines built from configs, for tests that must run offline on CPU in seconds.

Nothing here downloads: the CLIP tokenizer is a byte-level BPE with no merges written to disk by hand, the models are
randomly initialised from small configs (seeded), and each pipeline is saved with ``save_pretrained`` so tests load it
back through ``from_pretrained`` exactly as a user would load a Hub model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from peft_sara.presets import TINY_UNET

PROMPT = "a red cat"
TOKENIZER_MAX_LENGTH = 16
HEIGHT = WIDTH = 32
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=4,
    sample_size=HEIGHT,
)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table (what CLIP's byte-level BPE tokenizes into)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for _, code in sorted(zip(printable, codes))]


def write_clip_tokenizer(directory: Path) -> Path:
    """Write a minimal CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json) and return its folder.

    The vocabulary holds the special tokens and every byte character with and without CLIP's end-of-word marker, so
    any text tokenizes (one token per byte) and every id stays below the tiny text encoders' ``vocab_size``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _bytes_to_unicode():
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": TOKENIZER_MAX_LENGTH})
    )
    return directory


def clip_tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(directory)))


def _clip_text_config(**overrides):
    from transformers import CLIPTextConfig

    kwargs = dict(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=600,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    kwargs.update(overrides)
    return CLIPTextConfig(**kwargs)


def build_sd_pipeline(directory: Path) -> Path:
    """Save a tiny StableDiffusionPipeline (UNet (32, 64), CLIP text encoder, AutoencoderKL, DDIM) to ``directory``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**TINY_UNET, "sample_size": HEIGHT // 2})
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    text_encoder = CLIPTextModel(_clip_text_config())
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(directory / "_tokenizer"),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory / "pipeline")
    return directory / "pipeline"


def build_sd3_pipeline(directory: Path) -> Path:
    """Save a tiny StableDiffusion3Pipeline (one-layer SD3 transformer, two CLIP encoders, no T5) to ``directory``."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=HEIGHT // 2,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
    )
    vae = AutoencoderKL(
        **TINY_VAE_CONFIG,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(projection_dim=32))
    tokenizer = clip_tokenizer(directory / "_tokenizer")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(directory / "pipeline")
    return directory / "pipeline"


def build_sdxl_pipeline(directory: Path) -> Path:
    """Save a tiny StableDiffusionXLPipeline (text-time UNet (32, 64), CLIP + CLIP-with-projection, AutoencoderKL,
    Euler) to ``directory``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **{**TINY_UNET, "sample_size": HEIGHT // 2, "cross_attention_dim": 64},  # the encoders' states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six size/crop ids + the pooled projection
    )
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    text_encoder = CLIPTextModel(_clip_text_config())
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(projection_dim=32))
    tokenizer = clip_tokenizer(directory / "_tokenizer")
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(directory / "pipeline")
    return directory / "pipeline"


def t5_tokenizer(directory: Path):
    """A T5 tokenizer (Unigram, one piece per printable ASCII character) small enough for the tiny T5 encoder."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(code), -1.0) for code in range(32, 127)]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=TOKENIZER_MAX_LENGTH)
    tokenizer.save_pretrained(directory)
    return T5TokenizerFast.from_pretrained(directory)


def build_flux_pipeline(directory: Path) -> Path:
    """Save a tiny FluxPipeline (one double and one single block, guidance embedding, CLIP + tiny T5, a 4-channel VAE
    whose latents pack into 16 channels) to ``directory``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    vae = AutoencoderKL(
        **TINY_VAE_CONFIG,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=128, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, pad_token_id=0, eos_token_id=1
        )
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=CLIPTextModel(_clip_text_config()),
        tokenizer=clip_tokenizer(directory / "_tokenizer"),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer(directory / "_t5_tokenizer"),
        transformer=transformer,
    )
    pipe.save_pretrained(directory / "pipeline")
    return directory / "pipeline"


def build_motion_adapter(directory: Path) -> Path:
    """Save a tiny AnimateDiff ``MotionAdapter`` matching the tiny SD UNet's blocks (32, 64) to ``directory``."""
    from diffusers import MotionAdapter

    torch.manual_seed(0)
    adapter = MotionAdapter(
        block_out_channels=TINY_UNET["block_out_channels"],
        motion_layers_per_block=TINY_UNET["layers_per_block"],
        motion_num_attention_heads=2,
        motion_norm_num_groups=TINY_UNET["norm_num_groups"],
        motion_max_seq_length=32,
        use_motion_mid_block=False,
    )
    adapter.save_pretrained(directory / "motion_adapter")
    return directory / "motion_adapter"


def add_random_sara_adapter(
    pipe, adapter_name: str = "style", components=("unet", "text_encoder"), seed: int = 0, fraction: float = 0.1
) -> None:
    """Give ``pipe`` a random (non-identity) SaRA adapter: ``add_adapter`` for diffusers models, and peft-sara's
    injection for transformers text encoders (transformers' own ``add_adapter`` refuses ``peft<0.22``)."""
    from diffusers import ModelMixin

    import peft_sara
    from peft_sara.pipelines import inject_sara_adapter

    torch.manual_seed(seed)
    for name in components:
        module = getattr(pipe, name)
        config = peft_sara.SaRAConfig(trainable_fraction=fraction, init_weights=False)
        if isinstance(module, ModelMixin):
            module.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_sara_adapter(module, config, adapter_name)


def generate(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    """Two denoising steps at 32x32 from a fixed generator, without classifier-free guidance, as a numpy array."""
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("guidance_scale", 1.0)
    if type(pipe).__name__.startswith(("StableDiffusion3", "Flux")):
        kwargs.setdefault("max_sequence_length", 8)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(PROMPT, height=HEIGHT, width=WIDTH, output_type="np", generator=generator, **kwargs).images
