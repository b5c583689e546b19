"""Bytes the planner computes instead of tracing: bitsandbytes-quantized base weights and 8-bit AdamW state, which
cannot run on fake tensors. Each function states the storage layout it assumes."""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn

QUANTIZATIONS = ("4bit", "8bit")
OPTIMIZERS = ("adamw", "adamw8bit")

# bitsandbytes NF4 / FP4 (diffusers' BitsAndBytesConfig default, no double quantization): two weights per byte plus
# one float32 absmax per block of 64.
NF4_BLOCK = 64
# bitsandbytes' 8-bit optimizers: blockwise-quantized moments, one float32 absmax per block of 256; tensors with
# fewer than 4096 entries keep 32-bit state.
OPTIMIZER_8BIT_BLOCK = 256
OPTIMIZER_8BIT_MIN_SIZE = 4096


def quantized_linear_weights(model: nn.Module) -> list[tuple[int, int]]:
    """(rows, numel) of the weight of every ``nn.Linear`` in ``model``: the layers a bitsandbytes config quantizes."""
    return [(module.weight.shape[0], module.weight.numel()) for module in model.modules() if type(module) is nn.Linear]


def quantized_weight_bytes(rows: int, numel: int, quantization: str) -> int:
    """Bytes of one bitsandbytes weight: 4-bit (NF4, absmax per 64) or 8-bit (LLM.int8: int8 plus a float32 scale
    per row)."""
    if quantization == "4bit":
        return math.ceil(numel / 2) + 4 * math.ceil(numel / NF4_BLOCK)
    if quantization == "8bit":
        return numel + 4 * rows
    raise ValueError(f"Unknown base quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}.")


def adamw8bit_state_bytes(numels: Iterable[int]) -> int:
    """Bytes of bitsandbytes ``AdamW8bit`` state for parameters of these sizes: two uint8 moments plus their block
    absmax, or two float32 moments below the 8-bit minimum size (the shared 256-entry quantization maps not counted)."""
    total = 0
    for numel in numels:
        if numel >= OPTIMIZER_8BIT_MIN_SIZE:
            total += 2 * (numel + 4 * math.ceil(numel / OPTIMIZER_8BIT_BLOCK))
        else:
            total += 2 * 4 * numel
    return total
