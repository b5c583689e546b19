"""Unquantized storage SaRA still cannot compute with or write into as a plain weight: 1-byte floats (fp8, as
diffusers' layerwise casting stores weights), a weight offloaded to the meta device (accelerate), and tensor types or
integer dtypes no backend claims. The layer runs its own forward; merging is refused."""

from __future__ import annotations

import torch
from peft.utils.quantization_utils import ForwardOnlyQuantizationBackend
from torch import nn

from . import StorageBackend

PLAIN_TENSOR_TYPES = (nn.Parameter, torch.Tensor)


def resolve(base_layer: nn.Module) -> StorageBackend | None:
    """The backend of such a weight, or ``None`` for a plain floating weight of 2 bytes or more."""
    weight = base_layer.weight
    if weight.is_meta:
        return Offloaded(onloadable=hasattr(base_layer, "_hf_hook"))
    if type(weight) not in PLAIN_TENSOR_TYPES or not weight.dtype.is_floating_point:
        return Unknown(weight)
    if weight.dtype.itemsize < 2:
        return OneByteFloat(weight.dtype)
    return None


class _Unwritable(StorageBackend, ForwardOnlyQuantizationBackend):
    """Storage a merge cannot be written into: PEFT's forward-only backend, readable for selection."""

    def __init__(self, reason: str) -> None:
        super().__init__(backend_name=reason)
        self.merge_refusal = (
            f"{reason}. Keep the adapter unmerged (it runs through the base layer), or load the base in a plain float "
            "dtype to merge."
        )

    @property
    def storage_reason(self) -> str:
        return self.backend_name


class OneByteFloat(_Unwritable):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__(f"the base weight is stored in {dtype}")

    def get_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return base_layer.weight.detach().float()


class Offloaded(_Unwritable):
    """A weight on the meta device. With accelerate's hook it can take a merge: PEFT's ``merge_adapter`` /
    ``merge_and_unload`` onload the layer around its merge (and write the result back to the offload map), and the
    onloaded weight resolves as plain; without a hook there is no weight to merge into."""

    def __init__(self, onloadable: bool) -> None:
        super().__init__("the base weight is on the meta device (offloaded)")
        self.supports_merge = onloadable

    def get_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        if self.supports_merge:
            raise ValueError(
                f"The weight of this {type(base_layer).__name__} is offloaded to the meta device: merge through "
                "PEFT's `merge_adapter()` / `merge_and_unload()`, which load it for the merge."
            )
        raise ValueError(
            f"The weight of this {type(base_layer).__name__} is on the meta device with no accelerate hook to load it "
            "from: SaRA must read the pre-trained weight to select entries. Load the model's weights first."
        )


class Unknown(_Unwritable):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(f"the base weight is a {type(weight).__name__} of dtype {weight.dtype} (unknown storage)")

    def get_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return base_layer.weight.detach()  # read as it is (selection by magnitude needs no more)
