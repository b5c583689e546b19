"""Names and values shared across peft-sara (one place for each); the tuner's own (PEFT type name, prefix, selection
default, kernel choices, config choices, tags) live in ``peft_sara.tuner.names``, which imports nothing."""

from __future__ import annotations

__version__ = "0.1.0"

# Files of an adapter folder (the same names PEFT uses) and of a training checkpoint.
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
CARD_NAME = "README.md"
TRAINING_STATE_NAME = "sara_training_state.safetensors"
DEFAULT_ADAPTER_NAME = "default"

# Pipeline components an adapter folder may hold a subfolder for; the denoisers among them.
DENOISER_COMPONENTS = ("unet", "transformer", "prior", "decoder")
KNOWN_COMPONENTS = DENOISER_COMPONENTS + ("text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder")

# Hub metadata.
DIFFUSERS_TAGS = ("diffusers", "text-to-image")
PAPER_URL = "https://arxiv.org/abs/2409.06633"
