"""Fixed-capacity storage of a SaRA layer's trainable entries in state dicts.

Progressive re-selection compacts the surviving entries to the front of the values Parameter and the index buffer and
leaves an inert tail, so the Parameter keeps its size (optimizers, DDP / FSDP wrappers and compiled graphs stay valid).
A state dict holds only the live entries (the 0.1.0 file format); loading pads them back to the layer's capacity.
The two hooks below do this; :class:`peft_sara.layer.SaRALayer` registers them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def state_dict_live_entries_only(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict
) -> None:
    """State-dict post-hook: trim ``sara_values`` / ``sara_indices`` to the live entries (copies, not views, so
    ``torch.save`` does not write the whole capacity's storage)."""
    for name in module.sara_values:
        count = module.num_trainable(name)
        for key in (f"{prefix}sara_values.{name}", f"{prefix}sara_indices.{name}"):
            value = state_dict.get(key)
            if value is not None and value.shape[0] > count:
                state_dict[key] = value.detach()[:count].clone()


def load_state_dict_into_capacity(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: a state dict holds the live entries only. Pad them to the layer's capacity (growing it
    when they do not fit) and record their number; resize the frozen buffers to the incoming ones (a state dict
    without frozen entries was saved before any re-selection: none)."""
    for name, param in module.sara_values.items():
        values_key, indices_key = f"{prefix}sara_values.{name}", f"{prefix}sara_indices.{name}"
        values, indices = state_dict.get(values_key), state_dict.get(indices_key)
        if values is None or indices is None or values.dim() != 1 or values.shape != indices.shape:
            continue  # nothing to fit; PyTorch reports missing keys and size mismatches
        count, capacity = values.shape[0], param.shape[0]
        if count > capacity:
            index_buffer = module.sara_indices[name]
            module.sara_indices[name] = index_buffer.new_zeros(count)
            module.sara_values[name] = nn.Parameter(param.detach().new_zeros(count), param.requires_grad)
            capacity = count
        state_dict[values_key] = torch.cat([values, values.new_zeros(capacity - count)])
        state_dict[indices_key] = torch.cat([indices, indices.new_zeros(capacity - count)])
        module.sara_num_trainable[name] = count
        module._clear_index_caches()
        for container_name in ("sara_frozen_indices", "sara_frozen_values"):
            container = getattr(module, container_name)
            incoming = state_dict.get(f"{prefix}{container_name}.{name}")
            shape = incoming.shape if incoming is not None else torch.Size([0])
            if container[name].shape != shape:
                container[name] = container[name].new_zeros(shape)
