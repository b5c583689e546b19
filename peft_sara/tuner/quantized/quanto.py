"""optimum-quanto base layers (PEFT has no backend for them): ``quantize(model, weights=qint8)`` turns a ``Linear`` /
``Conv`` into a ``QLinear`` / ``QConv2d`` (``QModuleMixin``) that quantizes its float weight in each forward;
``freeze(model)`` then stores the weight as a ``QTensor`` (``WeightQBytesTensor`` for qint8 / float8,
``WeightQBitsTensor`` for packed qint4 / qint2). Either way the layer must run its own forward; SaRA adds its update
beside it.

Merging requantizes with the layer's own recipe (its ``qweight``: qtype, group size and optimizer), as ``freeze``
does; a layer that is not frozen takes the merged float weight and keeps quantizing it in its forward.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from . import StorageBackend


def resolve(base_layer: nn.Module) -> StorageBackend | None:
    """The backend of an optimum-quanto layer that quantizes its weight, or ``None``."""
    if "optimum.quanto" not in sys.modules:  # no quanto layer exists before optimum.quanto is imported
        return None
    from optimum.quanto import QModuleMixin

    if not isinstance(base_layer, QModuleMixin) or base_layer.weight_qtype is None:
        return None
    return Quanto(base_layer)


class Quanto(StorageBackend):
    supports_merge = True

    def __init__(self, base_layer: nn.Module) -> None:
        state = "frozen" if base_layer.frozen else "not frozen: quantizes its float weight in each forward"
        self.backend_name = f"optimum-quanto {base_layer.weight_qtype.name} {type(base_layer).__name__} ({state})"
        self.layer_type = "linear" if isinstance(base_layer, nn.Linear) else "conv2d"

    def get_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """The stored weight as a dense float tensor: a frozen weight dequantized, a not-frozen one as it is (the float
        weight the layer quantizes, which is what merging writes to)."""
        weight = base_layer.weight.detach()
        return weight.dequantize() if base_layer.frozen else weight

    @torch.no_grad()
    def set_base_weight(self, peft_layer: nn.Module, weight_data: torch.Tensor) -> None:
        """Store ``weight_data`` as the layer stores its weight: quantized by the layer's own ``qweight`` recipe if the
        layer is frozen, float otherwise."""
        base_layer = peft_layer.get_base_layer()
        previous = base_layer.weight
        dense = nn.Parameter(weight_data.to(device=previous.device, dtype=previous.dtype), requires_grad=False)
        if base_layer.frozen:
            base_layer._parameters["weight"] = dense  # `qweight` quantizes the float weight it finds
            try:
                dense = nn.Parameter(base_layer.qweight, requires_grad=False)
            finally:
                base_layer._parameters["weight"] = previous
        base_layer.weight = dense
