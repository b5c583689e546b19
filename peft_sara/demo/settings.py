"""The demo's settings (:class:`DemoSettings`), the key of the pretrained-model cache and where that cache lives."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..presets import class_conditional_unet2d_config
from .data import dataset_info

CACHE_FORMAT_VERSION = 2  # bump when the pretraining code changes what a cached model contains (2: EMA weights)
LEARNING_RATE_CHOICE = (
    "Both methods run at each of `learning_rates` (the trade-off plot shows every one: a larger learning rate learns "
    "the new style faster and forgets more); the saved adapters and the sample grids come from the middle one, "
    "the same for both. The paper's 1e-3 * exp(-350 * threshold) (about 2e-4 at this model's median cutoff) is "
    "fitted to Stable Diffusion over 5,000 steps and learns little in a few hundred steps here."
)


def unet_config(dataset: str, block_out_channels: tuple[int, ...], attention_head_dim: int) -> dict[str, Any]:
    """The demo's class-conditional ``UNet2DModel`` config for ``dataset`` (:mod:`peft_sara.presets` builds it)."""
    info = dataset_info(dataset)
    return class_conditional_unet2d_config(
        info.image_size, info.channels, info.num_classes, block_out_channels, attention_head_dim
    )


# Per dataset: the model, the new style and which classes learn it.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {
        "unet_config": unet_config("digits", (32, 64), 32),
        "style": "mirrored",
        "styled_classes": (0, 1, 2, 3, 4),
        "other_classes": (5, 6, 7, 8, 9),
    },
    "photo-patches": {
        "unet_config": unet_config("photo-patches", (16, 32, 64), 32),
        "style": "bgr",
        "styled_classes": (1,),
        "other_classes": (0,),
        "pretrain_steps": 1000,
        "pretrain_batch_size": 32,
        "finetune_batch_size": 16,
    },
}


@dataclass
class DemoSettings:
    """Every knob of the demo. ``DemoSettings()`` is the default run, :meth:`quick` a tiny one for tests,
    :meth:`for_dataset` the defaults of another dataset."""

    dataset: str = "digits"
    unet_config: dict[str, Any] = field(default_factory=lambda: dict(DATASET_DEFAULTS["digits"]["unet_config"]))
    pretrain_steps: int = 1000
    pretrain_batch_size: int = 64
    pretrain_learning_rate: float = 3e-3
    pretrain_ema_decay: float = 0.995  # the base model keeps the moving average of its weights: cleaner samples
    finetune_steps: int = 100
    finetune_batch_size: int = 16
    checkpoint_every: int = 20  # held-out evaluation every this many steps: the points of the trade-off plot
    # Learning rates swept for both methods (see LEARNING_RATE_CHOICE); the middle one gives the adapters and grids.
    learning_rates: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    # SaRA: the smallest 5% of every targeted weight by |w|. A per-layer fraction rather than the paper's global
    # threshold, because a briefly trained random-init model has layer-dependent weight scales, unlike SD.
    trainable_fraction: float = 0.05
    lambda_rank: float = 5e-4  # the official training script's value
    rank_min_dim: int = 16  # the library default (64) would exclude every layer of this small UNet
    style: str = "mirrored"
    styled_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    other_classes: tuple[int, ...] = (5, 6, 7, 8, 9)
    heldout_fraction: float = 0.2
    eval_draws: int = 2  # (noise, timestep) pairs per held-out image
    sample_steps: int = 25  # DDIM steps for the sample grids
    samples_per_class: int = 8  # shown in the grids
    scored_samples_per_class: int = 20  # scored by the classifier (the first ones are the grids')
    judge_epochs: int = 12
    seed: int = 0

    @property
    def main_learning_rate(self) -> float:
        """The learning rate of the saved adapters and the sample grids: the middle of ``learning_rates``."""
        ordered = sorted(self.learning_rates)
        return ordered[(len(ordered) - 1) // 2]

    @classmethod
    def for_dataset(cls, dataset: str) -> DemoSettings:
        """The default settings on ``dataset``."""
        dataset_info(dataset)
        return cls(dataset=dataset, **{key: value for key, value in DATASET_DEFAULTS[dataset].items()})

    @classmethod
    def quick(cls, dataset: str = "digits") -> DemoSettings:
        """A tiny configuration (well under a minute on 2 CPU cores) that exercises every step."""
        small = {"digits": (16, 32), "photo-patches": (16, 16, 32)}[dataset]
        sizes = ("pretrain_steps", "pretrain_batch_size", "finetune_batch_size")
        defaults = {key: value for key, value in DATASET_DEFAULTS[dataset].items() if key not in sizes}
        defaults["unet_config"] = unet_config(dataset, small, 16)
        return cls(
            dataset=dataset,
            **defaults,
            pretrain_steps=40,
            pretrain_batch_size=32,
            finetune_steps=30,
            finetune_batch_size=16,
            checkpoint_every=10,
            learning_rates=(3e-3,),
            eval_draws=1,
            sample_steps=10,
            samples_per_class=4,
            scored_samples_per_class=4,
            judge_epochs=2,
        )


def cache_key(settings: DemoSettings) -> str:
    """Short hash of everything that determines the pretrained weights."""
    relevant = {
        "format": CACHE_FORMAT_VERSION,
        "dataset": settings.dataset,
        "unet": settings.unet_config,
        "steps": settings.pretrain_steps,
        "batch_size": settings.pretrain_batch_size,
        "learning_rate": settings.pretrain_learning_rate,
        "ema_decay": settings.pretrain_ema_decay,
        "heldout_fraction": settings.heldout_fraction,
        "seed": settings.seed,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    """``platformdirs``' user cache dir if installed, else ``$XDG_CACHE_HOME`` or ``~/.cache``; plus ``peft-sara/demo``."""
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("peft-sara")) / "demo"
    except ImportError:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "peft-sara" / "demo"
