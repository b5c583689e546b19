"""What the SaRA training scripts in this folder share: their common flags, the base pipeline, the SaRA adapters and
their optimizers, text conditioning, the denoising losses, checkpoints, the training loop, validation, and the final
save / LoRA export / push.

``train_text_to_image_sara.py``, ``train_dreambooth_sara.py`` and ``train_motion_sara.py`` import it from beside
themselves; each keeps what is its own: its data, and how a batch becomes a loss. Copy it along with the script you
edit. Flags follow diffusers' LoRA scripts (``train_text_to_image_lora.py``, ``train_dreambooth_lora*.py``); the
LoRA-only ones stop with a message that says what to use instead (:data:`NO_SARA_MEANING`).

Checkpoints (``checkpoint-<step>/``) hold one subfolder per trained component (``unet/``, ``text_encoder/``, ...) with
the adapter in PEFT format and ``sara_training_state.safetensors`` (optimizer, LR scheduler, SaRA helper and RNG states):
``--resume_from_checkpoint`` continues bitwise, and ``peft_sara.load_sara_adapter(pipe, "out/checkpoint-500")`` loads
one for a look.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DistributedType,
    ProjectConfiguration,
    set_seed,
)
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
from diffusers.optimization import get_scheduler
from diffusers.training_utils import (
    cast_training_params,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
    compute_snr,
)
from diffusers.utils import make_image_grid
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

import peft_sara  # noqa: F401  (registers the SaRA method with PEFT)
from peft_sara import SaRAConfig, load_sara_adapter, sara_layers, save_sara_adapter
from peft_sara.constants import DEFAULT_THRESHOLD
from peft_sara.conversion import ExportResult, export_adapter, parse_rank
from peft_sara.export.sources import dtype_kwargs
from peft_sara.pipelines import inject_sara_adapter
from peft_sara.serialization import save_injected_adapter
from peft_sara.training import (
    SaRATrainingHelper,
    load_training_state,
    paper_learning_rate,
    save_training_state,
    unwrap_optimizer,
)

logger = get_logger(__name__, log_level="INFO")

ADAPTER_NAME = "default"
CHECKPOINT_PREFIX = "checkpoint-"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the CLIP encoders --train_text_encoder adapts (SD, SDXL)
FLOW_MATCHING = ("sd3", "flux")  # pipeline kinds trained with rectified flow
MAX_SEQUENCE_LENGTH = {"sd3": 77, "flux": 512}  # T5 prompt length by default
INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Flags of diffusers' LoRA scripts that SaRA has no use for, and what to do instead.
_DEEPFLOYD = (
    "is a DeepFloyd IF option of diffusers' train_dreambooth_lora.py; these scripts train SD 1.x/2.x, SDXL, SD3."
)
_ADAMW_ONLY = (
    "these scripts train with AdamW (--use_8bit_adam for bitsandbytes' 8-bit AdamW); Prodigy has not been tried with "
    "SaRA's progressive re-selection."
)
NO_SARA_MEANING = {
    "--rank": "SaRA has no rank: it trains the pre-trained weights whose magnitude is below a threshold. Choose how "
    "many with --threshold (paper: 2e-3, about 6% of SD1.5's UNet; 8e-4 about 2%; 2e-4 about 0.6%) or "
    "--trainable_fraction (e.g. 0.05). For a LoRA file of a given rank, add --export_lora_rank RANK.",
    "--lora_alpha": "SaRA has no LoRA scale: its update counts in full. Set the strength at inference with "
    "pipe.set_adapters([name], [weight]).",
    "--lora_dropout": "SaRA has no dropout: regularise with --lambda_rank (the paper's nuclear-norm low-rank loss).",
    "--use_dora": "DoRA is a LoRA variant; SaRA learns a sparse update of the pre-trained weights, with no magnitude "
    "vector to train.",
    "--lora_layers": "use --target_modules (comma-separated module names or suffixes) to choose SaRA's layers.",
    "--output_kohya_format": "SaRA saves in PEFT format. For kohya / A1111 / ComfyUI, run `peft-sara export "
    "OUTPUT_DIR --format kohya -o lora.safetensors` after training; --export_lora_rank RANK writes a "
    "diffusers-format LoRA as well.",
    "--do_edm_style_training": "EDM-style training (Playground v2.5) is not implemented in these scripts.",
    "--optimizer": _ADAMW_ONLY,
    "--prodigy_beta3": _ADAMW_ONLY,
    "--prodigy_decouple": _ADAMW_ONLY,
    "--prodigy_use_bias_correction": _ADAMW_ONLY,
    "--prodigy_safeguard_warmup": _ADAMW_ONLY,
    "--tokenizer_name": "the pipeline's own tokenizers are used: pass a pipeline folder holding the one you want.",
    "--pre_compute_text_embeddings": _DEEPFLOYD,
    "--tokenizer_max_length": _DEEPFLOYD,
    "--text_encoder_use_attention_mask": _DEEPFLOYD,
    "--class_labels_conditioning": _DEEPFLOYD,
    "--validation_images": _DEEPFLOYD,
    "--enable_npu_flash_attention": "Ascend NPUs are not supported by these scripts.",
    "--debug_loss": "per-file loss logging is not implemented; the loss and the low-rank loss are logged every step.",
}


# ------------------------------------------------------------------------------------------------------- arguments
class _NoSaRAMeaning(argparse.Action):
    """Stops parsing with the message of :data:`NO_SARA_MEANING` for the flag."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string}: {NO_SARA_MEANING[option_string]}")


def export_rank(text: str) -> int | float | str:
    """``--export_lora_rank``: a rank (``8``), ``full`` (exact) or an energy fraction per layer (``0.99``)."""
    try:
        return parse_rank(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_common_arguments(parser: argparse.ArgumentParser, default_output_dir: str) -> None:
    """The flags every script takes: model, training, SaRA, checkpoints, validation, logging, Hub, LoRA export."""
    model = parser.add_argument_group("model").add_argument
    model("--pretrained_model_name_or_path", required=True, help="Base pipeline: Hub id or local folder.")
    model(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="A VAE to use instead of the pipeline's, e.g. madebyollin/sdxl-vae-fp16-fix (which may run in fp16).",
    )
    model("--revision", default=None, help="Revision of the base pipeline.")
    model("--variant", default=None, help="Weights variant of the base pipeline, e.g. fp16.")
    model("--cache_dir", default=None, help="Cache for downloaded models and datasets.")

    train = parser.add_argument_group("training").add_argument
    train("--output_dir", default=default_output_dir, help="Where the adapter, checkpoints and validation go.")
    train("--seed", type=int, default=0, help="Seed of everything random (data order, noise, layer sampling).")
    train("--resolution", type=int, default=512, help="Images are resized (shorter side) and cropped to this size.")
    train("--center_crop", action="store_true", help="Center crop (default: random crop).")
    train("--random_flip", action="store_true", help="Flip images horizontally at random.")
    train(
        "--image_interpolation_mode",
        choices=sorted(INTERPOLATION),
        default="lanczos",
        help="Resampling filter of the resize.",
    )
    train("--train_batch_size", type=int, default=1, help="Batch size per device.")
    train("--num_train_epochs", type=int, default=100)
    train("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    train("--gradient_accumulation_steps", type=int, default=1)
    train("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the trained models.")
    train(
        "--learning_rate",
        type=float,
        default=None,
        help="Default: the paper's fit for the threshold, 1e-3 * exp(-350 * threshold): 4.97e-4 at 2e-3, the default "
        "threshold (also used with --trainable_fraction).",
    )
    train(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by accumulation steps x batch size x number of processes.",
    )
    train(
        "--lr_scheduler",
        default="constant",
        help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant" or "constant_with_warmup".',
    )
    train("--lr_warmup_steps", type=int, default=0)
    train("--lr_num_cycles", type=int, default=1, help="Hard resets of cosine_with_restarts.")
    train("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    train("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW.")
    train("--adam_beta1", type=float, default=0.9)
    train("--adam_beta2", type=float, default=0.999)
    train("--adam_weight_decay", type=float, default=1e-2)
    train("--adam_epsilon", type=float, default=1e-8)
    train("--max_grad_norm", type=float, default=1.0)
    train(
        "--prediction_type",
        choices=["epsilon", "v_prediction"],
        default=None,
        help="DDPM models (SD 1.x/2.x, SDXL, AnimateDiff): override the scheduler's prediction type.",
    )
    train(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR loss weighting (Hang et al., 2023); 5.0 is the recommended value. DDPM models only.",
    )
    train(
        "--noise_offset",
        type=float,
        default=0.0,
        help="Per-channel offset noise (helps very dark or bright images; 0.05-0.1 is typical). DDPM models only.",
    )
    train(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Default: accelerate's config. Frozen weights use this dtype; SaRA values stay float32.",
    )
    train("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    train(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="xformers attention (CUDA only). PyTorch 2's scaled_dot_product_attention, the default, is about as lean.",
    )
    train("--dataloader_num_workers", type=int, default=0)
    train("--local_rank", type=int, default=-1, help="Set by torch.distributed launchers; accelerate reads LOCAL_RANK.")

    sara = parser.add_argument_group("SaRA")
    selection = sara.add_mutually_exclusive_group()
    selection.add_argument(
        "--threshold", type=float, default=None, help="Train weights with |w| < threshold (default 2e-3, the paper's)."
    )
    selection.add_argument(
        "--trainable_fraction",
        type=float,
        default=None,
        help="Train the smallest fraction of each weight by magnitude instead.",
    )
    sara.add_argument(
        "--target_modules",
        default=None,
        help="Comma-separated module names / suffixes to adapt. Default: SaRA's defaults for the denoiser.",
    )
    sara.add_argument(
        "--lambda_rank", type=float, default=0.0, help="Weight of the nuclear-norm low-rank loss (paper: 5e-4)."
    )
    sara.add_argument(
        "--rank_layers_per_step", default="1", help='Layers sampled per step by the low-rank loss, or "all".'
    )
    sara.add_argument(
        "--rank_min_dim", type=int, default=64, help="Layers take part in the low-rank loss if min dim > this."
    )
    sara.add_argument(
        "--progressive_fraction",
        type=float,
        default=0.5,
        help="Re-select the trainable weights after this fraction of the steps (paper: 0.5); 0 disables.",
    )
    sara.add_argument(
        "--progressive_step", type=int, default=None, help="Re-select at this step (overrides the fraction)."
    )

    out = parser.add_argument_group("checkpoints, validation, logging, Hub").add_argument
    out("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    out("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    out("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest" in --output_dir.')
    out("--validation_prompt", default=None, help="Prompt of the validation images.")
    out("--num_validation_images", type=int, default=4, help="Images (motion: clips) per validation, side by side.")
    out("--validation_steps", type=int, default=None, help="Validate every N steps (default 100 without epochs).")
    out("--validation_epochs", type=int, default=None, help="Validate after every N-th epoch (and the first).")
    out("--validation_inference_steps", type=int, default=30, help="Denoising steps of the validation images.")
    out("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    out("--logging_dir", default="logs", help="Tracker logs, relative to --output_dir.")
    out("--push_to_hub", action="store_true", help="Upload the adapter, its card and validation images at the end.")
    out("--hub_model_id", default=None, help="Hub repo (default: the name of --output_dir).")
    out("--hub_token", default=None, help="Hub token (default: the logged-in one).")
    out(
        "--export_lora_rank",
        type=export_rank,
        default=None,
        help="Also write pytorch_lora_weights.safetensors (diffusers format, read by pipe.load_lora_weights) in "
        "--output_dir: the SaRA update as a LoRA of this rank per layer (an integer), 'full' (exact) or an energy "
        "fraction such as 0.99. The card reports the approximation error.",
    )

    for flag in NO_SARA_MEANING:
        parser.add_argument(flag, nargs="?", action=_NoSaRAMeaning, help=argparse.SUPPRESS)


def add_text_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """``--train_text_encoder`` and its learning rate / weight decay, as in diffusers' SDXL DreamBooth-LoRA script."""
    group = parser.add_argument_group("text encoders").add_argument
    group(
        "--train_text_encoder",
        action="store_true",
        help="Add SaRA to the CLIP text encoder(s) too (SD 1.x/2.x and SDXL).",
    )
    group("--text_encoder_lr", type=float, default=None, help="Learning rate of the text encoders (default: same).")
    group("--adam_weight_decay_text_encoder", type=float, default=None, help="Their weight decay (default: same).")


def add_flow_matching_arguments(parser: argparse.ArgumentParser) -> None:
    """SD3 / Flux (rectified flow) flags, as in diffusers' SD3 and Flux scripts."""
    group = parser.add_argument_group("SD3 and Flux").add_argument
    group(
        "--max_sequence_length",
        type=int,
        default=None,
        help="T5 prompt length (default: 77 for SD3, 512 for Flux), in training and validation.",
    )
    group(
        "--weighting_scheme",
        choices=["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"],
        default="logit_normal",
        help="Timestep sampling / loss weighting.",
    )
    group(
        "--precondition_outputs",
        type=int,
        choices=[0, 1],
        default=1,
        help="SD3 only: 1 regresses the clean latents (EDM preconditioning), 0 the flow (noise - latents).",
    )
    group(
        "--guidance_scale",
        type=float,
        default=3.5,
        help="Flux only: the guidance the transformer is conditioned on while training (guidance-distilled models "
        "such as FLUX.1-dev).",
    )


EXAMPLES_EXTRA_HINT = "pip install 'peft-sara[examples]' installs everything the training scripts use"


def check_dependencies(parser: argparse.ArgumentParser, modules: Sequence[str]) -> None:
    """Stop before anything loads when an optional package the script imports later (``datasets``) is missing, with
    the command that installs it."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(
            f"This script needs {', '.join(missing)}, which is not installed: `pip install {' '.join(missing)}` "
            f"({EXAMPLES_EXTRA_HINT})."
        )


def check_common_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace, needs: Sequence[str] = ()
) -> argparse.Namespace:
    """Checks and normalisations every script applies after parsing; ``needs``: optional packages the script imports
    later (checked first, see :func:`check_dependencies`)."""
    check_dependencies(parser, needs)
    if args.rank_layers_per_step != "all":
        args.rank_layers_per_step = int(args.rank_layers_per_step)
    if args.report_to == "wandb" and args.hub_token is not None:
        parser.error("--hub_token with --report_to wandb would expose the token: log in with `hf auth login` instead.")
    if args.validation_steps is None and args.validation_epochs is None:
        args.validation_steps = 100
    return args


# ----------------------------------------------------------------------------------------------------------- setup
def check_xformers(args: argparse.Namespace) -> None:
    """Refuse ``--enable_xformers_memory_efficient_attention`` where it cannot run, saying what to do."""
    if not args.enable_xformers_memory_efficient_attention:
        return
    if not torch.cuda.is_available():
        raise ValueError(
            "--enable_xformers_memory_efficient_attention needs a CUDA GPU, and this machine has none: drop the flag "
            "(diffusers already uses PyTorch's scaled_dot_product_attention, which is as memory-efficient)."
        )
    try:
        import xformers  # noqa: F401  (optional dependency)
    except ImportError as err:
        raise ValueError(
            "--enable_xformers_memory_efficient_attention needs xformers: `pip install xformers` (built for your "
            "torch), or drop the flag (PyTorch's scaled_dot_product_attention is used then)."
        ) from err


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The Accelerator (seeded data order, so a resumed run sees the batches an uninterrupted one would), logging,
    seed and output folder."""
    check_xformers(args)
    # SDXL's first text encoder contributes its penultimate layer only: its last layer's values get no gradient.
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=getattr(args, "train_text_encoder", False))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, args.logging_dir))
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=[ddp_kwargs],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def create_hub_repo(args: argparse.Namespace, accelerator: Accelerator) -> str | None:
    """The Hub repo the run pushes to (created now, so a bad token fails before training), or None."""
    if not (args.push_to_hub and accelerator.is_main_process):
        return None
    api = HfApi(token=args.hub_token)
    return api.create_repo(args.hub_model_id or Path(args.output_dir).name, exist_ok=True).repo_id


def weight_dtype_of(accelerator: Accelerator) -> torch.dtype:
    """The dtype of the frozen weights under the run's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


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


# ------------------------------------------------------------------------------------------------------------ data
def resize_and_crop(
    image: Image.Image, args: argparse.Namespace, crop_top_left: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Shorter side to ``--resolution``, a square crop (center, or random from the global RNG; ``crop_top_left`` fixes
    it, e.g. for the later frames of a clip), ``[-1, 1]`` CHW floats.

    Also returns what SDXL conditions on: ``original_size`` (h, w), ``crop_top_left`` (y, x), and the crop's left edge
    once the image is flipped (``flipped_left``).
    """
    image = image.convert("RGB")
    resolution = args.resolution
    original_size = (image.height, image.width)
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, INTERPOLATION[args.image_interpolation_mode])
    spare_x, spare_y = image.width - resolution, image.height - resolution
    if crop_top_left is not None:
        top, left = crop_top_left
    elif args.center_crop:
        left, top = spare_x // 2, spare_y // 2
    else:  # draws from the global RNG only when the image is not already square
        left = int(torch.randint(spare_x + 1, ())) if spare_x else 0
        top = int(torch.randint(spare_y + 1, ())) if spare_y else 0
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return {
        "pixel_values": torch.from_numpy(array).permute(2, 0, 1),
        "original_size": original_size,
        "crop_top_left": (top, left),
        "flipped_left": spare_x - left,
    }


def load_image_dataset(
    args: argparse.Namespace,
    data_dir: str | None,
    dataset_name: str | None = None,
    default_caption: str | None = None,
    max_samples: int | None = None,
):
    """An image dataset (a folder, read with ``datasets``' ``imagefolder``: add a ``metadata.jsonl`` for captions; or
    a Hub dataset) whose items are :func:`resize_and_crop`'s dict plus ``caption``. Without a caption column, every
    caption is ``default_caption``; ``max_samples`` keeps the first examples only."""
    from datasets import load_dataset  # optional dependency of diffusers' training examples

    if dataset_name is not None:
        dataset = load_dataset(
            dataset_name, getattr(args, "dataset_config_name", None), cache_dir=args.cache_dir, data_dir=data_dir
        )
    else:  # works offline: the "imagefolder" builder ships with `datasets`
        dataset = load_dataset("imagefolder", data_dir=data_dir, cache_dir=args.cache_dir)
    dataset = dataset["train"]
    if args.image_column not in dataset.column_names:
        raise ValueError(
            f"--image_column '{args.image_column}' is not a column of the dataset: {dataset.column_names}."
        )
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    has_captions = args.caption_column in dataset.column_names
    if not has_captions and default_caption is None:
        raise ValueError(
            f"--caption_column '{args.caption_column}' is not a column of the dataset: {dataset.column_names}."
        )

    def preprocess(examples: dict[str, list]) -> dict[str, list]:
        items = [resize_and_crop(image, args) for image in examples[args.image_column]]
        batch = {key: [item[key] for item in items] for key in items[0]}
        captions = examples[args.caption_column] if has_captions else [None] * len(items)
        batch["caption"] = [caption or default_caption for caption in captions]
        return batch

    return dataset.with_transform(preprocess)


def collate_images(examples: list[dict]) -> dict[str, Any]:
    """Stack :func:`load_image_dataset` items into a batch (``captions`` stay strings or lists of strings)."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]).contiguous().float(),
        "captions": [example["caption"] for example in examples],
        "original_sizes": [example["original_size"] for example in examples],
        "crop_top_lefts": [example["crop_top_left"] for example in examples],
        "flipped_lefts": [example["flipped_left"] for example in examples],
    }


def random_flip(batch: dict[str, Any], args: argparse.Namespace) -> torch.Tensor:
    """``batch["pixel_values"]``, each image (or clip) flipped horizontally with probability 1/2 under
    ``--random_flip``; SDXL crop coordinates follow. Drawn in the training loop rather than in the dataset, so the
    draws follow the steps and resuming stays exact."""
    pixel_values = batch["pixel_values"]
    if not args.random_flip:
        return pixel_values
    flip = (torch.rand(len(pixel_values)) < 0.5).to(pixel_values.device)
    if "crop_top_lefts" in batch:
        batch["crop_top_lefts"] = [
            (top, flipped_left if flipped else left)
            for (top, left), flipped_left, flipped in zip(
                batch["crop_top_lefts"], batch["flipped_lefts"], flip.tolist()
            )
        ]
    flip = flip.view(-1, *[1] * (pixel_values.ndim - 1))
    return torch.where(flip, pixel_values.flip(-1), pixel_values)


def pick_captions(captions: Sequence[str | Sequence[str]]) -> list[str]:
    """One caption per example: the caption, or a random one of a list of captions."""
    return [
        caption if isinstance(caption, str) else caption[int(torch.randint(len(caption), ()))] for caption in captions
    ]


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of a folder, sorted by name."""
    return sorted(path for path in Path(folder).iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)


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


# ----------------------------------------------------------------------------------------------------------- SaRA
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


def add_sara_adapter(module: nn.Module, config: SaRAConfig, args: argparse.Namespace, accelerator: Accelerator) -> None:
    """Inject a trainable SaRA adapter in place (the component stays a diffusers / transformers model, so the pipeline
    keeps working), with float32 values under mixed precision; gradient checkpointing and xformers if asked."""
    if isinstance(module, ModelMixin):
        module.add_adapter(config, adapter_name=ADAPTER_NAME)
        if args.gradient_checkpointing:
            module.enable_gradient_checkpointing()
        if args.enable_xformers_memory_efficient_attention:
            module.enable_xformers_memory_efficient_attention()
    else:  # transformers text encoders (their own add_adapter asks for peft>=0.22)
        inject_sara_adapter(module, config, ADAPTER_NAME)
        for _, layer in sara_layers(module):
            layer.set_adapter([ADAPTER_NAME])  # trainable (loading injects adapters for inference)
        if args.gradient_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if accelerator.mixed_precision in ("fp16", "bf16"):
        cast_training_params(module, dtype=torch.float32)


def trained_modules(
    args: argparse.Namespace,
    accelerator: Accelerator,
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
    add_sara_adapter(modules[name], sara_config(args, denoiser_targets), args, accelerator)
    if getattr(args, "train_text_encoder", False):
        if pipeline_kind(pipe) in FLOW_MATCHING:
            raise ValueError(
                "--train_text_encoder is implemented for SD 1.x/2.x and SDXL (CLIP encoders); for "
                f"{type(pipe).__name__}, train the transformer only."
            )
        for name in TEXT_ENCODERS:
            if getattr(pipe, name, None) is not None:
                modules[name] = getattr(pipe, name)
                add_sara_adapter(modules[name], sara_config(args), args, accelerator)
    return modules


@dataclass
class TrainedComponent:
    """One adapted pipeline component and what trains it: its optimizer, LR schedule and SaRA helper (low-rank loss,
    progressive re-selection). ``prepared`` is what ``accelerator.prepare`` returned for the model (a DDP wrapper in
    multi-process runs): call that one in the loss."""

    name: str
    model: nn.Module
    optimizer: Any
    lr_scheduler: Any
    helper: SaRATrainingHelper
    prepared: nn.Module | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [param for param in self.model.parameters() if param.requires_grad]


def plan_steps(args: argparse.Namespace, accelerator: Accelerator, num_examples: int) -> int:
    """Optimizer steps per epoch; sets ``args.max_train_steps`` (from the epochs if not given) and the epochs."""
    batches_per_epoch = math.ceil(num_examples / (args.train_batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    return steps_per_epoch


def resolve_learning_rate(args: argparse.Namespace, config: SaRAConfig, accelerator: Accelerator) -> float:
    """``--learning_rate``, or the paper's fit for the threshold; times the global batch size with ``--scale_lr``."""
    if args.learning_rate is None:
        threshold = config.threshold if config.threshold is not None else DEFAULT_THRESHOLD
        args.learning_rate = paper_learning_rate(threshold)
        if config.threshold is None:  # --trainable_fraction picks the entries; the paper's fit needs a threshold
            logger.info(
                f"Learning rate {args.learning_rate:.3g}: the paper's rate for its default threshold {threshold:g} "
                "(--trainable_fraction sets no threshold; set --learning_rate to choose another)"
            )
        else:
            logger.info(
                f"Learning rate {args.learning_rate:.3g} = paper_learning_rate({threshold:g}) (set --learning_rate "
                "to override)"
            )
    else:
        logger.info(f"Learning rate {args.learning_rate:.3g} (from --learning_rate)")
    if args.scale_lr:
        factor = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate *= factor
        if getattr(args, "text_encoder_lr", None) is not None:
            args.text_encoder_lr *= factor
        logger.info(f"--scale_lr: learning rate x {factor} = {args.learning_rate:.3g}")
    return args.learning_rate


def build_components(
    args: argparse.Namespace, accelerator: Accelerator, modules: dict[str, nn.Module]
) -> list[TrainedComponent]:
    """An AdamW (or 8-bit AdamW), an LR schedule and a SaRA helper per adapted component (call after
    :func:`plan_steps`). Text encoders take ``--text_encoder_lr`` / ``--adam_weight_decay_text_encoder`` if given."""
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb  # optional dependency
        except ImportError as err:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from err
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    learning_rate = resolve_learning_rate(args, next(iter(modules.values())).peft_config[ADAPTER_NAME], accelerator)
    components = []
    for index, (name, module) in enumerate(modules.items()):
        is_text_encoder = name in TEXT_ENCODERS
        text_lr = getattr(args, "text_encoder_lr", None)
        text_decay = getattr(args, "adam_weight_decay_text_encoder", None)
        optimizer = optimizer_cls(
            [param for param in module.parameters() if param.requires_grad],
            lr=text_lr if is_text_encoder and text_lr is not None else learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=text_decay if is_text_encoder and text_decay is not None else args.adam_weight_decay,
            eps=args.adam_epsilon,
        )
        lr_scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=args.max_train_steps * accelerator.num_processes,
            num_cycles=args.lr_num_cycles,
            power=args.lr_power,
        )
        helper = SaRATrainingHelper(
            module, optimizer, total_steps=args.max_train_steps, adapter_name=ADAPTER_NAME, seed=args.seed + index
        )
        components.append(TrainedComponent(name, module, optimizer, lr_scheduler, helper))
    return components


def setup_training(
    args: argparse.Namespace,
    accelerator: Accelerator,
    modules: dict[str, nn.Module],
    train_dataset: torch.utils.data.Dataset,
    collate_fn: Callable[[list], dict[str, Any]],
) -> tuple[list[TrainedComponent], torch.utils.data.DataLoader, int, bool]:
    """The data loader, an optimizer / LR schedule / SaRA helper per adapted component, the resume and
    ``accelerator.prepare``: returns the components, the prepared loader, the steps per epoch and whether DeepSpeed
    runs."""
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        shuffle=True,
        collate_fn=collate_fn,
        batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers,
        # Keeps the loader's own seed draw off the global RNG (whose state checkpoints restore).
        generator=torch.Generator().manual_seed(args.seed),
    )
    steps_per_epoch = plan_steps(args, accelerator, len(train_dataset))
    components = build_components(args, accelerator, modules)
    train_dataloader, deepspeed = prepare_and_resume(args, accelerator, components, train_dataloader)
    return components, train_dataloader, steps_per_epoch, deepspeed


# ----------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(save_path: str, components: Sequence[TrainedComponent]) -> None:
    """Adapter-only checkpoint, one subfolder per component: the adapter in PEFT format plus optimizer, scheduler,
    SaRA-helper and RNG states (``peft_sara.training.save_training_state``)."""
    for component in components:
        save_training_state(
            os.path.join(save_path, component.name),
            component.model,
            component.optimizer,
            component.lr_scheduler,
            component.helper,
        )


def load_checkpoint(checkpoint: str, components: Sequence[TrainedComponent]) -> None:
    """Resume every component from :func:`save_checkpoint`'s folder, in place (wrappers built before stay valid)."""
    for component in components:
        folder = os.path.join(checkpoint, component.name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{checkpoint} has no '{component.name}' subfolder: it was saved by a run that did not train "
                f"{component.name} (e.g. without --train_text_encoder). Resume with the same flags."
            )
        load_training_state(
            folder,
            component.model,
            component.optimizer,
            component.lr_scheduler,
            component.helper,
            adapter_name=ADAPTER_NAME,
        )


def save_adapter_hook(accelerator: Accelerator, name: str, models: list, weights: list, output_dir: str) -> None:
    """accelerate's save-state hook (DeepSpeed): write the adapter in PEFT format beside DeepSpeed's own states."""
    if accelerator.is_main_process:
        save_injected_adapter(accelerator.unwrap_model(models[0]), os.path.join(output_dir, name), ADAPTER_NAME)
    weights.clear()  # nothing else to write for the denoiser outside DeepSpeed's checkpoint


def checkpoint_steps(output_dir: str) -> list[int]:
    """Steps of the ``checkpoint-<step>`` folders in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [name for name in os.listdir(output_dir) if name.startswith(CHECKPOINT_PREFIX)]
    return sorted(int(name[len(CHECKPOINT_PREFIX) :]) for name in names if name[len(CHECKPOINT_PREFIX) :].isdigit())


def resolve_checkpoint(args: argparse.Namespace) -> str | None:
    """The folder ``--resume_from_checkpoint`` names ("latest": the newest in ``--output_dir``, None if none)."""
    if args.resume_from_checkpoint == "latest":
        steps = checkpoint_steps(args.output_dir)
        return os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{steps[-1]}") if steps else None
    path = args.resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(args.output_dir, os.path.basename(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder.")
    return path


def make_room_for_checkpoint(output_dir: str, limit: int | None) -> None:
    """Delete the oldest checkpoints so that one more keeps at most ``limit`` of them."""
    steps = checkpoint_steps(output_dir)
    if limit is None or len(steps) < limit:
        return
    for step in steps[: len(steps) - limit + 1]:
        logger.info(f"Removing {CHECKPOINT_PREFIX}{step} (--checkpoints_total_limit {limit})")
        shutil.rmtree(os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}"))


# ------------------------------------------------------------------------------------------------ preparing, resuming
def check_engine(accelerator: Accelerator, components: Sequence[TrainedComponent]) -> bool:
    """Whether DeepSpeed runs (then its checkpoints go through accelerate's save_state); refuses what cannot work."""
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "These scripts checkpoint with peft_sara.training.save_training_state, which reads whole (unsharded) SaRA "
            "values: train with DDP or DeepSpeed. FSDP2 works in your own loop (see docs/DISTRIBUTED.md)."
        )
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    if len(components) > 1:
        raise ValueError("Under DeepSpeed these scripts train one model: drop --train_text_encoder, or use DDP.")
    if components[0].helper.progressive_step is not None:
        raise ValueError(
            "DeepSpeed optimizes flattened fp32 copies of the SaRA values, whose state progressive re-selection "
            "cannot re-order: pass --progressive_fraction 0 with DeepSpeed, or train with DDP or FSDP2."
        )
    accelerator.register_save_state_pre_hook(functools.partial(save_adapter_hook, accelerator, components[0].name))
    accelerator.register_for_checkpointing(components[0].helper)
    return True


def prepare_and_resume(
    args: argparse.Namespace,
    accelerator: Accelerator,
    components: list[TrainedComponent],
    train_dataloader: torch.utils.data.DataLoader,
) -> tuple[torch.utils.data.DataLoader, bool]:
    """Resume from ``--resume_from_checkpoint`` if asked, and ``accelerator.prepare`` everything once.

    SaRA checkpoints load before ``prepare``, into the plain optimizers, writing the adapter into the SaRA values in
    place (their size and identity never change, so wrappers stay valid): adapter, optimizer, scheduler, helper
    (global step, re-selection) and RNG states. DeepSpeed checkpoints load after it. Returns the prepared loader and
    whether DeepSpeed runs.
    """
    deepspeed = check_engine(accelerator, components)
    checkpoint = resolve_checkpoint(args) if args.resume_from_checkpoint else None
    if args.resume_from_checkpoint and checkpoint is None:
        logger.info(f"No checkpoint in {args.output_dir}: starting a new run.")
    if checkpoint is not None and not deepspeed:
        load_checkpoint(checkpoint, components)
    count = len(components)
    prepared = accelerator.prepare(
        *[component.model for component in components],
        *[component.optimizer for component in components],
        train_dataloader,
        *[component.lr_scheduler for component in components],
    )
    for index, component in enumerate(components):
        component.prepared = prepared[index]
        component.optimizer = prepared[count + index]
        component.lr_scheduler = prepared[2 * count + 1 + index]
    if checkpoint is not None and deepspeed:
        accelerator.load_state(checkpoint, load_module_strict=False)  # the adapter-only module state
    if checkpoint is not None:
        logger.info(f"Resumed from {checkpoint} at step {components[0].helper.global_step}")
    return prepared[2 * count], deepspeed


# --------------------------------------------------------------------------------------------------------- the loop
def train(
    args: argparse.Namespace,
    accelerator: Accelerator,
    components: Sequence[TrainedComponent],
    train_dataloader: torch.utils.data.DataLoader,
    steps_per_epoch: int,
    compute_loss: Callable[[dict[str, Any]], torch.Tensor],
    validate: Callable[[str, int], None] | None = None,
    deepspeed: bool = False,
    project_name: str = "sara",
) -> int:
    """The training loop: gradient accumulation, SaRA's low-rank loss once per optimizer step, clipping, one optimizer
    / scheduler / helper step per component (progressive re-selection in place), checkpoints, validation.

    ``compute_loss(batch)`` returns the batch's scalar loss; ``validate(name, step)`` renders validation output (main
    process only, models in eval mode). Returns the last global step.
    """
    models = [component.prepared for component in components]
    helpers = [component.helper for component in components]
    trainable = [param for component in components for param in component.trainable_parameters()]
    global_step = helpers[0].global_step
    if accelerator.is_main_process:
        config = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
        accelerator.init_trackers(project_name, config=config)

    logger.info("***** Running training *****")
    logger.info(
        f"  Examples = {len(train_dataloader.dataset)}, epochs = {args.num_train_epochs}, "
        f"optimizer steps = {args.max_train_steps}"
    )
    logger.info(
        f"  Batch size per device = {args.train_batch_size}, accumulation = {args.gradient_accumulation_steps}, "
        f"total batch = {args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps}"
    )
    for component in components:
        logger.info(
            f"  SaRA on {component.name}: {component.helper.config.selection_rule}, "
            f"{component.helper.trainable_count():,} trainable entries, re-selection at step "
            f"{component.helper.progressive_step}"
        )

    def run_validation(name: str) -> None:
        for model in models:
            model.eval()
        validate(name, global_step)
        for model in models:
            model.train()

    first_epoch = global_step // steps_per_epoch
    batches_to_skip = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    for epoch in range(first_epoch, args.num_train_epochs):
        for model in models:
            model.train()
        loader = train_dataloader
        if epoch == first_epoch and batches_to_skip:
            loader = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
        loader.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(*models):
                loss = compute_loss(batch)
                total_loss = loss
                if accelerator.sync_gradients:
                    # The low-rank loss counts once per optimizer step: accelerator.backward divides every
                    # micro-batch's loss by the accumulation steps, so scale it back up.
                    regularization = sum(helper.regularization() for helper in helpers)
                    total_loss = loss + regularization * args.gradient_accumulation_steps
                accelerator.backward(total_loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                for component in components:
                    component.optimizer.step()
                    component.lr_scheduler.step()
                    component.optimizer.zero_grad()

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress_bar.update(1)
            for component in components:
                if args.use_8bit_adam and component.helper.reselection_due():
                    # Blockwise-quantized moments cannot be re-ordered entry by entry: restart them.
                    unwrap_optimizer(component.optimizer).state.clear()
                if component.helper.step():  # in place: same Parameters, optimizer state re-ordered
                    logger.info(
                        f"Step {global_step}: re-selected {component.name}, "
                        f"{component.helper.trainable_count():,} trainable entries left"
                    )
            logs = {
                "loss": loss.detach().item(),
                "rank_loss": sum(helper.last_regularization for helper in helpers),
                "lr": components[0].lr_scheduler.get_last_lr()[0],
            }
            progress_bar.set_postfix(**logs)
            accelerator.log(logs, step=global_step)

            if global_step % args.checkpointing_steps == 0:
                save_path = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
                if accelerator.is_main_process:
                    make_room_for_checkpoint(args.output_dir, args.checkpoints_total_limit)
                if deepspeed:  # every rank writes its part
                    accelerator.save_state(save_path, exclude_frozen_parameters=True)
                elif accelerator.is_main_process:
                    save_checkpoint(save_path, components)
                logger.info(f"Saved {save_path}")
            if (
                accelerator.is_main_process
                and validate is not None
                and args.validation_steps
                and global_step % args.validation_steps == 0
            ):
                run_validation(f"step-{global_step}")
            if global_step >= args.max_train_steps:
                break
        if (
            accelerator.is_main_process
            and validate is not None
            and args.validation_epochs
            and epoch % args.validation_epochs == 0
        ):
            run_validation(f"epoch-{epoch}")
    return global_step


# ------------------------------------------------------------------------------------------------------ validation
def log_images(accelerator: Accelerator, name: str, images: list[Image.Image], step: int, caption: str) -> None:
    """Log images to the trackers (tensorboard, wandb)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(name, np.stack([np.asarray(image) for image in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb  # optional dependency

            tracker.log({name: [wandb.Image(image, caption=caption) for image in images]}, step=step)


def generate_validation(
    pipe: DiffusionPipeline, args: argparse.Namespace, accelerator: Accelerator, name: str, **kwargs: Any
) -> list[Any]:
    """``num_validation_images`` pipeline outputs for the validation prompt, from a fixed seed (its own generator:
    the global RNG, which checkpoints restore, is left alone); T5 pipelines use ``--max_sequence_length``."""
    if pipeline_kind(pipe) in FLOW_MATCHING and getattr(args, "max_sequence_length", None):
        kwargs.setdefault("max_sequence_length", args.max_sequence_length)
    logger.info(f"Validation ({name}): {args.num_validation_images} output(s) of {args.validation_prompt!r}")
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    total = args.num_validation_images * args.validation_inference_steps
    progress = tqdm(total=total, desc=f"validation ({name})", disable=not accelerator.is_local_main_process)

    def count_step(pipe: DiffusionPipeline, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        progress.update(1)
        return callback_kwargs

    with torch.no_grad(), accelerator.autocast(), progress:
        return [
            pipe(
                args.validation_prompt,
                num_inference_steps=args.validation_inference_steps,
                height=args.resolution,
                width=args.resolution,
                generator=generator,
                callback_on_step_end=count_step,
                **kwargs,
            )
            for _ in range(args.num_validation_images)
        ]


def log_validation(
    pipe: DiffusionPipeline, args: argparse.Namespace, accelerator: Accelerator, name: str, step: int
) -> list[Image.Image]:
    """Generate ``num_validation_images`` with a fixed seed, save them as one PNG grid and log them to trackers."""
    images = [output.images[0] for output in generate_validation(pipe, args, accelerator, name)]
    make_image_grid(images, rows=1, cols=len(images)).save(os.path.join(args.output_dir, f"validation-{name}.png"))
    log_images(accelerator, name, images, step, args.validation_prompt)
    return images


# ------------------------------------------------------------------------------------------------------ the outputs
def recorded_base_model(name_or_path: str) -> str:
    """What the adapter records as its base: a Hub id as given, a local folder as an absolute path, so that
    ``peft-sara export`` / ``merge`` find it from any working directory."""
    return os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path


def save_outputs(
    args: argparse.Namespace, pipe: DiffusionPipeline, components: Sequence[TrainedComponent], repo_id: str | None
) -> ExportResult | None:
    """Save the adapter (one PEFT folder per component, ``unet/`` ...) with a model card; with ``--export_lora_rank``
    also ``pytorch_lora_weights.safetensors``, the same update as a LoRA that ``pipe.load_lora_weights`` reads."""
    names = [component.name for component in components]
    save_sara_adapter(
        pipe,
        args.output_dir,
        adapter_name=ADAPTER_NAME,
        components=names,
        base_model=recorded_base_model(args.pretrained_model_name_or_path),
        repo_id=repo_id,
    )
    logger.info(f"Saved the SaRA adapter to {args.output_dir} ({', '.join(names)})")
    if args.export_lora_rank is None:
        return None
    export = export_adapter(
        pipe, args.output_dir, "diffusers", rank=args.export_lora_rank, adapter_name=ADAPTER_NAME, components=names
    )
    logger.info(
        f"Exported a diffusers-format LoRA to {export.paths[0]} (rank {args.export_lora_rank}: relative error "
        f"{export.lora.total_error:.3g} overall, {export.lora.max_error:.3g} at most per layer)"
    )
    return export


def finish_model_card(
    args: argparse.Namespace,
    config: SaRAConfig,
    steps: int,
    trained_with: str,
    export: ExportResult | None = None,
    tags: Sequence[str] = (),
    pipeline_tag: str | None = None,
    preview: str = "validation-final.png",
    notes: Sequence[str] = (),
) -> None:
    """Add how the adapter was trained, its LoRA export and the final validation output to ``README.md``."""
    card_path = Path(args.output_dir, "README.md")
    card = ModelCard.load(card_path)
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
    if pipeline_tag is not None:
        card.data.pipeline_tag = pipeline_tag
    selection = (
        f"trainable_fraction={config.trainable_fraction}"
        if config.trainable_fraction
        else f"threshold={config.threshold}"
    )
    if config.progressive_step:
        progressive = f"at step {config.progressive_step}."
    elif config.progressive_fraction:
        progressive = f"after {config.progressive_fraction} of the steps."
    else:
        progressive = "off."
    lines = [
        "",
        "## Training",
        "",
        f"Trained with {trained_with}: {steps} steps, batch size {args.train_batch_size} x "
        f"{args.gradient_accumulation_steps} accumulation, resolution {args.resolution}, learning rate "
        f"{args.learning_rate:.3g} ({args.lr_scheduler}), {selection}, lambda_rank={config.lambda_rank}, progressive "
        f"re-selection {progressive}",
        *notes,
    ]
    if export is not None:
        lines += [
            "",
            "## LoRA export",
            "",
            f"`{export.paths[0].name}` holds the same update as a LoRA (rank {args.export_lora_rank}; relative "
            f"Frobenius error {export.lora.total_error:.3g}), for tools that only read LoRA: "
            "`pipe.load_lora_weights(...)` on this folder or repo.",
        ]
    if args.validation_prompt and (card_path.parent / preview).is_file():
        lines += ["", f"Validation prompt: `{args.validation_prompt}`", "", f"![validation]({preview})"]
    card.text = card.text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"
    card.save(card_path)


def finish_training(
    args: argparse.Namespace,
    accelerator: Accelerator,
    pipe: DiffusionPipeline,
    components: Sequence[TrainedComponent],
    repo_id: str | None,
    step: int,
    fresh_pipeline: Callable[[], DiffusionPipeline],
    validate: Callable[..., Any],
    trained_with: str,
    **card: Any,
) -> None:
    """On the main process, at the end: :func:`save_outputs`; the final validation rendered by ``fresh_pipeline()``
    with the saved adapter loaded (so it checks that the files load and reproduce the training pipeline); the card
    (:func:`finish_model_card` with ``card``); the push."""
    export = save_outputs(args, pipe, components, repo_id)
    if args.validation_prompt and args.num_validation_images > 0:
        pipe.to("cpu")  # frees the accelerator's memory for the fresh pipeline (a shared VAE moves back with it)
        fresh = fresh_pipeline()
        names = [component.name for component in components]
        load_sara_adapter(fresh, args.output_dir, adapter_name=ADAPTER_NAME, components=names)
        validate(fresh.to(accelerator.device), args, accelerator, "final", step)
    finish_model_card(args, components[0].helper.config, step, trained_with, export, **card)
    if args.push_to_hub:
        push_outputs(args, repo_id)


def push_outputs(args: argparse.Namespace, repo_id: str) -> None:
    """Upload ``--output_dir`` (adapter, card, LoRA export, validation output; no checkpoints or logs) to the Hub."""
    HfApi(token=args.hub_token).upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message="End of training",
        ignore_patterns=[f"{CHECKPOINT_PREFIX}*", f"{args.logging_dir}/*"],
    )
    logger.info(f"Pushed {args.output_dir} to {repo_id}")
