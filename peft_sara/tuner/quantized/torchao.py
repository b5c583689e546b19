"""torchao base weights: ``quantize_`` replaces a ``Linear``'s weight by a tensor subclass (``Int8Tensor``,
``Float8Tensor``; ``AffineQuantizedTensor`` / ``LinearActivationQuantizedTensor`` in older releases), all derived
from ``TorchAOBaseTensor``. The layer keeps its own forward (torchao's kernels); SaRA adds its update beside it.

PEFT's ``TorchaoBackend`` requantizes a merge with the ``quantize_`` config transformers' quantizer recorded; a weight
does not record it itself, so SaRA, which also adapts diffusers and plain models, refuses the merge: merge into the
float model and quantize afterwards (one rounding instead of two).
"""

from __future__ import annotations

import sys

import torch
from peft.utils.quantization_utils import TorchaoBackend
from torch import nn

from . import StorageBackend


def resolve(base_layer: nn.Module) -> StorageBackend | None:
    """The backend of a torchao tensor subclass weight, or ``None``."""
    if "torchao" not in sys.modules:  # no torchao tensor exists before torchao is imported
        return None
    from torchao.utils import TorchAOBaseTensor

    weight = base_layer.weight
    return Torchao(type(weight).__name__) if isinstance(weight, TorchAOBaseTensor) else None


class Torchao(StorageBackend, TorchaoBackend):
    supports_merge = False

    def __init__(self, tensor_type: str) -> None:
        super().__init__(get_apply_tensor_subclass=None)
        self.backend_name = f"torchao {tensor_type}"
        self.merge_refusal = (
            f"a {self.backend_name} weight does not record the quantization config it was made with, so SaRA cannot "
            "requantize a merged weight. Keep the adapter unmerged (it runs beside torchao's kernels), or merge into "
            "the unquantized model and apply `torchao.quantization.quantize_` afterwards."
        )

    def get_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """The weight as a dense float tensor in its original dtype."""
        weight = base_layer.weight
        original = getattr(weight, "original_weight_tensor", weight)  # LinearActivationQuantizedTensor wraps the weight
        try:
            return original.dequantize()
        except NotImplementedError as error:
            raise TypeError(
                f"The {self.backend_name} weight of this {type(base_layer).__name__} cannot be dequantized, which SaRA "
                "needs to select its entries. Quantize with a config whose weights support `dequantize()` "
                "(Int8WeightOnlyConfig, Float8WeightOnlyConfig, ...), or add the adapter before quantizing."
            ) from error

    def set_base_weight(self, peft_layer: nn.Module, weight_data: torch.Tensor) -> None:
        raise TypeError(self.merge_refusal)
