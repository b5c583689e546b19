"""diffusers' GGUF base weights (``GGUFQuantizationConfig``; PEFT has no backend for them): ``GGUFLinear`` holds a
``GGUFParameter`` of packed ``uint8`` blocks with its ``quant_type``, and dequantizes it in its forward. SaRA adds its
update beside that forward.

Merging requantizes with the ``gguf`` package's quantizers where it has one (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16) and
is refused for the K- and I-quants (llama.cpp's C code makes those; the ``gguf`` package only reads them).
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from . import StorageBackend


def resolve(base_layer: nn.Module) -> StorageBackend | None:
    """The backend of a ``GGUFParameter`` weight, or ``None``."""
    module = sys.modules.get("diffusers.quantizers.gguf.utils")  # imported with any GGUF-quantized diffusers model
    weight = base_layer.weight
    if module is None or not isinstance(weight, module.GGUFParameter):
        return None
    return GGUF(weight)


class GGUF(StorageBackend):
    def __init__(self, weight: torch.Tensor) -> None:
        name = weight.quant_type.name
        self.backend_name = f"GGUF {name}"
        self.supports_merge = weight.dtype.is_floating_point or _can_quantize(weight.quant_type)
        self.merge_refusal = (
            f"The gguf package cannot quantize to {name} (it only reads K- and I-quants), so SaRA cannot requantize a "
            "merged weight. Keep the adapter unmerged, or merge into the unquantized model and convert it to GGUF "
            "afterwards with llama.cpp's tools."
        )

    def logical_shape(self, base_layer: nn.Module) -> torch.Size:
        return torch.Size(base_layer.weight.quant_shape)  # the parameter's own shape counts bytes of packed blocks

    def get_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """The weight as a dense float32 tensor."""
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        weight = base_layer.weight.detach()
        if weight.dtype.is_floating_point:  # F32 / F16 tensors of a GGUF file are stored as they are
            return weight.as_tensor().float()
        return dequantize_gguf_tensor(weight).float()

    @torch.no_grad()
    def set_base_weight(self, peft_layer: nn.Module, weight_data: torch.Tensor) -> None:
        """Install a ``GGUFParameter`` of the base's quant type holding ``weight_data`` quantized by ``gguf``."""
        import gguf
        from diffusers.quantizers.gguf.utils import GGUFParameter

        base_layer = peft_layer.get_base_layer()
        weight = base_layer.weight
        if weight.dtype.is_floating_point:
            base_layer.weight = GGUFParameter(weight_data.to(weight.dtype), quant_type=weight.quant_type)
            return
        packed = gguf.quants.quantize(weight_data.float().cpu().numpy(), weight.quant_type)
        base_layer.weight = GGUFParameter(torch.from_numpy(packed).to(weight.device), quant_type=weight.quant_type)


@functools.cache
def _can_quantize(quant_type) -> bool:
    """Whether the ``gguf`` package can write ``quant_type`` (it raises for the types it only reads)."""
    import gguf
    import numpy as np

    block_size, _ = gguf.GGML_QUANT_SIZES[quant_type]
    try:
        gguf.quants.quantize(np.zeros((1, block_size), dtype=np.float32), quant_type)
    except NotImplementedError:
        return False
    return True
