"""What each SaRA layer adapts, recorded in the adapter file so that exports need no base model.

Each layer's weight shape is recorded as a tensor (``peft_sara.tuner.file_format``). A shape tells a matrix (2-D) from a
convolution kernel (3-D to 5-D), but not:

- transformers' ``Conv1D``: a 2-D weight stored ``in x out``, the transpose of ``nn.Linear``'s (square ones look alike);
- a convolution's ``groups``, ``dilation`` and ``padding_mode`` (a dilated 3 x 3 kernel has the shape of a plain one);
- the model class, which decides the module path other tools' files use (``CLIPTextModel`` keeps ``text_model.``).

:func:`layouts_metadata` writes these into the safetensors header (``peft_sara_layouts``: JSON, one record per layer;
``peft_sara_model_class``); :func:`read_layouts` reads them back. Files without the header (saved by
``PeftModel.save_pretrained`` itself, or by other tools) fall back to the shape (:meth:`LayerLayout.from_shape`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from safetensors import safe_open
from torch import nn

from .tuner.file_format import normalize_module_name
from .tuner.layer import sara_layers

LAYOUTS_KEY = "peft_sara_layouts"
MODEL_CLASS_KEY = "peft_sara_model_class"
LINEAR, CONV = "linear", "conv"
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LayerLayout:
    """How a layer's weight is laid out and used, beyond its shape.

    ``kind`` is ``"linear"`` (a matrix) or ``"conv"`` (a kernel); ``transposed`` marks weights stored ``in x out``
    (transformers' ``Conv1D``); ``conv_options`` holds a convolution's non-default ``groups``, ``dilation`` and
    ``padding_mode``; ``recorded`` says whether this came from the file's record or was guessed from the shape.
    """

    kind: str
    transposed: bool = False
    conv_options: dict[str, Any] = field(default_factory=dict)
    recorded: bool = True

    @classmethod
    def of(cls, base_layer: nn.Module) -> LayerLayout:
        """The layout of a live base layer."""
        if not isinstance(base_layer, CONV_TYPES):
            return cls(LINEAR, transposed=not isinstance(base_layer, nn.Linear))
        options: dict[str, Any] = {}
        if base_layer.groups != 1:
            options["groups"] = base_layer.groups
        if any(d != 1 for d in base_layer.dilation):
            options["dilation"] = tuple(base_layer.dilation)
        if base_layer.padding_mode != "zeros":
            options["padding_mode"] = base_layer.padding_mode
        return cls(CONV, conv_options=options)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LayerLayout:
        """A layout read back from :meth:`to_record`'s JSON."""
        options = dict(record.get("conv_options", {}))
        if "dilation" in options:
            options["dilation"] = tuple(options["dilation"])
        return cls(record["kind"], bool(record.get("transposed", False)), options)

    @classmethod
    def from_shape(cls, shape: tuple[int, ...]) -> LayerLayout:
        """The layout a shape alone suggests (2-D: ``nn.Linear``, more: a plain convolution), marked unrecorded."""
        return cls(LINEAR if len(shape) == 2 else CONV, recorded=False)

    def to_record(self) -> dict[str, Any]:
        """JSON-ready form (defaults left out)."""
        record: dict[str, Any] = {"kind": self.kind}
        if self.transposed:
            record["transposed"] = True
        if self.conv_options:
            record["conv_options"] = {
                key: list(v) if isinstance(v, tuple) else v for key, v in self.conv_options.items()
            }
        return record

    def lora_problem(self, name: str) -> str | None:
        """Why a LoRA layer (PEFT's, which every LoRA reader goes through) cannot reproduce this layer's update."""
        if not self.conv_options:
            return None
        settings = ", ".join(f"{key}={value!r}" for key, value in self.conv_options.items())
        return (
            f"'{name}' (a convolution with {settings}) has no LoRA equivalent: LoRA's down convolution does not take "
            "these settings. Export with format 'diff' or merge the adapter instead."
        )


def layouts_metadata(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """The safetensors header entries recording the layout of every SaRA layer of ``adapter_name`` and the model
    class, keyed like the saved tensors (without PEFT's ``base_model.model.``)."""
    layouts = {
        normalize_module_name(name): LayerLayout.of(layer.get_base_layer()).to_record()
        for name, layer in sara_layers(model)
        if layer.present_adapters([adapter_name])
    }
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {LAYOUTS_KEY: json.dumps(layouts, sort_keys=True), MODEL_CLASS_KEY: type(inner).__name__}


def read_layouts(path: str | os.PathLike) -> tuple[dict[str, LayerLayout] | None, str | None]:
    """The layer layouts and model class a safetensors adapter file records (``None`` for what it does not)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    raw = metadata.get(LAYOUTS_KEY)
    layouts = {name: LayerLayout.from_record(record) for name, record in json.loads(raw).items()} if raw else None
    return layouts, metadata.get(MODEL_CLASS_KEY)


__all__ = ["LAYOUTS_KEY", "MODEL_CLASS_KEY", "LayerLayout", "layouts_metadata", "read_layouts"]
