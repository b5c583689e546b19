"""Keeping an optimizer consistent when progressive re-selection compacts the SaRA value Parameters in place.

Re-selection never replaces a Parameter: the surviving entries move to the front of each fixed-capacity values
Parameter and the freed tail is zeroed (:func:`peft_sara.tuner.selection.compact_`). Per-entry optimizer state (Adam's moments,
momentum buffers) is re-ordered the same way, in place, so the optimizer object, its parameter list and every wrapper
around it (LR schedulers, accelerate, DDP, FSDP2) stay valid.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..tuner.selection import compact_


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The real ``torch.optim.Optimizer`` inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def check_optimizer_state_can_follow(optimizer: Any, params: Mapping[nn.Parameter, str]) -> None:
    """Raise a ``ValueError`` unless re-selection can re-order ``optimizer``'s state of ``params`` (param -> name).

    Every trainable parameter must be one the optimizer holds (not a flattened copy, as DeepSpeed ZeRO and FSDP1
    keep), and each of its state tensors a scalar (step counters) or one value per entry.
    """
    inner = unwrap_optimizer(optimizer)
    held = {id(param) for group in inner.param_groups for param in group["params"]}
    absent = [name for param, name in params.items() if param.requires_grad and id(param) not in held]
    if absent:
        raise ValueError(
            f"{len(absent)} SaRA value Parameters (e.g. '{absent[0]}') are not in the optimizer's parameter groups, "
            f"so re-selection cannot re-order their optimizer state ({type(optimizer).__name__} may optimize "
            "flattened copies, as DeepSpeed ZeRO and FSDP1 do). Build the optimizer over the model's own parameters "
            "(FSDP2 and DDP keep them), pass optimizer=None and re-order the state yourself with the masks "
            "`reselect()` returns, or disable progressive re-selection (progressive_fraction=None)."
        )
    for param, name in params.items():
        for key, value in inner.state.get(param, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                raise ValueError(
                    f"Cannot re-order optimizer state '{key}' of shape {tuple(value.shape)} of SaRA parameter "
                    f"'{name}' (shape {tuple(param.shape)}) entry by entry (e.g. block-quantized 8-bit optimizer "
                    "state). Clear that optimizer's state before re-selection, or use an optimizer with per-entry "
                    "state such as torch.optim.AdamW."
                )


@torch.no_grad()
def compact_optimizer_state(optimizer: Any, keep_masks: Mapping[nn.Parameter, torch.Tensor]) -> None:
    """Re-order, in place, the per-entry state of re-selected parameters as :meth:`SaRALayer.reselect` did the values.

    ``keep_masks`` maps a values Parameter to its re-selection mask (over the entries that were trainable): kept
    entries move to the front, the freed tail is zeroed. Scalar state (Adam's step) is left as is.
    """
    check_optimizer_state_can_follow(optimizer, {param: f"#{i}" for i, param in enumerate(keep_masks)})
    inner = unwrap_optimizer(optimizer)
    for param, keep in keep_masks.items():
        for value in inner.state.get(param, {}).values():
            if torch.is_tensor(value) and value.dim() > 0:
                compact_(value, keep)


__all__ = [
    "check_optimizer_state_can_follow",
    "compact_optimizer_state",
    "unwrap_optimizer",
]
