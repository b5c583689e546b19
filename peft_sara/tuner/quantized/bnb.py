"""bitsandbytes 4-bit (``Params4bit``) and 8-bit (``Int8Params``) base weights: dequantized with PEFT's helper,
requantized into a new parameter of the same type on merge."""

from __future__ import annotations

import copy

import torch
from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type
from torch import nn

try:  # optional: only needed for quantized base layers
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # see keep_canonical_layout
except ImportError:  # pragma: no cover - bitsandbytes is installed in CI
    bnb = _convert_weight_packed_for_cpu_inverse = None


def describe(base_layer: nn.Module) -> str | None:
    """``"bitsandbytes 4bit"`` / ``"bitsandbytes 8bit"``, or ``None`` for other weights."""
    kind = get_bnb_param_type(base_layer.weight)
    return f"bitsandbytes {kind}" if kind else None


def logical_shape(base_layer: nn.Module) -> torch.Size:
    """Shape of the weight the layer computes with (a 4-bit parameter stores it packed)."""
    weight = base_layer.weight
    if get_bnb_param_type(weight) == "4bit":
        return torch.Size(weight.quant_state.shape)
    return weight.shape


def keep_canonical_layout(base_layer: nn.Module) -> None:
    """Keep a bitsandbytes 4-bit weight in its canonical (CUDA / checkpoint) layout for the adapter's life.

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight on the first no-grad eval forward into a CPU layout
    with bfloat16 block scales (``packing_format_for_cpu``): the dequantized weight then differs from the one SaRA
    selected from, and the repack fails for ``in_features`` below the block size. SaRA turns the repack off on the
    layers it adapts (the layer's ``support_avx512bf16_for_cpu`` switch) and unpacks a weight that was already packed,
    so selection, re-selection, merge and unmerge see the same weight on every x86 CPU.
    """
    if not hasattr(base_layer, "support_avx512bf16_for_cpu"):
        return
    base_layer.support_avx512bf16_for_cpu = False
    weight = base_layer.weight
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def dequantized(base_layer: nn.Module) -> torch.Tensor:
    """The weight as a dense float tensor (a packed CPU 4-bit layout is unpacked on a copy first)."""
    weight = base_layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if getattr(quant_state, "packing_format_for_cpu", False):
        data, quant_state = _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.copy(quant_state))
        return bnb.functional.dequantize_4bit(data, quant_state)
    return dequantize_bnb_weight(weight, state=getattr(base_layer, "state", None))


def requantized(base_layer: nn.Module, dense_weight: torch.Tensor) -> nn.Parameter:
    """A new parameter of the base weight's bitsandbytes type holding ``dense_weight`` quantized."""
    weight = base_layer.weight
    if get_bnb_param_type(weight) == "4bit":
        settings = {name: value for name, value in vars(weight).items() if not name.startswith("_")}
        settings.update(bnb_quantized=False, requires_grad=False, quant_state=None)
        settings.pop("data", None)
        return bnb.nn.Params4bit(dense_weight.to("cpu"), **settings).to(weight.device)
    quantized = bnb.nn.Int8Params(dense_weight.to("cpu"), requires_grad=False, has_fp16_weights=weight.has_fp16_weights)
    return quantized.to(weight.device)


def replace_weight(base_layer: nn.Module, weight: nn.Parameter) -> nn.Parameter:
    """Install ``weight`` and return the previous one, intact: an 8-bit layer moves its scales from the weight into
    ``layer.state`` on the first forward, so they go back onto the old weight and the state is reset to be
    re-initialised from the new one."""
    previous = base_layer.weight
    state = getattr(base_layer, "state", None)
    if get_bnb_param_type(previous) == "8bit" and state is not None:
        if previous.SCB is None and state.SCB is not None:
            previous.CB, previous.SCB = state.CB, state.SCB
        state.CB = state.SCB = None
    base_layer.weight = weight
    return previous
