"""bitsandbytes 4-bit (``Params4bit``) and 8-bit (``Int8Params``) base weights: PEFT's ``Bnb4bitBackend`` /
``Bnb8bitBackend``, plus the canonical 4-bit layout on AVX512-BF16 CPUs and an unmerge that restores the previous
parameter bitwise (PEFT's LoRA subtracts and requantizes instead)."""

from __future__ import annotations

import copy

import torch
from peft.utils.integrations import get_bnb_param_type
from peft.utils.quantization_utils import Bnb4bitBackend, Bnb8bitBackend
from torch import nn

from . import StorageBackend


def resolve(base_layer: nn.Module) -> StorageBackend | None:
    """The backend of a bitsandbytes weight (told by its parameter class, no import), or ``None``."""
    kind = get_bnb_param_type(base_layer.weight)
    if kind == "4bit":
        return FourBit()
    if kind == "8bit":
        return EightBit()
    return None


class FourBit(StorageBackend, Bnb4bitBackend):
    backend_name = "bitsandbytes 4bit"

    def logical_shape(self, base_layer: nn.Module) -> torch.Size:
        return torch.Size(base_layer.weight.quant_state.shape)  # the parameter stores it packed

    def prepare(self, base_layer: nn.Module) -> None:
        """Keep the weight in its canonical (CUDA / checkpoint) layout for the adapter's life.

        On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight on the first no-grad eval forward into a CPU layout
        with bfloat16 block scales (``packing_format_for_cpu``): the dequantized weight then differs from the one SaRA
        selected from, and the repack fails for ``in_features`` below the block size. SaRA turns the repack off (the
        layer's ``support_avx512bf16_for_cpu`` switch) and unpacks a weight that was already packed, so selection,
        re-selection, merge and unmerge see the same weight on every x86 CPU.
        """
        if not hasattr(base_layer, "support_avx512bf16_for_cpu"):
            return
        base_layer.support_avx512bf16_for_cpu = False
        weight = base_layer.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)

    def get_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """The weight as a dense float tensor (a packed CPU layout is unpacked on a copy first)."""
        weight = base_layer.weight
        if not getattr(weight.quant_state, "packing_format_for_cpu", False):
            return super().get_base_weight(base_layer)
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, quant_state = _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.copy(weight.quant_state))
        return bnb.functional.dequantize_4bit(data, quant_state)

    def set_base_weight(self, peft_layer: nn.Module, weight_data: torch.Tensor) -> None:
        """Quantize ``weight_data`` into a new ``Params4bit`` of the same settings. PEFT's version edits the previous
        parameter's attributes, which SaRA keeps to restore on unmerge, so this one copies them."""
        import bitsandbytes as bnb

        base_layer = peft_layer.get_base_layer()
        weight = base_layer.weight
        settings = {name: value for name, value in vars(weight).items() if not name.startswith("_")}
        settings.update(bnb_quantized=False, requires_grad=False, quant_state=None)
        settings.pop("data", None)
        base_layer.weight = bnb.nn.Params4bit(weight_data.to("cpu"), **settings).to(weight.device)


class EightBit(StorageBackend, Bnb8bitBackend):
    backend_name = "bitsandbytes 8bit"

    def set_base_weight(self, peft_layer: nn.Module, weight_data: torch.Tensor) -> None:
        _reclaim_scales(peft_layer.get_base_layer())  # the previous parameter stays whole, for unmerge
        super().set_base_weight(peft_layer, weight_data)

    def swap_base_weight(self, base_layer: nn.Module, weight: nn.Parameter) -> nn.Parameter:
        _reclaim_scales(base_layer)
        base_layer.state.reset_grads()  # re-initialised from the installed weight on the next forward
        return super().swap_base_weight(base_layer, weight)


def _reclaim_scales(base_layer: nn.Module) -> None:
    """An 8-bit layer moves its scales from the weight into ``layer.state`` on the first forward; put them back on the
    weight, so that it is a complete parameter again once replaced."""
    weight, state = base_layer.weight, base_layer.state
    if weight.SCB is None and state.SCB is not None:
        weight.CB, weight.SCB = state.CB, state.SCB
