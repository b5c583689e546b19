"""A small image classifier that scores generated samples: which class, drawn in which style.

It is trained on the real training images of every class in both styles (the original one and the new one), so one
label is a (class, style) pair: ``label = class + num_classes * styled``. A sample of a fine-tuned class counts as
right when the classifier sees that class in the new style; a sample of an untouched class when it sees that class in
the original style (so a model that leaks the new style into the other classes loses accuracy there too). Its
penultimate activations are the feature space of the Fréchet distance between generated and real images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

FEATURE_DIM = 32


class Judge(nn.Module):
    """Two convolutions, a global-average-pooled 4x4 map and a small MLP; ``features`` is the penultimate layer."""

    def __init__(self, channels: int, num_labels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, FEATURE_DIM),
            nn.SiLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_labels)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, FEATURE_DIM)."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def judge_labels(labels: torch.Tensor, num_classes: int, styled: bool) -> torch.Tensor:
    """The (class, style) label of images of ``labels`` drawn in the new style (``styled``) or the original one."""
    return labels + num_classes * int(styled)


@dataclass
class TrainedJudge:
    """The classifier, its number of classes and its accuracy on the held-out real images (both styles)."""

    model: Judge
    num_classes: int
    heldout_accuracy: float

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor, styled: bool) -> float:
        """Share of ``images`` classified as their class in the expected style."""
        predicted = self.model.eval()(images).argmax(1)
        return float((predicted == judge_labels(labels, self.num_classes, styled)).float().mean())

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """Feature vectors of ``images`` as float64 numpy (for :func:`frechet_distance`)."""
        return self.model.eval().features(images).double().numpy()


def train_judge(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    heldout_images: torch.Tensor,
    heldout_labels: torch.Tensor,
    num_classes: int,
    style,
    *,
    epochs: int = 12,
    batch_size: int = 64,
    seed: int = 0,
) -> TrainedJudge:
    """Train the classifier on the real training images in both styles (``style`` maps images to the new style)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images = torch.cat([train_images, style(train_images)])
    labels = torch.cat([train_labels, train_labels + num_classes])
    model = Judge(train_images.shape[1], 2 * num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * -(-len(labels) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            batch = order[start : start + batch_size]
            # light augmentation: one-pixel shifts, so the judge does not hinge on exact positions
            shift = [int(value) for value in torch.randint(-1, 2, (2,), generator=generator)]
            batch_images = torch.roll(images[batch], shifts=shift, dims=(-2, -1))
            loss = nn.functional.cross_entropy(model(batch_images), labels[batch])
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    judge = TrainedJudge(model.eval(), num_classes, 0.0)
    real = torch.cat([heldout_images, style(heldout_images)])
    real_labels = torch.cat([heldout_labels, heldout_labels + num_classes])
    with torch.no_grad():
        judge.heldout_accuracy = float((model(real).argmax(1) == real_labels).float().mean())
    return judge


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets: ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a
    S_b)^1/2)`` (the FID formula, here in the judge's feature space)."""
    from scipy import linalg

    mean_a, mean_b = features_a.mean(0), features_b.mean(0)
    ridge = 1e-6 * np.eye(features_a.shape[1])  # keeps the product non-singular when samples are few
    cov_a, cov_b = np.cov(features_a, rowvar=False) + ridge, np.cov(features_b, rowvar=False) + ridge
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    root = root.real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def sample_scores(
    judge: TrainedJudge,
    samples: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    references: dict[str, torch.Tensor],
) -> dict[str, float]:
    """The judge's accuracy on the samples of each class group (fine-tuned classes: expected in the new style;
    other classes: in the original style) and the Fréchet distance of their features to the real ``references``."""
    scores = {}
    for group, styled in (("styled_classes", True), ("other_classes", False)):
        scores[f"{group}_accuracy"] = judge.accuracy(samples[group], labels[group], styled)
        scores[f"{group}_frechet"] = frechet_distance(judge.features(samples[group]), judge.features(references[group]))
    return scores
