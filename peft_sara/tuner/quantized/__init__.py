"""Quantized base weights, one module per backend (as PEFT puts each LoRA integration in its own file).

Each backend module answers the same five questions about a base layer; :mod:`peft_sara.tuner.base_weight` asks them
through one dispatch and knows no backend itself:

* ``describe(base_layer) -> str | None``: what stores the layer's weight ("torchao Int8Tensor"), or ``None`` when this
  backend does not. A backend library that was never imported stores nothing, so none is imported to answer.
* ``logical_shape(base_layer) -> torch.Size``: the shape of the weight the layer computes with (packed storage
  differs), which SaRA's flat indices address.
* ``dequantized(base_layer) -> torch.Tensor``: that weight as a dense floating tensor, for reading only.
* ``requantized(base_layer, dense_weight) -> nn.Parameter``: a new parameter of the base's storage holding
  ``dense_weight`` (rounding applies), for merging; raises :class:`MergeRefused` where the backend cannot requantize.
* ``replace_weight(base_layer, weight) -> nn.Parameter``: install ``weight``, return the previous parameter intact.

| backend | storage | merge |
| --- | --- | --- |
| :mod:`.bnb` | bitsandbytes 4-bit / 8-bit | requantized |
| :mod:`.torchao` | torchao tensor subclasses (int8, float8, ...) | refused |
| :mod:`.quanto` | optimum-quanto ``QModuleMixin`` layers (qint8, qint4, ...) | requantized by the layer's own recipe |
| :mod:`.gguf` | diffusers' ``GGUFParameter`` | requantized for Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / BF16, else refused |
"""

from __future__ import annotations


class MergeRefused(TypeError):
    """The backend cannot write a merged weight back into its storage; the message says why and what to do."""


__all__ = ["MergeRefused"]
