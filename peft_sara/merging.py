"""Scaling and combining SaRA adapters (paper App. F/G): strengths, weighted sums of sparse updates."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .layer import sara_layers


def set_adapter_strength(model: nn.Module, strength: float, adapter_name: str | None = None) -> None:
    """Apply an adapter at ``strength`` (0 = base model, 1 = as trained, >1 = exaggerated) in every layer."""
    for _, layer in sara_layers(model):
        names = [adapter_name] if adapter_name is not None else layer.active_adapters
        for name in names:
            layer.set_scale(name, strength)


def combine_adapters(
    model: nn.Module,
    adapter_names: Sequence[str],
    weights: Sequence[float],
    new_adapter_name: str,
) -> None:
    """Add ``new_adapter_name``: the weighted sum of the given adapters' sparse updates on the union of supports.

    ``model`` must be a ``PeftModel`` (so the new adapter gets a config and can be saved with
    ``save_pretrained(..., selected_adapters=[new_adapter_name])``). Trainable and frozen entries of the sources all
    become trainable entries of the new adapter.
    """
    if len(adapter_names) != len(weights) or not adapter_names:
        raise ValueError(f"Pass one weight per adapter: got {len(adapter_names)} adapters and {len(weights)} weights.")
    configs = getattr(model, "peft_config", {})
    missing = [name for name in adapter_names if name not in configs]
    if missing:
        raise ValueError(f"Unknown adapter(s) {missing}; available: {sorted(configs)}.")
    if new_adapter_name in configs:
        raise ValueError(f"Adapter '{new_adapter_name}' already exists; choose a new name.")

    weight_of = dict(zip(adapter_names, weights))
    combined_per_layer: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in sara_layers(model.base_model.model):
        parts_indices, parts_values = [], []
        for adapter in layer.present_adapters(list(adapter_names)):
            update = layer.get_sparse_update(adapter)  # trainable and frozen entries
            parts_indices.append(update.indices)
            parts_values.append(update.values * weight_of[adapter])
        if parts_indices:
            union, inverse = torch.unique(torch.cat(parts_indices), return_inverse=True)
            summed = torch.zeros(union.numel(), dtype=torch.float32, device=union.device)
            summed.index_add_(0, inverse, torch.cat(parts_values))
            combined_per_layer[name] = (union, summed)

    config = copy.deepcopy(configs[adapter_names[0]])
    config.target_modules = set(combined_per_layer)
    config.exclude_modules = None
    config.layers_to_transform = None
    config.layers_pattern = None
    model.add_adapter(new_adapter_name, config)
    for name, layer in sara_layers(model.base_model.model):
        if name in combined_per_layer and new_adapter_name in layer.sara_values:
            layer.set_trainable_entries(new_adapter_name, *combined_per_layer[name])


__all__ = ["set_adapter_strength", "combine_adapters"]
