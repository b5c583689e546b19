"""Scaling and combining SaRA adapters (paper App. F/G): strengths, weighted sums of sparse updates."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .export.sources import is_pipeline
from .pipelines import inject_sara_adapter, pipeline_modules
from .transaction import all_or_nothing
from .tuner.layer import sara_layers


def set_adapter_strength(model: nn.Module, strength: float, adapter_name: str | None = None) -> None:
    """Apply an adapter at ``strength`` (0 = base model, 1 = as trained, >1 = exaggerated) in every layer."""
    for _, layer in sara_layers(model):
        names = [adapter_name] if adapter_name is not None else layer.active_adapters
        for name in names:
            layer.set_scale(name, strength)


def combine_adapters(
    model: Any,
    adapter_names: Sequence[str],
    weights: Sequence[float],
    new_adapter_name: str,
) -> None:
    """Add ``new_adapter_name``: the weighted sum of the given adapters' sparse updates on the union of supports.

    ``model`` is a ``DiffusionPipeline`` (every component holding one of the adapters gets the combination of those
    it holds), a component with adapters loaded by ``load_sara_adapter`` or ``add_adapter``, or a ``PeftModel``. The
    new adapter has a config like its sources', so it saves like them (``save_sara_adapter(pipe, ...,
    adapter_name=new_adapter_name)``, ``save_pretrained(..., selected_adapters=[new_adapter_name])``). Which adapters
    are active does not change: activate the new one with ``pipe.set_adapters`` / ``set_adapter``. Trainable and
    frozen entries of the sources all become trainable entries of the new adapter.
    """
    if len(adapter_names) != len(weights) or not adapter_names:
        raise ValueError(f"Pass one weight per adapter: got {len(adapter_names)} adapters and {len(weights)} weights.")
    modules = list(pipeline_modules(model).values()) if is_pipeline(model) else [model]
    loaded = {name for module in modules for name in getattr(module, "peft_config", None) or {}}
    missing = [name for name in adapter_names if name not in loaded]
    if missing:
        raise ValueError(f"Unknown adapter(s) {missing}; available: {sorted(loaded)}.")
    if new_adapter_name in loaded:
        raise ValueError(f"Adapter '{new_adapter_name}' already exists; choose a new name.")
    weight_of = dict(zip(adapter_names, weights))
    with all_or_nothing(*modules):  # a refusal in a later component leaves the earlier ones as they were
        for module in modules:
            present = [name for name in adapter_names if name in (getattr(module, "peft_config", None) or {})]
            if present:
                _combine_in(module, {name: weight_of[name] for name in present}, new_adapter_name)


def _combine_in(module: nn.Module, weight_of: dict[str, float], new_adapter_name: str) -> None:
    """:func:`combine_adapters` for one ``PeftModel`` or component holding every adapter of ``weight_of``."""
    inner = module.base_model.model if isinstance(module, PeftModel) else module
    combined_per_layer: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in sara_layers(inner):
        parts_indices, parts_values = [], []
        for adapter in layer.present_adapters(list(weight_of)):
            update = layer.get_sparse_update(adapter)  # trainable and frozen entries
            parts_indices.append(update.indices)
            parts_values.append(update.values * weight_of[adapter])
        if parts_indices:
            union, inverse = torch.unique(torch.cat(parts_indices), return_inverse=True)
            summed = torch.zeros(union.numel(), dtype=torch.float32, device=union.device)
            summed.index_add_(0, inverse, torch.cat(parts_values))
            combined_per_layer[name] = (union, summed)

    config = copy.deepcopy(module.peft_config[next(iter(weight_of))])
    config.target_modules = set(combined_per_layer)
    config.exclude_modules = None
    config.layers_to_transform = None
    config.layers_pattern = None
    if isinstance(module, PeftModel):
        module.add_adapter(new_adapter_name, config)
    else:
        active = next((layer.active_adapters for _, layer in sara_layers(module)), [])
        training = any(param.requires_grad for name, param in module.named_parameters() if "sara_" in name)
        inject_sara_adapter(module, config, new_adapter_name)  # activates the new adapter, as `add_adapter` does
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.set_adapter(active, inference_mode=not training)
    for name, layer in sara_layers(inner):
        if name in combined_per_layer and new_adapter_name in layer.sara_values:
            layer.set_trainable_entries(new_adapter_name, *combined_per_layer[name])


__all__ = ["set_adapter_strength", "combine_adapters"]
