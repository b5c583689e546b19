"""The models of a SaRA training run: the base pipeline and its VAE, the training noise scheduler, and SaRA adapters
on the trained components (the denoiser, and the CLIP text encoders with ``--train_text_encoder``)."""

from __future__ import annotations

import argparse
import inspect
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    ModelMixin,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
)
from torch import nn

from peft_sara import SaRAConfig
from peft_sara.export.sources import dtype_kwargs
from peft_sara.training import DEFAULT_ADAPTER_NAME, add_sara_adapter

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the CLIP encoders --train_text_encoder adapts (SD, SDXL)
FLOW_MATCHING = ("sd3", "flux")  # pipeline kinds trained with rectified flow


def load_vae(args: argparse.Namespace, weight_dtype: torch.dtype) -> AutoencoderKL:
    """The pipeline's VAE (or ``--pretrained_vae_model_name_or_path``'s), frozen, in float32 unless its config says it
    runs in half precision (``force_upcast: false``, e.g. sdxl-vae-fp16-fix): VAEs overflow in fp16, and cost little."""
    if args.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)
        if not vae.config.force_upcast:
            vae.to(dtype=weight_dtype)
    else:
        vae = AutoencoderKL.from_pretrained(
            args.pretrained_model_name_or_path,
            subfolder="vae",
            revision=args.revision,
            variant=args.variant,
            cache_dir=args.cache_dir,
        )
    return vae.requires_grad_(False)


def absent_components(args: argparse.Namespace) -> dict[str, None]:
    """Components the pipeline was saved without (e.g. SD3 without T5), which diffusers wants passed as None."""
    config = DiffusionPipeline.load_config(
        args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir
    )
    return {name: None for name, value in config.items() if value == [None, None]}


def load_pipeline(
    args: argparse.Namespace,
    torch_dtype: torch.dtype,
    pipeline_class: type[DiffusionPipeline] = DiffusionPipeline,
    **components: Any,
) -> DiffusionPipeline:
    """The base pipeline in ``torch_dtype`` (components given as keywords, e.g. ``vae=``, are used as they are), its
    safety checker off: validation images are for the trainer's eyes only. ``pipeline_class`` may differ from the
    saved one (e.g. ``AnimateDiffPipeline`` on an SD 1.5 folder)."""
    absent = absent_components(args)
    if pipeline_class is not DiffusionPipeline:  # only what this class takes
        absent = {name: None for name in absent if name in inspect.signature(pipeline_class.__init__).parameters}
    pipe = pipeline_class.from_pretrained(
        args.pretrained_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        **dtype_kwargs(pipeline_class, torch_dtype),
        **{**absent, **components},
    )
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quantize_base(args: argparse.Namespace, pipe: DiffusionPipeline, device: torch.device, dtype: torch.dtype) -> None:
    """``--base_quantization``: replace the denoiser's Linear layers by quantized ones, in place, before SaRA selects
    its entries (selection reads the dequantized weight the layer computes with). bitsandbytes layers are quantized one
    at a time on ``device``, so the full-precision denoiser never sits whole on the accelerator; ``dtype`` is their
    compute dtype. optimum-quanto quantizes and freezes the denoiser where it is."""
    kind = getattr(args, "base_quantization", "none")
    if kind == "none":
        return
    denoiser = getattr(pipe, denoiser_name_of(pipe))
    if kind.startswith("quanto"):
        from optimum import quanto

        quanto.quantize(denoiser, weights=quanto.qint8 if kind == "quanto-int8" else quanto.qint4)
        quanto.freeze(denoiser)
        return
    import bitsandbytes as bnb

    for parent in list(denoiser.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            weight = child.weight.data
            if kind == "bnb-4bit":
                layer = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, child.bias is not None, compute_dtype=dtype, quant_type="nf4"
                )
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            else:
                layer = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, child.bias is not None, has_fp16_weights=False
                )
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, layer.to(device))  # bitsandbytes quantizes on the move


def denoiser_name_of(pipe: DiffusionPipeline) -> str:
    """``"transformer"`` for DiT pipelines (SD3, Flux), else ``"unet"``."""
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


def pipeline_kind(pipe: DiffusionPipeline) -> str:
    """``"flux"`` (flow matching on packed latents, CLIP + T5, guidance embedding), ``"sd3"`` (flow matching, T5 + two
    CLIP), ``"sdxl"`` (two CLIP, size/crop conditioning) or ``"sd"`` (one CLIP: SD 1.x/2.x, AnimateDiff)."""
    if isinstance(pipe, FluxPipeline):
        return "flux"
    if isinstance(pipe, StableDiffusion3Pipeline):
        return "sd3"
    if isinstance(pipe, StableDiffusionXLPipeline):
        return "sdxl"
    return "sd"


def noise_scheduler_for(args: argparse.Namespace, pipe: DiffusionPipeline) -> DDPMScheduler:
    """The training scheduler: DDPM (with ``--prediction_type``) or, for SD3 and Flux, flow matching. Refuses DDPM-only
    flags for flow-matching models."""
    if pipeline_kind(pipe) in FLOW_MATCHING:
        ddpm_only = [flag for flag in ("snr_gamma", "noise_offset", "prediction_type") if getattr(args, flag)]
        if ddpm_only:
            raise ValueError(
                f"--{ddpm_only[0]} applies to DDPM models (SD 1.x/2.x, SDXL); {type(pipe).__name__} trains with flow "
                "matching: choose its loss weighting with --weighting_scheme instead."
            )
        return FlowMatchEulerDiscreteScheduler.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision, cache_dir=args.cache_dir
        )
    scheduler = DDPMScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision, cache_dir=args.cache_dir
    )
    if args.prediction_type is not None:
        scheduler.register_to_config(prediction_type=args.prediction_type)
    return scheduler


def sara_config(args: argparse.Namespace, target_modules: list[str] | str | None = None) -> SaRAConfig:
    """The SaRA config of the flags; ``target_modules`` None means SaRA's defaults for the model."""
    return SaRAConfig(
        threshold=args.threshold,
        trainable_fraction=args.trainable_fraction,
        target_modules=target_modules,
        lambda_rank=args.lambda_rank,
        rank_layers_per_step=args.rank_layers_per_step,
        rank_min_dim=args.rank_min_dim,
        progressive_fraction=args.progressive_fraction or None,
        progressive_step=args.progressive_step,
    )


def add_trainable_adapter(module: nn.Module, config: SaRAConfig, args: argparse.Namespace) -> None:
    """:func:`peft_sara.training.add_sara_adapter` (float32 values, gradient checkpointing if asked), and xformers
    attention in diffusers models under ``--enable_xformers_memory_efficient_attention``."""
    add_sara_adapter(module, config, DEFAULT_ADAPTER_NAME, gradient_checkpointing=args.gradient_checkpointing)
    if args.enable_xformers_memory_efficient_attention and isinstance(module, ModelMixin):
        module.enable_xformers_memory_efficient_attention()


def trained_modules(
    args: argparse.Namespace,
    pipe: DiffusionPipeline,
    denoiser_targets: list[str] | str | None = None,
) -> dict[str, nn.Module]:
    """Freeze the pipeline, add SaRA to its denoiser (targets: ``denoiser_targets``, else ``--target_modules``, else
    SaRA's defaults) and, with ``--train_text_encoder``, to its CLIP encoders; the adapted components by name, denoiser
    first."""
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            component.requires_grad_(False)
    if denoiser_targets is None and args.target_modules:
        denoiser_targets = args.target_modules.split(",")
    name = denoiser_name_of(pipe)
    modules = {name: getattr(pipe, name)}
    add_trainable_adapter(modules[name], sara_config(args, denoiser_targets), args)
    if getattr(args, "train_text_encoder", False):
        if pipeline_kind(pipe) in FLOW_MATCHING:
            raise ValueError(
                "--train_text_encoder is implemented for SD 1.x/2.x and SDXL (CLIP encoders); for "
                f"{type(pipe).__name__}, train the transformer only."
            )
        for name in TEXT_ENCODERS:
            if getattr(pipe, name, None) is not None:
                modules[name] = getattr(pipe, name)
                add_trainable_adapter(modules[name], sara_config(args), args)
    return modules
