"""Exporting SaRA adapters to the formats other tools read (LoRA by truncated SVD, kohya, ComfyUI ``.diff``, merged
models).

Home of the interop issue's exporters. They are built only on the layer's public update API
(:meth:`peft_sara.layer.SaRALayer.get_sparse_update`, :meth:`~peft_sara.layer.SaRALayer.get_delta_weight`) and the
layer walker (:func:`peft_sara.layer.sara_layers`), never on layer internals. Nothing is exported yet.
"""

from __future__ import annotations

__all__: list[str] = []
