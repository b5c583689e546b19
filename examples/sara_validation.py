"""Validation in the SaRA scripts: outputs of the validation prompt from a fixed seed, saved as a grid and logged to
the trackers (tensorboard, wandb)."""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import DiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image
from sara_models import FLOW_MATCHING, pipeline_kind
from tqdm.auto import tqdm

logger = get_logger(__name__, log_level="INFO")


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
