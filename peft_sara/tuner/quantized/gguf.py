"""diffusers' GGUF base weights (``GGUFQuantizationConfig``): ``GGUFLinear`` holds a ``GGUFParameter`` of packed
``uint8`` blocks with its ``quant_type``, and dequantizes it in its forward. SaRA adds its update beside that forward.

Merging requantizes with the ``gguf`` package's quantizers where it has one (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16) and
is refused for the K- and I-quants (llama.cpp's C code makes those; the ``gguf`` package only reads them).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from . import MergeRefused


def _is_gguf_parameter(weight: torch.Tensor) -> bool:
    module = sys.modules.get("diffusers.quantizers.gguf.utils")  # imported with any GGUF-quantized diffusers model
    return module is not None and isinstance(weight, module.GGUFParameter)


def describe(base_layer: nn.Module) -> str | None:
    """``"GGUF Q8_0"`` and the like, or ``None`` for other weights."""
    weight = base_layer.weight
    return f"GGUF {weight.quant_type.name}" if _is_gguf_parameter(weight) else None


def logical_shape(base_layer: nn.Module) -> torch.Size:
    """The unpacked shape (a GGUF parameter's own shape counts bytes of packed blocks)."""
    return torch.Size(base_layer.weight.quant_shape)


def dequantized(base_layer: nn.Module) -> torch.Tensor:
    """The weight as a dense float32 tensor."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    weight = base_layer.weight.detach()
    if weight.dtype.is_floating_point:  # F32 / F16 tensors of a GGUF file are stored as they are
        return weight.as_tensor().float()
    return dequantize_gguf_tensor(weight).float()


def merge_refusal(base_layer: nn.Module) -> str | None:
    """Why a merged weight cannot be requantized to the base's quant type (the ``gguf`` package writes only some), or
    ``None``; tried on one zero block, without touching the weight."""
    import gguf
    import numpy as np

    weight = base_layer.weight
    if weight.dtype.is_floating_point:
        return None
    try:
        gguf.quants.quantize(np.zeros((1, 256), dtype=np.float32), weight.quant_type)
    except NotImplementedError:
        return _cannot_quantize(weight.quant_type)
    return None


def _cannot_quantize(quant_type) -> str:
    return (
        f"The gguf package cannot quantize to {quant_type.name} (it only reads K- and I-quants), so SaRA cannot "
        "requantize a merged weight. Keep the adapter unmerged, or merge into the unquantized model and convert "
        "it to GGUF afterwards with llama.cpp's tools."
    )


@torch.no_grad()
def requantized(base_layer: nn.Module, dense_weight: torch.Tensor) -> nn.Parameter:
    """A ``GGUFParameter`` of the base's quant type holding ``dense_weight`` quantized by the ``gguf`` package."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter

    weight = base_layer.weight
    quant_type = weight.quant_type
    if weight.dtype.is_floating_point:
        return GGUFParameter(dense_weight.to(weight.dtype), quant_type=quant_type)
    try:
        packed = gguf.quants.quantize(dense_weight.float().cpu().numpy(), quant_type)
    except NotImplementedError:
        raise MergeRefused(_cannot_quantize(quant_type)) from None
    return GGUFParameter(torch.from_numpy(packed).to(weight.device), quant_type=quant_type)


def replace_weight(base_layer: nn.Module, weight: nn.Parameter) -> nn.Parameter:
    """Install ``weight`` and return the previous one."""
    previous = base_layer.weight
    base_layer.weight = weight
    return previous
