"""Adapter state-dict conventions: what is saved, and checking a checkpoint against the live model before loading."""

from __future__ import annotations

import torch
from torch import nn

VALUE_KEYS = ("sara_values", "sara_frozen_values")
INDEX_KEYS = ("sara_indices", "sara_frozen_indices")


def prepare_for_saving(state_dict: dict[str, torch.Tensor], save_dtype: str | None) -> dict[str, torch.Tensor]:
    """Drop empty frozen-entry tensors (nothing re-selected yet) and cast the deltas to ``save_dtype``."""
    state_dict = {
        key: value for key, value in state_dict.items()
        if not (value.numel() == 0 and ".sara_frozen_" in f".{key}")
    }
    if save_dtype is None:
        return state_dict
    dtype = getattr(torch, save_dtype)
    return {
        key: value.to(dtype) if any(f".{name}" in key for name in VALUE_KEYS) else value
        for key, value in state_dict.items()
    }


def _layer_keys(module_name: str, adapter_name: str) -> dict[str, str]:
    prefix = f"{module_name}." if module_name else ""
    return {name: f"{prefix}{name}.{adapter_name}" for name in INDEX_KEYS + VALUE_KEYS}


def _check_pair(layer_name, what, indices, values, numel):
    if indices is None or values is None:
        missing = "indices" if indices is None else "values"
        raise ValueError(f"The checkpoint has no {what} {missing} for SaRA layer '{layer_name}'.")
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype in (torch.bool, torch.uint8):
        raise ValueError(
            f"SaRA layer '{layer_name}': {what} indices must be a 1-D integer tensor, got dtype {indices.dtype} and "
            f"shape {tuple(indices.shape)}."
        )
    if values.dim() != 1 or not values.dtype.is_floating_point:
        raise ValueError(
            f"SaRA layer '{layer_name}': {what} values must be a 1-D floating tensor, got dtype {values.dtype} and "
            f"shape {tuple(values.shape)}."
        )
    if values.numel() != indices.numel():
        raise ValueError(
            f"SaRA layer '{layer_name}': the checkpoint has {indices.numel()} {what} indices but {values.numel()} values."
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise ValueError(
            f"SaRA layer '{layer_name}': {what} indices span [{int(indices.min())}, {int(indices.max())}] but the "
            f"live weight has {numel} entries. The checkpoint was made for a different model."
        )


def fit_layers_to_checkpoint(
    model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Validate a (model-keyed) SaRA checkpoint against the live model, then resize layers to its trainable sets.

    Every tensor is checked (presence, dtype, shape, index range) before any layer changes, and errors name the
    layer. Layers whose current trainable set differs in size from the checkpoint's (after progressive
    re-selection, or when the base weights select differently) are resized so ``load_state_dict`` can fill them.
    """
    from .layer import SaRALayer

    plans = []
    expected_keys = set()
    for module_name, layer in model.named_modules():
        if not isinstance(layer, SaRALayer) or adapter_name not in layer.sara_values:
            continue
        keys = _layer_keys(module_name, adapter_name)
        expected_keys.update(keys.values())
        numel = layer.get_base_layer().weight.numel()
        trainable = (state_dict.get(keys["sara_indices"]), state_dict.get(keys["sara_values"]))
        _check_pair(module_name, "trainable", *trainable, numel)
        frozen = (state_dict.get(keys["sara_frozen_indices"]), state_dict.get(keys["sara_frozen_values"]))
        if frozen == (None, None):  # saved before any re-selection: no frozen entries
            frozen = (torch.zeros(0, dtype=torch.int64), torch.zeros(0))
            state_dict[keys["sara_frozen_indices"]], state_dict[keys["sara_frozen_values"]] = frozen
        _check_pair(module_name, "frozen", *frozen, numel)
        plans.append((layer, trainable, frozen))

    unexpected = sorted(
        key for key in state_dict
        if any(f".{name}" in key or key.startswith(name) for name in INDEX_KEYS + VALUE_KEYS)
        and key not in expected_keys
    )
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise ValueError(
            f"The checkpoint has SaRA entries for {len(unexpected)} tensors that match no SaRA layer of this model "
            f"(adapter '{adapter_name}'): {shown}. Was it trained with other `target_modules` or another model?"
        )

    for layer, (indices, values), (frozen_indices, frozen_values) in plans:
        current = (layer.sara_indices[adapter_name], layer.sara_frozen_indices[adapter_name])
        if indices.shape != current[0].shape or frozen_indices.shape != current[1].shape:
            layer.set_trainable_entries(adapter_name, indices, values, frozen_indices, frozen_values)
    return state_dict
