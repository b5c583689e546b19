"""Base-weight storage SaRA cannot compute with as a plain dense tensor, one module per backend (as PEFT puts each LoRA
integration in its own file), each giving PEFT's :class:`~peft.utils.quantization_utils.QuantizationBackend` interface.

A SaRA layer resolves its base weight's backend once (:func:`peft_sara.tuner.base_weight.resolve_storage_backend`, at
creation and again only when the weight object is replaced or cast) and keeps it as ``layer.quantization_backend``, the
attribute PEFT's LoRA layers declare; ``None`` is a plain floating weight. A backend answers, from PEFT's interface,
``backend_name``, ``supports_merge``, ``get_base_weight`` (the dense weight, to read) and ``set_base_weight`` (write a
merged dense weight back, requantized), and, for SaRA, :class:`StorageBackend`'s ``logical_shape`` (what the flat indices
address), ``merge_refusal`` (why a merge is refused), ``swap_base_weight`` (install a saved parameter bitwise, for
unmerge) and ``prepare`` (keep the layout fixed for the adapter's life).

| module | storage | PEFT class used | merge |
| --- | --- | --- | --- |
| :mod:`.bnb` | bitsandbytes 4-bit / 8-bit | ``Bnb4bitBackend`` / ``Bnb8bitBackend`` | requantized |
| :mod:`.torchao` | torchao tensor subclasses (int8, float8, ...) | ``TorchaoBackend`` | refused |
| :mod:`.quanto` | optimum-quanto ``QModuleMixin`` layers (qint8, qint4, ...) | (none in PEFT) | requantized by the layer's recipe |
| :mod:`.gguf` | diffusers' ``GGUFParameter`` | (none in PEFT) | requantized for Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / BF16 |
| :mod:`.storage` | 1-byte floats (fp8), the meta device, unknown tensor types | (none in PEFT) | refused |

A backend's library is imported only once a weight of its kind exists (none is imported to say "not mine").
"""

from __future__ import annotations

import torch
from peft.utils.quantization_utils import QuantizationBackend
from torch import nn


class StorageBackend(QuantizationBackend):
    """What SaRA asks of a backend beyond PEFT's :class:`QuantizationBackend` (mixed in before PEFT's concrete classes,
    so their ``get_base_weight`` / ``set_base_weight`` stay in force unless a backend overrides them)."""

    layer_type = "linear"
    # Why a merge is refused (and what to do instead), for backends with `supports_merge = False`.
    merge_refusal: str = ""

    @property
    def storage_reason(self) -> str:
        """Why the layer must run its own forward, for messages: ``"the base weight is stored by torchao Int8Tensor"``."""
        return f"the base weight is stored by {self.backend_name}"

    def logical_shape(self, base_layer: nn.Module) -> torch.Size:
        """Shape of the weight the layer computes with, which SaRA's flat indices address (packed storage differs)."""
        return base_layer.weight.shape

    def prepare(self, base_layer: nn.Module) -> None:
        """Make the weight's layout stay fixed while an adapter lives on it (nothing to do for most backends)."""

    def swap_base_weight(self, base_layer: nn.Module, weight: nn.Parameter) -> nn.Parameter:
        """Install ``weight`` (a parameter of this storage, as it was) and return the previous one, intact."""
        previous = base_layer.weight
        base_layer.weight = weight
        return previous


__all__ = ["StorageBackend"]
