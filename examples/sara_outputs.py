"""What a SaRA training run shows and writes: validation outputs of the validation prompt from a fixed seed (saved
as a grid, logged to the trackers: tensorboard, wandb) and, at the end, the adapter (PEFT format, one folder per
component) with its model card and the optional LoRA export (:func:`peft_sara.training.save_trained_adapter`), the
final validation from a fresh pipeline with the saved adapter loaded, and the push to the Hub."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import DiffusionPipeline
from diffusers.utils import make_image_grid
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from sara_models import FLOW_MATCHING, pipeline_kind
from tqdm.auto import tqdm

from peft_sara import SaRAConfig, load_sara_adapter
from peft_sara.conversion import ExportResult
from peft_sara.training import (
    CHECKPOINT_PREFIX,
    DEFAULT_ADAPTER_NAME,
    TrainedComponent,
    recorded_base_model,
    save_trained_adapter,
)

logger = get_logger(__name__, log_level="INFO")


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


# ------------------------------------------------------------------------------------------------ end of training


def create_hub_repo(args: argparse.Namespace, accelerator: Accelerator) -> str | None:
    """The Hub repo the run pushes to (created now, so a bad token fails before training), or None."""
    if not (args.push_to_hub and accelerator.is_main_process):
        return None
    api = HfApi(token=args.hub_token)
    return api.create_repo(args.hub_model_id or Path(args.output_dir).name, exist_ok=True).repo_id


def save_outputs(
    args: argparse.Namespace, pipe: DiffusionPipeline, components: Sequence[TrainedComponent], repo_id: str | None
) -> ExportResult | None:
    """Save the adapter (one PEFT folder per component, ``unet/`` ...) with a model card; with ``--export_lora_rank``
    also ``pytorch_lora_weights.safetensors``, the same update as a LoRA that ``pipe.load_lora_weights`` reads."""
    names = [component.name for component in components]
    export = save_trained_adapter(
        pipe,
        args.output_dir,
        names,
        adapter_name=DEFAULT_ADAPTER_NAME,
        base_model=recorded_base_model(args.pretrained_model_name_or_path),
        repo_id=repo_id,
        export_lora_rank=args.export_lora_rank,
    )
    logger.info(f"Saved the SaRA adapter to {args.output_dir} ({', '.join(names)})")
    if export is not None:
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
        load_sara_adapter(fresh, args.output_dir, adapter_name=DEFAULT_ADAPTER_NAME, components=names)
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
