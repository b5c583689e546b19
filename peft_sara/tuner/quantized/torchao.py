"""torchao base weights: ``quantize_`` replaces a ``Linear``'s weight by a tensor subclass (``Int8Tensor``,
``Float8Tensor``; ``AffineQuantizedTensor`` / ``LinearActivationQuantizedTensor`` in older releases), all derived
from ``TorchAOBaseTensor``. The layer keeps its own forward (torchao's kernels); SaRA adds its update beside it.

Merging is refused: the weight does not record the ``quantize_`` config it was made with, so SaRA cannot requantize
it faithfully. Merge into the float model and quantize afterwards (one rounding instead of two).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from . import MergeRefused


def _is_torchao_tensor(weight: torch.Tensor) -> bool:
    if "torchao" not in sys.modules:  # no torchao tensor exists before torchao is imported
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(weight, TorchAOBaseTensor)


def describe(base_layer: nn.Module) -> str | None:
    """``"torchao Int8Tensor"`` and the like, or ``None`` for other weights."""
    weight = base_layer.weight
    return f"torchao {type(weight).__name__}" if _is_torchao_tensor(weight) else None


def logical_shape(base_layer: nn.Module) -> torch.Size:
    """torchao tensors report their logical shape."""
    return base_layer.weight.shape


def dequantized(base_layer: nn.Module) -> torch.Tensor:
    """The weight as a dense float tensor in its original dtype."""
    weight = base_layer.weight
    original = getattr(weight, "original_weight_tensor", weight)  # LinearActivationQuantizedTensor wraps the weight
    try:
        return original.dequantize()
    except NotImplementedError as error:
        raise TypeError(
            f"The torchao {type(weight).__name__} weight of this {type(base_layer).__name__} cannot be dequantized, "
            "which SaRA needs to select its entries. Quantize with a config whose weights support `dequantize()` "
            "(Int8WeightOnlyConfig, Float8WeightOnlyConfig, ...), or add the adapter before quantizing."
        ) from error


def merge_refusal(base_layer: nn.Module) -> str | None:
    """Why a merge is refused (always: see the module docstring)."""
    return (
        f"a torchao {type(base_layer.weight).__name__} weight does not record the quantization config it was made "
        "with, so SaRA cannot requantize a merged weight. Keep the adapter unmerged (it runs beside torchao's "
        "kernels), or merge into the unquantized model and apply `torchao.quantization.quantize_` afterwards."
    )


def requantized(base_layer: nn.Module, dense_weight: torch.Tensor) -> nn.Parameter:
    """Refused: see the module docstring."""
    raise MergeRefused(merge_refusal(base_layer))


def replace_weight(base_layer: nn.Module, weight: nn.Parameter) -> nn.Parameter:
    """Install ``weight`` and return the previous one."""
    previous = base_layer.weight
    base_layer.weight = weight
    return previous
