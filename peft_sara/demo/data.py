"""The demo's data, all shipped with scikit-learn (no download): a seeded train / held-out split and the new styles.

Two datasets:

- ``digits``: the 1,797 8x8 grey handwritten digits of ``sklearn.datasets.load_digits``; ten classes (the digit).
- ``photo-patches``: 16x16 RGB patches of the two photos of ``sklearn.datasets.load_sample_images`` (a pagoda,
  ``china.jpg``, and a dahlia, ``flower.jpg``), each downscaled 2x; two classes (which photo). Each photo is cut into
  32x32 blocks and every block into 9 overlapping patches (stride 8), and whole blocks are held out, so no held-out
  pixel is ever seen in training.

Images are float32 tensors of shape (N, C, H, W) scaled to [-1, 1]; labels are int64 class indices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


def _thick(images: torch.Tensor) -> torch.Tensor:
    """Strokes one pixel wider (to the right and down): a max over the image and its shifted copies."""
    right = torch.nn.functional.pad(images, (1, 0, 0, 0), value=-1.0)[..., :, :-1]
    down = torch.nn.functional.pad(images, (0, 0, 1, 0), value=-1.0)[..., :-1, :]
    return torch.maximum(torch.maximum(images, right), down)


def _swap_red_blue(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] != 3:
        raise ValueError(f"The 'bgr' style swaps the red and blue channels of RGB images; got {images.shape[1]}.")
    return images.flip(1)


# The new styles the demo can teach. Each maps a batch of images in [-1, 1] to the same content drawn differently.
STYLES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "inverted": lambda images: -images,  # light on dark -> dark on light
    "mirrored": lambda images: images.flip(-1),  # left-right mirror image
    "thick": _thick,
    "bgr": _swap_red_blue,  # red and blue swapped (RGB only): the orange dahlia turns blue
}


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the demo needs to know about a dataset."""

    name: str
    class_names: tuple[str, ...]
    channels: int
    image_size: int
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        "digits",
        tuple(str(digit) for digit in range(10)),
        1,
        8,
        "scikit-learn's 1,797 8x8 grey handwritten digits (load_digits), 10 classes",
    ),
    "photo-patches": DatasetInfo(
        "photo-patches",
        ("pagoda", "dahlia"),
        3,
        16,
        "16x16 RGB patches of scikit-learn's two sample photos (load_sample_images, downscaled 2x): 1,080 patches "
        "from 32x32 blocks, 2 classes (china.jpg: pagoda, flower.jpg: dahlia)",
    ),
}


@dataclass
class ImageSplits:
    """Train and held-out images of all classes, original style."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor


DigitSplits = ImageSplits  # the name before the second dataset


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``, or a clear error."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(DATASETS)}.")
    return DATASETS[name]


def load_splits(dataset: str, heldout_fraction: float = 0.2, seed: int = 0) -> ImageSplits:
    """Train / held-out split of ``dataset`` (see the module docstring), seeded."""
    dataset_info(dataset)
    if dataset == "digits":
        return load_digit_splits(heldout_fraction, seed)
    return load_photo_patch_splits(heldout_fraction, seed)


def _require_sklearn():
    try:
        import sklearn.datasets
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("The demo needs scikit-learn for its datasets: pip install 'peft-sara[demo]'.") from error
    return sklearn.datasets


def load_digit_splits(heldout_fraction: float = 0.2, seed: int = 0) -> ImageSplits:
    """Load the 1,797 digits shipped with scikit-learn and hold out ``heldout_fraction`` of every class (seeded)."""
    digits = _require_sklearn().load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)  # pixel values are 0..16
    labels = torch.from_numpy(digits.target.astype(np.int64))
    rng = np.random.RandomState(seed)
    heldout_positions = []
    for digit in range(10):
        positions = np.flatnonzero(digits.target == digit)
        rng.shuffle(positions)
        heldout_positions.extend(positions[: round(heldout_fraction * len(positions))])
    is_heldout = torch.zeros(len(labels), dtype=torch.bool)
    is_heldout[torch.as_tensor(np.sort(heldout_positions))] = True
    return ImageSplits(images[~is_heldout], labels[~is_heldout], images[is_heldout], labels[is_heldout])


PATCH_SIZE, PATCH_STRIDE, BLOCK_SIZE = 16, 8, 32


def load_photo_patch_splits(heldout_fraction: float = 0.2, seed: int = 0) -> ImageSplits:
    """16x16 RGB patches of scikit-learn's two sample photos; whole 32x32 blocks are held out (seeded)."""
    from PIL import Image

    photos = _require_sklearn().load_sample_images().images  # china.jpg, flower.jpg: 427 x 640 x 3 uint8
    rng = np.random.RandomState(seed)
    parts: dict[bool, list[tuple[torch.Tensor, int]]] = {False: [], True: []}
    for label, photo in enumerate(photos):
        small = np.asarray(Image.fromarray(photo).resize((photo.shape[1] // 2, photo.shape[0] // 2), Image.BOX))
        pixels = torch.from_numpy(small.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        rows, columns = pixels.shape[1] // BLOCK_SIZE, pixels.shape[2] // BLOCK_SIZE
        blocks = [(row, column) for row in range(rows) for column in range(columns)]
        heldout_blocks = set(rng.permutation(len(blocks))[: round(heldout_fraction * len(blocks))].tolist())
        for position, (row, column) in enumerate(blocks):
            block = pixels[
                :, row * BLOCK_SIZE : (row + 1) * BLOCK_SIZE, column * BLOCK_SIZE : (column + 1) * BLOCK_SIZE
            ]
            patches = block.unfold(1, PATCH_SIZE, PATCH_STRIDE).unfold(2, PATCH_SIZE, PATCH_STRIDE)
            patches = patches.permute(1, 2, 0, 3, 4).reshape(-1, 3, PATCH_SIZE, PATCH_SIZE)
            parts[position in heldout_blocks].append((patches, label))

    def stack(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.cat([patches for patches, _ in items]).contiguous()
        labels = torch.cat([torch.full((len(patches),), label, dtype=torch.int64) for patches, label in items])
        return images, labels

    return ImageSplits(*stack(parts[False]), *stack(parts[True]))


def apply_style(images: torch.Tensor, style: str) -> torch.Tensor:
    """Draw ``images`` in one of :data:`STYLES`."""
    if style not in STYLES:
        raise ValueError(f"Unknown style {style!r}; choose one of {sorted(STYLES)}.")
    return STYLES[style](images)


def of_classes(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (and labels) whose label is in ``classes``."""
    keep = torch.isin(labels, torch.as_tensor(list(classes)))
    return images[keep], labels[keep]
