"""Keeping an optimizer consistent when progressive re-selection changes the SaRA value Parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The real ``torch.optim.Optimizer`` inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def replace_optimizer_parameters(
    optimizer: torch.optim.Optimizer, replacements: dict[nn.Parameter, tuple[nn.Parameter, torch.Tensor]]
) -> None:
    """Swap parameters in an optimizer in place, keeping the state of surviving entries.

    ``replacements`` maps an old 1-D parameter to ``(new_parameter, keep_mask)``: per-entry state tensors (Adam's
    moments, momentum buffers) are indexed with the mask; scalar state (Adam's step) is kept as is. The optimizer
    object stays the same, so LR schedulers and accelerate wrappers remain valid.
    """
    optimizer = unwrap_optimizer(optimizer)
    for group in optimizer.param_groups:
        for position, param in enumerate(group["params"]):
            if param not in replacements:
                continue
            new_param, keep = replacements[param]
            group["params"][position] = new_param
            old_state = optimizer.state.pop(param, None)
            if old_state is not None:
                optimizer.state[new_param] = {
                    key: _keep_entries(key, value, param, keep) for key, value in old_state.items()
                }


def _keep_entries(key: str, value: Any, param: nn.Parameter, keep: torch.Tensor) -> Any:
    if not torch.is_tensor(value) or value.numel() <= 1:
        return value  # step counters and other scalars
    if value.shape == param.shape:
        return value[keep].clone()
    raise ValueError(
        f"Cannot carry optimizer state '{key}' of shape {tuple(value.shape)} over to the re-selected entries of a "
        f"parameter of shape {tuple(param.shape)} (e.g. block-quantized 8-bit optimizer state). Clear that "
        "optimizer's state before re-selection, or use an optimizer with per-entry state such as torch.optim.AdamW."
    )


__all__ = ["replace_optimizer_parameters", "unwrap_optimizer"]
