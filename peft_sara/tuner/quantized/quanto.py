"""optimum-quanto base layers: ``quantize(model, weights=qint8)`` turns a ``Linear`` / ``Conv`` into a ``QLinear`` /
``QConv2d`` (``QModuleMixin``) that quantizes its float weight in each forward; ``freeze(model)`` then stores the
weight as a ``QTensor`` (``WeightQBytesTensor`` for qint8 / float8, ``WeightQBitsTensor`` for packed qint4 / qint2).
Either way the layer must run its own forward; SaRA adds its update beside it.

Merging requantizes with the layer's own recipe (its ``qweight``: qtype, group size and optimizer), as ``freeze``
does; a layer that is not frozen takes the merged float weight and keeps quantizing it in its forward.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _quanto_module(base_layer: nn.Module) -> bool:
    if "optimum.quanto" not in sys.modules:  # no quanto layer exists before optimum.quanto is imported
        return False
    from optimum.quanto import QModuleMixin

    return isinstance(base_layer, QModuleMixin) and base_layer.weight_qtype is not None


def describe(base_layer: nn.Module) -> str | None:
    """``"optimum-quanto qint8 QLinear (frozen)"`` and the like, or ``None`` for other layers."""
    if not _quanto_module(base_layer):
        return None
    state = "frozen" if base_layer.frozen else "not frozen: quantizes its float weight in each forward"
    return f"optimum-quanto {base_layer.weight_qtype.name} {type(base_layer).__name__} ({state})"


def logical_shape(base_layer: nn.Module) -> torch.Size:
    """quanto tensors report their logical shape (packed qint4 data included)."""
    return base_layer.weight.shape


def dequantized(base_layer: nn.Module) -> torch.Tensor:
    """The stored weight as a dense float tensor: a frozen weight dequantized, a not-frozen one as it is (the float
    weight the layer quantizes, which is what merging writes to)."""
    weight = base_layer.weight.detach()
    return weight.dequantize() if base_layer.frozen else weight


@torch.no_grad()
def requantized(base_layer: nn.Module, dense_weight: torch.Tensor) -> nn.Parameter:
    """A parameter holding ``dense_weight`` as the layer stores it: quantized by the layer's own ``qweight`` recipe if
    the layer is frozen, float otherwise."""
    previous = base_layer.weight
    dense = nn.Parameter(dense_weight.to(device=previous.device, dtype=previous.dtype), requires_grad=False)
    if not base_layer.frozen:
        return dense
    base_layer._parameters["weight"] = dense  # `qweight` quantizes the float weight it finds
    try:
        return nn.Parameter(base_layer.qweight, requires_grad=False)
    finally:
        base_layer._parameters["weight"] = previous


def replace_weight(base_layer: nn.Module, weight: nn.Parameter) -> nn.Parameter:
    """Install ``weight`` and return the previous one."""
    previous = base_layer.weight
    base_layer.weight = weight
    return previous
