"""Training images for the SaRA scripts: resize and crop (with SDXL's size / crop conditioning), image folders and Hub
datasets, batches, and the random flip drawn in the training loop (so that resuming stays exact)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

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
