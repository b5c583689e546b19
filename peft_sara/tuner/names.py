"""The tuner's names and choices, in a module that imports nothing (the command line reads them before PEFT loads)."""

from __future__ import annotations

# PEFT registration: `PeftType.SARA`, method name "sara", and the prefix of every per-adapter container on a layer.
PEFT_TYPE_NAME = "SARA"
METHOD_NAME = "sara"
PREFIX = "sara_"

# Selection default: the paper's global threshold (~6% of SD1.5's UNet).
DEFAULT_THRESHOLD = 2e-3


def selection_rule(threshold: float | None, trainable_fraction: float | None) -> str:
    """How a config chooses the trainable set, in words (``SaRAConfig.selection_rule``; ``peft-sara inspect`` calls it
    on a config file's values, without PEFT)."""
    if trainable_fraction is not None:
        return f"smallest {trainable_fraction:.3g} of each weight by |w|"
    return f"|w| < {DEFAULT_THRESHOLD if threshold is None else threshold:g}"


# Masked-weight kernel choices (`peft_sara.set_sara_kernel`); the environment variable overrides them.
KERNELS = ("auto", "triton", "reference")
KERNEL_ENV_VAR = "PEFT_SARA_KERNEL"

# SaRAConfig choices.
SAVE_DTYPES = ("float32", "float16", "bfloat16")
RANK_METHODS = ("svd", "randomized")
RANK_TARGETS = ("delta", "masked_weight")

# Hub / model-card tags every SaRA-adapted model gets.
SARA_TAGS = ("sara", "peft-sara")
