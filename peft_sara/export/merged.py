"""Full merged models: a pipeline or a component with a SaRA adapter baked into its weights, saved with
``save_pretrained`` (safetensors), published as one unit by ``peft_sara.atomic.folder_writer``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..atomic import folder_writer
from ..tuner.base_weight import one_merge_warning
from .sources import ExportSource, adapter_layers, is_pipeline, live_source


def save_merged(
    source: Any,
    output_dir: str | os.PathLike,
    adapter_name: str | None = None,
    max_shard_size: str | int | None = None,
) -> Path:
    """Save ``source`` with the SaRA adapter merged into its weights, as a plain model any tool loads.

    ``source`` is a ``DiffusionPipeline`` (saved whole, ``model_index.json`` included), a ``PeftModel`` or a model with
    an injected adapter (saved as the plain base class). The source is left as it was: the adapter is unmerged again
    (bitwise) unless it was already fused. Other adapters are not included.
    """
    return write_merged(live_source(source, adapter_name), output_dir, max_shard_size)


def write_merged(source: ExportSource, output_dir: str | os.PathLike, max_shard_size: str | int | None = None) -> Path:
    """:func:`save_merged` of a resolved source: every adapted component of ``source.model`` gets the adapter merged
    in, then the model is saved and the adapter unmerged again."""
    if source.model is None:
        raise ValueError("A merged model needs the base model: load it with the adapter and export that instead.")
    model, modules, adapter_name = source.model, source.modules, source.adapter_name
    others = sorted(
        {
            name
            for module in modules.values()
            for _, layer in adapter_layers(module, adapter_name)
            for name in layer.merged_adapters
            if name != adapter_name
        }
    )
    if others:
        raise ValueError(
            f"Adapters {others} are fused into the weights as well: unfuse them first (`pipe.unfuse_lora()` / "
            "`unmerge_adapter()`), so the merged model holds only the adapter you export."
        )
    merged_here = []
    with one_merge_warning():
        for module in modules.values():
            for _, layer in adapter_layers(module, adapter_name):
                if adapter_name not in layer.merged_adapters:
                    layer.merge(adapter_names=[adapter_name])
                    merged_here.append(layer)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    try:
        with folder_writer(output_dir) as staging:
            if is_pipeline(model):
                components = [part for part in model.components.values() if isinstance(part, nn.Module)]
                with base_layers_in_place(*components):
                    model.save_pretrained(str(staging), **kwargs)
            else:
                inner = model.get_base_model() if isinstance(model, PeftModel) else model
                _save_plain(inner, str(staging), kwargs)
    finally:
        for layer in merged_here:
            layer.unmerge()
    return Path(output_dir)


def _save_plain(model: nn.Module, folder: str, kwargs: dict[str, Any]) -> None:
    """``save_pretrained`` of the model's own class with every tuner layer replaced by its (merged) base layer."""
    if not hasattr(type(model), "save_pretrained"):
        raise TypeError(
            f"{type(model).__name__} has no `save_pretrained`: merge with `merge_and_unload()` and save it yourself."
        )
    with base_layers_in_place(model):
        model.save_pretrained(folder, **kwargs)


@contextlib.contextmanager
def base_layers_in_place(*models: nn.Module) -> Iterator[None]:
    """Inside the block, every PEFT tuner layer of ``models`` is replaced in its parent by its base layer (public
    ``nn.Module`` attribute assignment; no method is patched), so ``save_pretrained`` writes the plain model: the
    base weights, merged where adapters are merged. Everything is put back on exit, the same module objects."""
    swapped = []
    for model in models:
        for name, layer in list(model.named_modules()):
            if isinstance(layer, BaseTunerLayer) and hasattr(layer, "base_layer") and name:
                parent_name, _, child_name = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                if getattr(parent, child_name, None) is layer:
                    swapped.append((parent, child_name, layer))
    try:
        for parent, child_name, layer in swapped:
            setattr(parent, child_name, layer.get_base_layer())
        yield
    finally:
        for parent, child_name, layer in reversed(swapped):
            setattr(parent, child_name, layer)


__all__ = ["base_layers_in_place", "save_merged", "write_merged"]
