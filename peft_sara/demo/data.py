"""The demo's data: scikit-learn's 8x8 handwritten digits, a seeded train / held-out split, and the new styles.

Images are float32 tensors of shape (N, 1, 8, 8) scaled to [-1, 1] (ink is +1, paper is -1); labels are int64 class
indices (the digit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# The new styles the demo can teach. Each maps a batch of images in [-1, 1] to the same digits drawn differently.
STYLES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # light digits on dark paper -> dark digits on light paper
    "inverted": lambda images: -images,
    # left-right mirror image
    "mirrored": lambda images: images.flip(-1),
    # strokes one pixel wider (to the right and down): a max over the image and its shifted copies
    "thick": lambda images: torch.maximum(
        torch.maximum(images, torch.nn.functional.pad(images, (1, 0, 0, 0), value=-1.0)[..., :, :-1]),
        torch.nn.functional.pad(images, (0, 0, 1, 0), value=-1.0)[..., :-1, :],
    ),
}


@dataclass
class DigitSplits:
    """Train and held-out images of all ten classes, original style."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor


def load_digit_splits(heldout_fraction: float = 0.2, seed: int = 0) -> DigitSplits:
    """Load the 1,797 digits shipped with scikit-learn and hold out ``heldout_fraction`` of every class (seeded)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("The demo needs scikit-learn for its dataset: pip install 'peft-sara[demo]'.") from error
    digits = load_digits()
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
    return DigitSplits(images[~is_heldout], labels[~is_heldout], images[is_heldout], labels[is_heldout])


def apply_style(images: torch.Tensor, style: str) -> torch.Tensor:
    """Draw ``images`` in one of :data:`STYLES`."""
    if style not in STYLES:
        raise ValueError(f"Unknown style {style!r}; choose one of {sorted(STYLES)}.")
    return STYLES[style](images)


def of_classes(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (and labels) whose label is in ``classes``."""
    keep = torch.isin(labels, torch.as_tensor(list(classes)))
    return images[keep], labels[keep]
