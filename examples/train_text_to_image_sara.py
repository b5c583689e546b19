"""Fine-tune Stable Diffusion (1.x / 2.x UNet, or SD3 transformer) on image-caption pairs with SaRA.

The diffusers ``train_text_to_image_lora.py`` workflow with a SaRA adapter instead of LoRA: only the
smallest-magnitude ("temporarily ineffective") weights of the denoiser are trained, as a sparse update, with the
paper's nuclear-norm low-rank loss and progressive re-selection (``peft_sara.training.SaRATrainingHelper``).
The VAE and text encoders stay frozen. Copy this file and edit it: it is meant to be read.

    accelerate launch examples/train_text_to_image_sara.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --train_data_dir ./my_images --resolution 512 --center_crop --random_flip \\
        --train_batch_size 4 --gradient_accumulation_steps 1 --max_train_steps 5000 \\
        --threshold 2e-3 --lambda_rank 5e-4 --mixed_precision fp16 \\
        --checkpointing_steps 500 --validation_prompt "a photo in the style" --output_dir sara-style

``--train_data_dir`` is an image folder with a ``metadata.jsonl`` (the paper's dataset layout), one line per image:
``{"file_name": "0001.png", "text": "a caption"}``. ``--dataset_name`` loads a Hub dataset instead.

Outputs in ``--output_dir``: the adapter in PEFT format under ``unet/`` (``transformer/`` for SD3), a model card
``README.md``, ``checkpoint-<step>/`` folders (adapter + optimizer / scheduler / SaRA / RNG state, resumable with
``--resume_from_checkpoint``) and ``validation-*.png`` grids. Load the result with ``peft_sara.load_sara_adapter``.

Resuming reproduces an uninterrupted run exactly when data preprocessing draws no random numbers: with
``--center_crop`` (or square images at ``--resolution``) and ``--dataloader_num_workers 0``. ``--random_flip`` is
applied in the training loop and keeps resumption exact.

Multi-process: ``accelerate launch --multi_gpu --num_processes N ...`` (DDP; add ``ACCELERATE_USE_CPU=1`` for CPU
processes over gloo). Progressive re-selection compacts the SaRA values in place, so the DDP wrapper built by
``accelerator.prepare`` stays valid and every rank keeps the same entries. Under DeepSpeed (ZeRO-2) checkpoints go
through ``accelerator.save_state`` (every rank writes its optimizer partition; the adapter is written beside them) and
re-selection is refused: DeepSpeed optimizes flattened fp32 copies whose state cannot be re-ordered. See
``docs/DISTRIBUTED.md`` for accelerate configs (FSDP: in your own loop, not with this script's checkpoints).
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import (
    cast_training_params,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)
from diffusers.utils import make_image_grid
from PIL import Image
from tqdm.auto import tqdm

import peft_sara  # noqa: F401  (registers the SaRA method with PEFT)
from peft_sara import SaRAConfig, load_sara_adapter, save_sara_adapter
from peft_sara.constants import DEFAULT_THRESHOLD
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument

    # Model and data.
    add("--pretrained_model_name_or_path", required=True, help="Base pipeline: Hub id or local folder.")
    add("--revision", default=None, help="Revision of the base pipeline.")
    add("--variant", default=None, help="Weights variant of the base pipeline, e.g. fp16.")
    add("--dataset_name", default=None, help="Hub dataset (or a local dataset script / folder for load_dataset).")
    add("--dataset_config_name", default=None, help="Config of --dataset_name.")
    add("--train_data_dir", default=None, help="Image folder with metadata.jsonl (file_name, text).")
    add("--cache_dir", default=None, help="Cache for downloaded models and datasets.")
    add("--image_column", default="image", help="Dataset column holding the images.")
    add("--caption_column", default="text", help="Dataset column holding the captions (a string or a list).")
    add("--max_train_samples", type=int, default=None, help="Train on the first N samples only (for debugging).")
    add("--resolution", type=int, default=512, help="Training images are resized and cropped to this size.")
    add("--center_crop", action="store_true", help="Center crop (default: random crop).")
    add("--random_flip", action="store_true", help="Flip images horizontally at random.")
    add("--max_sequence_length", type=int, default=77, help="SD3 only: T5 prompt length.")

    # Training.
    add("--output_dir", default="sara-model", help="Where the adapter, checkpoints and validation images go.")
    add("--seed", type=int, default=0, help="Seed of everything random (data order, noise, layer sampling).")
    add("--train_batch_size", type=int, default=1, help="Batch size per device.")
    add("--num_train_epochs", type=int, default=100)
    add("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the denoiser.")
    add(
        "--learning_rate",
        type=float,
        default=None,
        help="Default: the paper's fit for the threshold, 1e-3 * exp(-350 * threshold): 4.97e-4 at 2e-3, the default "
        "threshold (also used with --trainable_fraction).",
    )
    add(
        "--lr_scheduler",
        default="constant",
        help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant" or "constant_with_warmup".',
    )
    add("--lr_warmup_steps", type=int, default=0)
    add("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW.")
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-2)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--max_grad_norm", type=float, default=1.0)
    add(
        "--prediction_type",
        choices=["epsilon", "v_prediction"],
        default=None,
        help="SD 1.x/2.x: override the scheduler's prediction type.",
    )
    add(
        "--weighting_scheme",
        choices=["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"],
        default="logit_normal",
        help="SD3 only: timestep sampling / loss weighting (as in diffusers' SD3 scripts).",
    )
    add(
        "--precondition_outputs",
        type=int,
        choices=[0, 1],
        default=1,
        help="SD3 only: 1 regresses the clean latents (EDM preconditioning), 0 the flow (noise - latents).",
    )
    add(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Default: accelerate's config. Frozen weights use this dtype; SaRA values stay float32.",
    )
    add("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    add("--dataloader_num_workers", type=int, default=0)

    # SaRA.
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument(
        "--threshold", type=float, default=None, help="Train weights with |w| < threshold (default 2e-3, the paper's)."
    )
    selection.add_argument(
        "--trainable_fraction",
        type=float,
        default=None,
        help="Train the smallest fraction of each weight by magnitude instead.",
    )
    add(
        "--target_modules",
        default=None,
        help="Comma-separated module names / suffixes to adapt. Default: SaRA's defaults for the denoiser.",
    )
    add("--lambda_rank", type=float, default=0.0, help="Weight of the nuclear-norm low-rank loss (paper: 5e-4).")
    add("--rank_layers_per_step", default="1", help='Layers sampled per step by the low-rank loss, or "all".')
    add("--rank_min_dim", type=int, default=64, help="Layers take part in the low-rank loss if min dim > this.")
    add(
        "--progressive_fraction",
        type=float,
        default=0.5,
        help="Re-select the trainable weights after this fraction of the steps (paper: 0.5); 0 disables.",
    )
    add("--progressive_step", type=int, default=None, help="Re-select at this step (overrides the fraction).")

    # Checkpoints, validation, logging, Hub.
    add("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    add("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    add("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest" in --output_dir.')
    add("--validation_prompt", default=None, help="Prompt of the validation images.")
    add("--num_validation_images", type=int, default=4)
    add("--validation_steps", type=int, default=100, help="Generate validation images every N steps.")
    add("--validation_inference_steps", type=int, default=30, help="Denoising steps of the validation images.")
    add("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    add("--logging_dir", default="logs", help="Tracker logs, relative to --output_dir.")
    add("--push_to_hub", action="store_true", help="Upload the adapter and its card at the end.")
    add("--hub_model_id", default=None, help="Hub repo (default: the name of --output_dir).")
    add("--hub_token", default=None, help="Hub token (default: the logged-in one).")

    args = parser.parse_args(argv)
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("Pass --dataset_name or --train_data_dir.")
    if args.rank_layers_per_step != "all":
        args.rank_layers_per_step = int(args.rank_layers_per_step)
    if args.report_to == "wandb" and args.hub_token is not None:
        parser.error("--hub_token with --report_to wandb would expose the token: log in with `hf auth login` instead.")
    return args


# ------------------------------------------------------------------------------------------------------------ data
def load_train_dataset(args: argparse.Namespace):
    """The training split with a transform yielding ``pixel_values`` in [-1, 1] and the raw ``caption``."""
    from datasets import load_dataset

    if args.dataset_name is not None:
        dataset = load_dataset(
            args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, data_dir=args.train_data_dir
        )
    else:  # works offline: the "imagefolder" builder ships with `datasets`
        dataset = load_dataset("imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir)
    dataset = dataset["train"]
    for flag, column in (("--image_column", args.image_column), ("--caption_column", args.caption_column)):
        if column not in dataset.column_names:
            raise ValueError(f"{flag} '{column}' is not a column of the dataset: {dataset.column_names}.")
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))

    def to_tensor(image: Image.Image) -> torch.Tensor:
        # Shorter side to `resolution` (bilinear), then a square crop, then [-1, 1] CHW floats.
        image = image.convert("RGB")
        scale = args.resolution / min(image.size)
        size = (max(args.resolution, round(image.width * scale)), max(args.resolution, round(image.height * scale)))
        image = image.resize(size, Image.BILINEAR)
        spare_x, spare_y = image.width - args.resolution, image.height - args.resolution
        if args.center_crop:
            left, top = spare_x // 2, spare_y // 2
        else:  # draws from the global RNG only when the image is not already square
            left = int(torch.randint(spare_x + 1, ())) if spare_x else 0
            top = int(torch.randint(spare_y + 1, ())) if spare_y else 0
        image = image.crop((left, top, left + args.resolution, top + args.resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1)

    def preprocess(examples):
        return {
            "pixel_values": [to_tensor(image) for image in examples[args.image_column]],
            "caption": examples[args.caption_column],
        }

    return dataset.with_transform(preprocess)


def collate(examples: list[dict]) -> dict:
    pixel_values = torch.stack([example["pixel_values"] for example in examples]).contiguous().float()
    return {"pixel_values": pixel_values, "captions": [example["caption"] for example in examples]}


# ------------------------------------------------------------------------------------------------------- the loss
def encode_prompts(pipe: DiffusionPipeline, captions: list[str], args: argparse.Namespace, device) -> dict:
    """Text conditioning of the denoiser, computed by the pipeline's own (frozen) text encoders."""
    with torch.no_grad():
        if isinstance(pipe, StableDiffusion3Pipeline):  # two CLIP encoders + T5 (zeros when T5 is absent)
            embeds, _, pooled, _ = pipe.encode_prompt(
                captions,
                None,
                None,
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=args.max_sequence_length,
            )
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        embeds, _ = pipe.encode_prompt(captions, device, 1, False)
        return {"encoder_hidden_states": embeds}


def sd_loss(denoiser, noise_scheduler, latents, conditioning) -> torch.Tensor:
    """SD 1.x/2.x: DDPM noising, epsilon or v-prediction target, MSE."""
    noise = torch.randn_like(latents)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
    ).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type!r}.")
    model_pred = denoiser(noisy_latents, timesteps, **conditioning, return_dict=False)[0]
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def sd3_loss(denoiser, noise_scheduler, latents, conditioning, args) -> torch.Tensor:
    """SD3: rectified flow matching, as diffusers' ``train_dreambooth_lora_sd3.py``."""
    noise = torch.randn_like(latents)
    u = compute_density_for_timestep_sampling(
        args.weighting_scheme, latents.shape[0], logit_mean=0.0, logit_std=1.0, mode_scale=1.29
    )
    indices = (u * noise_scheduler.config.num_train_timesteps).long()
    timesteps = noise_scheduler.timesteps[indices].to(latents.device)
    # The training scheduler never runs set_timesteps, so sigmas[i] belongs to timesteps[i].
    sigmas = noise_scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
    noisy_latents = (1.0 - sigmas) * latents + sigmas * noise
    model_pred = denoiser(hidden_states=noisy_latents, timestep=timesteps, **conditioning, return_dict=False)[0]
    if args.precondition_outputs:
        model_pred = model_pred * (-sigmas) + noisy_latents
        target = latents
    else:
        target = noise - latents
    weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)
    return torch.mean(
        (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(len(target), -1), 1
    ).mean()


# ---------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(save_path: str, denoiser, optimizer, lr_scheduler, helper: SaRATrainingHelper) -> None:
    """Adapter-only checkpoint: the adapter in PEFT format plus optimizer, scheduler, SaRA-helper and RNG states."""
    # `save_training_state` writes the adapter with `model.save_pretrained`, which on a diffusers model writes the
    # whole model; point that call at the adapter-only writer while it runs, then put back what was there (the
    # instance-level save bridge peft_sara installs on adapted models).
    previous = denoiser.__dict__.get("save_pretrained")
    denoiser.save_pretrained = functools.partial(save_injected_adapter, denoiser, adapter_name=ADAPTER_NAME)
    try:
        save_training_state(save_path, denoiser, optimizer, lr_scheduler, helper)
    finally:
        if previous is None:
            del denoiser.save_pretrained
        else:
            denoiser.save_pretrained = previous


def save_adapter_hook(accelerator: Accelerator, models: list, weights: list, output_dir: str) -> None:
    """accelerate's save-state hook (DeepSpeed): write the adapter in PEFT format beside DeepSpeed's own states."""
    if accelerator.is_main_process:
        save_injected_adapter(accelerator.unwrap_model(models[0]), output_dir, adapter_name=ADAPTER_NAME)
    weights.clear()  # nothing else to write for the denoiser outside DeepSpeed's checkpoint


def checkpoint_steps(output_dir: str) -> list[int]:
    """Steps of the ``checkpoint-<step>`` folders in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [name for name in os.listdir(output_dir) if name.startswith(CHECKPOINT_PREFIX)]
    return sorted(int(name[len(CHECKPOINT_PREFIX) :]) for name in names if name[len(CHECKPOINT_PREFIX) :].isdigit())


def resolve_checkpoint(args: argparse.Namespace) -> str | None:
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


# ----------------------------------------------------------------------------------------------------- validation
def log_validation(pipe, args, accelerator, name: str, step: int) -> list[Image.Image]:
    """Generate ``num_validation_images`` with a fixed seed, save them as one PNG grid and log them to trackers."""
    logger.info(f"Validation ({name}): {args.num_validation_images} image(s) of {args.validation_prompt!r}")
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    with torch.no_grad(), accelerator.autocast():
        images = [
            pipe(
                args.validation_prompt,
                num_inference_steps=args.validation_inference_steps,
                height=args.resolution,
                width=args.resolution,
                generator=generator,
            ).images[0]
            for _ in range(args.num_validation_images)
        ]
    make_image_grid(images, rows=1, cols=len(images)).save(os.path.join(args.output_dir, f"validation-{name}.png"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(name, np.stack([np.asarray(image) for image in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(image, caption=args.validation_prompt) for image in images]}, step=step)
    return images


def append_training_details(card_path: Path, args: argparse.Namespace, config: SaRAConfig, steps: int) -> None:
    """Add how the adapter was trained (and the final validation grid, if any) to the model card."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(card_path)
    selection = (
        f"trainable_fraction={config.trainable_fraction}"
        if config.trainable_fraction
        else (f"threshold={config.threshold}")
    )
    lines = [
        "",
        "## Training",
        "",
        f"Trained with `examples/train_text_to_image_sara.py` on `{args.dataset_name or args.train_data_dir}`: "
        f"{steps} steps, batch size {args.train_batch_size} x {args.gradient_accumulation_steps} accumulation, "
        f"resolution {args.resolution}, learning rate {args.learning_rate:.3g} ({args.lr_scheduler}), "
        f"{selection}, lambda_rank={config.lambda_rank}, progressive re-selection "
        + (
            f"at step {config.progressive_step}."
            if config.progressive_step
            else f"after {config.progressive_fraction} of the steps."
            if config.progressive_fraction
            else "off."
        ),
    ]
    if args.validation_prompt and (card_path.parent / "validation-final.png").is_file():
        lines += ["", f"Validation prompt: `{args.validation_prompt}`", "", "![validation](validation-final.png)"]
    card.text = card.text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"
    card.save(card_path)


# ----------------------------------------------------------------------------------------------------------- main
def absent_components(args: argparse.Namespace) -> dict[str, None]:
    """Components the pipeline was saved without (e.g. SD3 without T5), which diffusers wants passed as None."""
    config = DiffusionPipeline.load_config(
        args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir
    )
    return {name: None for name, value in config.items() if value == [None, None]}


def main(args: argparse.Namespace) -> None:
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir)),
        # Data order depends only on (seed, epoch), so a resumed run sees the same batches as an uninterrupted one.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        from huggingface_hub import create_repo

        repo_id = create_repo(
            args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token
        ).repo_id
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # 1. The pipeline: its text encoders condition the denoiser, and it renders the validation images.
    # The VAE stays in float32: it overflows in fp16, and costs little.
    load_kwargs = {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir}
    load_kwargs.update(absent_components(args))
    vae = AutoencoderKL.from_pretrained(
        args.pretrained_model_name_or_path,
        subfolder="vae",
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
    )
    pipe = DiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, vae=vae, torch_dtype=weight_dtype, **load_kwargs
    )
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusion3Pipeline)):
        raise ValueError(
            f"This script trains StableDiffusionPipeline (SD 1.x/2.x) and StableDiffusion3Pipeline models; "
            f"{args.pretrained_model_name_or_path} is a {type(pipe).__name__}."
        )
    is_sd3 = isinstance(pipe, StableDiffusion3Pipeline)
    denoiser_name = "transformer" if is_sd3 else "unet"
    denoiser = getattr(pipe, denoiser_name)
    scheduler_cls = FlowMatchEulerDiscreteScheduler if is_sd3 else DDPMScheduler
    noise_scheduler = scheduler_cls.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision, cache_dir=args.cache_dir
    )
    if args.prediction_type is not None and not is_sd3:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    if not is_sd3:
        pipe.safety_checker = None  # validation images are for the trainer's eyes only
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    pipe.to(accelerator.device)

    # 2. The SaRA adapter, injected in place: the denoiser stays a diffusers ModelMixin.
    sara_config = SaRAConfig(
        threshold=args.threshold,
        trainable_fraction=args.trainable_fraction,
        target_modules=args.target_modules.split(",") if args.target_modules else None,
        lambda_rank=args.lambda_rank,
        rank_layers_per_step=args.rank_layers_per_step,
        rank_min_dim=args.rank_min_dim,
        progressive_fraction=args.progressive_fraction or None,
        progressive_step=args.progressive_step,
    )
    denoiser.add_adapter(sara_config, adapter_name=ADAPTER_NAME)
    if accelerator.mixed_precision in ("fp16", "bf16"):
        cast_training_params(denoiser, dtype=torch.float32)  # SaRA values train in float32 over frozen fp16 weights
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()

    if args.learning_rate is None:
        threshold = sara_config.threshold if sara_config.threshold is not None else DEFAULT_THRESHOLD
        args.learning_rate = paper_learning_rate(threshold)
        logger.info(
            f"Learning rate {args.learning_rate:.3g} = paper_learning_rate({threshold:g}) (set --learning_rate "
            "to override)"
        )
    else:
        logger.info(f"Learning rate {args.learning_rate:.3g} (from --learning_rate)")

    # 3. Optimizer, data, LR schedule and the SaRA helper (low-rank loss, progressive re-selection).
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from err
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    trainable = [param for param in denoiser.parameters() if param.requires_grad]
    optimizer = optimizer_cls(
        trainable,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    with accelerator.main_process_first():
        train_dataset = load_train_dataset(args)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        shuffle=True,
        collate_fn=collate,
        batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers,
        # Keeps the loader's own seed draw off the global RNG (whose state checkpoints restore).
        generator=torch.Generator().manual_seed(args.seed),
    )
    batches_per_epoch = math.ceil(len(train_dataset) / (args.train_batch_size * accelerator.num_processes))
    num_update_steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    helper = SaRATrainingHelper(
        denoiser, optimizer, total_steps=args.max_train_steps, adapter_name=ADAPTER_NAME, seed=args.seed
    )

    # Checkpoints: single processes and DDP use SaRA's adapter-only ones (save_training_state). DeepSpeed keeps its own
    # partitioned optimizer state: save and resume it through accelerate's save_state / load_state, with the adapter
    # written beside it in PEFT format.
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "This script checkpoints with peft_sara.training.save_training_state, which reads whole (unsharded) SaRA "
            "values: train it with DDP or DeepSpeed. FSDP2 works in your own loop (see docs/DISTRIBUTED.md)."
        )
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        if helper.progressive_step is not None:
            raise ValueError(
                "DeepSpeed optimizes flattened fp32 copies of the SaRA values, whose state progressive re-selection "
                "cannot re-order: pass --progressive_fraction 0 with DeepSpeed, or train with DDP or FSDP2."
            )
        accelerator.register_save_state_pre_hook(functools.partial(save_adapter_hook, accelerator))
        accelerator.register_for_checkpointing(helper)

    # 4. Resume. Loading writes the adapter into the SaRA values in place (their size and identity never change), so
    #    wrappers stay valid; SaRA checkpoints load before `prepare`, into the plain optimizer. Restores adapter,
    #    optimizer, scheduler, helper (global step, re-selection) and RNG states.
    checkpoint = resolve_checkpoint(args) if args.resume_from_checkpoint else None
    if args.resume_from_checkpoint and checkpoint is None:
        logger.info(f"No checkpoint in {args.output_dir}: starting a new run.")
    if checkpoint is not None and not deepspeed:
        load_training_state(checkpoint, denoiser, optimizer, lr_scheduler, helper, adapter_name=ADAPTER_NAME)

    denoiser, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        denoiser, optimizer, train_dataloader, lr_scheduler
    )
    if checkpoint is not None and deepspeed:
        accelerator.load_state(checkpoint, load_module_strict=False)  # the adapter-only module state
    if checkpoint is not None:
        logger.info(f"Resumed from {checkpoint} at step {helper.global_step}")
    global_step = helper.global_step
    if accelerator.is_main_process:
        config = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
        accelerator.init_trackers("text2image-sara", config=config)

    logger.info("***** Running training *****")
    logger.info(
        f"  Examples = {len(train_dataset)}, epochs = {args.num_train_epochs}, optimizer steps = {args.max_train_steps}"
    )
    logger.info(
        f"  Batch size per device = {args.train_batch_size}, accumulation = {args.gradient_accumulation_steps}, "
        f"total batch = {args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps}"
    )
    logger.info(
        f"  SaRA: {sara_config.selection_rule}, {helper.trainable_count():,} trainable entries, "
        f"re-selection at step {helper.progressive_step}"
    )

    first_epoch = global_step // num_update_steps_per_epoch
    batches_to_skip = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps
    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )

    # 5. Train.
    for epoch in range(first_epoch, args.num_train_epochs):
        denoiser.train()
        loader = train_dataloader
        if epoch == first_epoch and batches_to_skip:
            loader = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
        loader.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(denoiser):
                pixel_values = batch["pixel_values"].to(dtype=vae.dtype)
                if (
                    args.random_flip
                ):  # here rather than in the dataset: the draws follow the steps, so resuming is exact
                    flip = (torch.rand(len(pixel_values)) < 0.5).to(pixel_values.device).view(-1, 1, 1, 1)
                    pixel_values = torch.where(flip, pixel_values.flip(-1), pixel_values)
                captions = [
                    caption if isinstance(caption, str) else caption[int(torch.randint(len(caption), ()))]
                    for caption in batch["captions"]
                ]
                with torch.no_grad():
                    latents = vae.encode(pixel_values).latent_dist.sample()
                    shift = getattr(vae.config, "shift_factor", None) or 0.0
                    latents = ((latents - shift) * vae.config.scaling_factor).to(weight_dtype)
                conditioning = encode_prompts(pipe, captions, args, accelerator.device)
                if is_sd3:
                    loss = sd3_loss(denoiser, noise_scheduler, latents, conditioning, args)
                else:
                    loss = sd_loss(denoiser, noise_scheduler, latents, conditioning)

                total_loss = loss
                if accelerator.sync_gradients:
                    # The low-rank loss counts once per optimizer step: accelerator.backward divides every
                    # micro-batch's loss by the accumulation steps, so scale it back up.
                    total_loss = loss + helper.regularization() * args.gradient_accumulation_steps
                accelerator.backward(total_loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(
                        [p for p in denoiser.parameters() if p.requires_grad], args.max_grad_norm
                    )
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress_bar.update(1)
            if args.use_8bit_adam and helper.reselection_due():
                # Blockwise-quantized moments cannot be re-ordered entry by entry: restart them.
                unwrap_optimizer(optimizer).state.clear()
            if helper.step():  # progressive re-selection, in place: same Parameters, optimizer state re-ordered
                logger.info(f"Step {global_step}: re-selected, {helper.trainable_count():,} trainable entries left")
            logs = {
                "loss": loss.detach().item(),
                "rank_loss": helper.last_regularization,
                "lr": lr_scheduler.get_last_lr()[0],
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
                    save_checkpoint(save_path, accelerator.unwrap_model(denoiser), optimizer, lr_scheduler, helper)
                logger.info(f"Saved {save_path}")
            if accelerator.is_main_process:
                if args.validation_prompt and global_step % args.validation_steps == 0:
                    denoiser.eval()
                    log_validation(pipe, args, accelerator, f"step-{global_step}", global_step)
                    denoiser.train()
            if global_step >= args.max_train_steps:
                break

    # 6. Save the adapter (PEFT format, in unet/ or transformer/) with a model card; check it loads by rendering
    #    the final validation images from a fresh pipeline.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_sara_adapter(
            pipe,
            args.output_dir,
            adapter_name=ADAPTER_NAME,
            components=[denoiser_name],
            base_model=args.pretrained_model_name_or_path,
            repo_id=repo_id,
        )
        logger.info(f"Saved the SaRA adapter to {os.path.join(args.output_dir, denoiser_name)}")
        if args.validation_prompt and args.num_validation_images > 0:
            del pipe, denoiser  # the trained denoiser; `vae` is frozen and shared with the fresh pipeline
            fresh = DiffusionPipeline.from_pretrained(
                args.pretrained_model_name_or_path, vae=vae, torch_dtype=weight_dtype, **load_kwargs
            )
            if not is_sd3:
                fresh.safety_checker = None
            load_sara_adapter(fresh, args.output_dir, adapter_name=ADAPTER_NAME, components=[denoiser_name])
            log_validation(fresh.to(accelerator.device), args, accelerator, "final", global_step)
        append_training_details(Path(args.output_dir, "README.md"), args, sara_config, global_step)
        if args.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                ignore_patterns=[f"{CHECKPOINT_PREFIX}*", f"{args.logging_dir}/*"],
                token=args.hub_token,
            )
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
