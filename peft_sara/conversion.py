"""Exporting SaRA adapters to the formats other tools read: LoRA by truncated SVD (PEFT folders, diffusers files,
kohya / A1111 / ComfyUI files), ComfyUI / A1111 ``.diff`` files and merged models; plus adapter statistics and the
paper's weight-magnitude analysis.

Like PEFT's ``tuners/lora/conversion.py``, the exporters ask each layer only for its public update
(:meth:`peft_sara.tuner.layer.SaRALayer.get_sparse_update`) through the layer walker (:func:`peft_sara.tuner.layer.sara_layers`).
The implementation lives in :mod:`peft_sara.export`; this module is the public import path::

    from peft_sara.conversion import convert_to_lora, export_adapter, save_merged

    lora = convert_to_lora(pipe, rank=16)               # factors + per-layer relative Frobenius errors
    print(lora.total_error)
    export_adapter(pipe, "style-kohya.safetensors", "kohya", rank="full")

    # no base model at hand: the adapter's files record each layer's weight shape and layout
    export_adapter(read_adapter_files("my-sara-adapter"), "style-kohya.safetensors", "kohya")
"""

from __future__ import annotations

from .export.adapter_stats import inspect_adapter
from .export.files import AdapterFiles, BaseModelRequired, read_adapter_files
from .export.formats import FORMATS, ExportResult, export_adapter
from .export.lowrank import FULL_RANK, LayerFactors, LoRAExport, convert_to_lora, parse_rank
from .export.merged import save_merged
from .export.sources import load_adapted
from .export.weight_analysis import DEFAULT_THRESHOLDS, save_histogram, small_weight_fractions, zeroing_effect

__all__ = [
    "AdapterFiles",
    "BaseModelRequired",
    "read_adapter_files",
    "FORMATS",
    "FULL_RANK",
    "DEFAULT_THRESHOLDS",
    "ExportResult",
    "LayerFactors",
    "LoRAExport",
    "convert_to_lora",
    "export_adapter",
    "inspect_adapter",
    "load_adapted",
    "parse_rank",
    "save_histogram",
    "save_merged",
    "small_weight_fractions",
    "zeroing_effect",
]
