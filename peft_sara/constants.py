"""Names and values shared across peft-sara (one place for each)."""

from __future__ import annotations

__version__ = "0.1.0"

# PEFT registration: `PeftType.SARA`, method name "sara", and the prefix of every per-adapter container on a layer.
PEFT_TYPE_NAME = "SARA"
METHOD_NAME = "sara"
PREFIX = "sara_"

# Selection default: the paper's global threshold (~6% of SD1.5's UNet).
DEFAULT_THRESHOLD = 2e-3

# Masked-weight kernel choices (`SaRAConfig.kernel`); the environment variable overrides the config.
KERNELS = ("auto", "triton", "reference")
KERNEL_ENV_VAR = "PEFT_SARA_KERNEL"

SAVE_DTYPES = ("float32", "float16", "bfloat16")
RANK_METHODS = ("svd", "randomized")
RANK_TARGETS = ("delta", "masked_weight")

# Files of an adapter folder (the same names PEFT uses) and of a training checkpoint.
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
CARD_NAME = "README.md"
TRAINING_STATE_NAME = "sara_training_state.safetensors"
DEFAULT_ADAPTER_NAME = "default"

# Hub metadata.
SARA_TAGS = ("sara", "peft-sara")
DIFFUSERS_TAGS = ("diffusers", "text-to-image")
PAPER_URL = "https://arxiv.org/abs/2409.06633"
