"""Decoupled weight decay of SaRA's trainable entries, in either of two meanings, applied with each optimizer step.

SaRA trains deltas ``d`` of selected weight entries: the layer computes with ``w = w0 + s * d`` there (``w0`` the frozen
pre-trained entry, ``s`` the adapter scale). "Weight decay" can mean two things:

- ``"delta"``: ``d <- d - lr * wd * d``. Decays the *update* toward the pre-trained weight. It is what
  ``torch.optim.AdamW(weight_decay=wd)`` does to any PEFT adapter's parameters, and what it does to SaRA's deltas.
- ``"official"``: ``w <- w - lr * wd * w`` on the selected entries, i.e. ``d <- d - lr * wd * (w0 / s + d)``. Decays the
  selected *weights* toward 0, as the official SaRA optimizer (sjtuplayer/SaRA ``optim/adamw2.py``: the whole weight is
  multiplied by ``1 - lr * wd`` before the Adam update, then the unselected entries are put back) and
  pytorch-optimizer's SaRA port do.

Both apply before the optimizer's own update, with the learning rate of the parameter group at that step (schedulers
included), to the live trainable entries only (entries frozen by progressive re-selection are left as they are, as
the official code puts them back). With either, the optimizer's own ``weight_decay`` on the SaRA values must be 0: two
decays would apply.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..tuner.layer import SaRALayer
from ..tuner.selection import compute_dtype, is_sharded
from .optimizer import unwrap_optimizer

WeightDecayMode = Literal["delta", "official"]
WEIGHT_DECAY_MODES = ("delta", "official")
# Per optimizer, the values a SparseWeightDecay hook already decays (a second helper on them would decay twice).
_DECAYED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class SparseWeightDecay:
    """Applies one of the decays of the module docstring to an adapter's entries, as a step pre-hook of ``optimizer``.

    Refuses an optimizer that decays the same values itself (double decay) and sharded (FSDP2) values. Base entries
    (``w0``) are read once per index buffer state and cached (the cache follows re-selection and hotswaps, which write
    the index buffer in place).
    """

    def __init__(
        self,
        layers: Sequence[tuple[str, SaRALayer]],
        adapter_name: str,
        optimizer: Any,
        weight_decay: float,
        mode: WeightDecayMode,
    ) -> None:
        if mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"`weight_decay_mode` must be one of {WEIGHT_DECAY_MODES}, got {mode!r}.")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
        if optimizer is None:
            raise ValueError("`weight_decay` is applied with each optimizer step: pass the optimizer to the helper.")
        self.layers = list(layers)
        self.adapter_name = adapter_name
        self.weight_decay = float(weight_decay)
        self.mode = mode
        self.optimizer = unwrap_optimizer(optimizer)
        # Per layer: (index buffer, its version, live count) -> the base entries under it.
        self._base_entries: dict[int, tuple[torch.Tensor, int, int, torch.Tensor]] = {}
        params = {layer.sara_values[adapter_name] for _, layer in self.layers}
        for group in self.optimizer.param_groups:
            if any(param in params for param in group["params"]) and group.get("weight_decay", 0):
                raise ValueError(
                    f"The optimizer decays the SaRA values itself (weight_decay={group['weight_decay']}) and the helper "
                    f"was asked for weight_decay={weight_decay} ({mode!r}): two decays would apply. Build the optimizer "
                    "with weight_decay=0 for the SaRA values."
                )
        sharded = [name for name, layer in self.layers if is_sharded(layer.sara_values[adapter_name])]
        if sharded:
            raise NotImplementedError(
                f"The helper's weight decay does not support sharded (FSDP2) values (e.g. '{sharded[0]}'); use the "
                "optimizer's own weight_decay (the 'delta' rule) there."
            )
        decayed = _DECAYED.setdefault(self.optimizer, set())
        if decayed & {id(param) for param in params}:
            raise ValueError(
                "Another SaRATrainingHelper already applies weight decay to these SaRA values with this optimizer: "
                "two decays would apply. Create one helper per optimizer and adapter (or `remove()` the first decay)."
            )
        self._param_ids = {id(param) for param in params}
        decayed |= self._param_ids
        self.handle = self.optimizer.register_step_pre_hook(self._pre_step)

    def remove(self) -> None:
        """Stop applying the decay (removes the hook from the optimizer)."""
        self.handle.remove()
        _DECAYED.get(self.optimizer, set()).difference_update(self._param_ids)

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.apply(optimizer.param_groups)

    def _group_lrs(self, param_groups: Sequence[dict[str, Any]]) -> dict[int, float]:
        return {id(param): group["lr"] for group in param_groups for param in group["params"]}

    @torch.no_grad()
    def apply(self, param_groups: Sequence[dict[str, Any]]) -> None:
        """Decay every live trainable entry once, with its group's current learning rate."""
        if self.weight_decay == 0:
            return
        lrs = self._group_lrs(param_groups)
        for _, layer in self.layers:
            param = layer.sara_values[self.adapter_name]
            if param.grad is None or id(param) not in lrs:  # as the official code: only values that have a gradient
                continue
            count = layer.num_trainable(self.adapter_name)
            factor = lrs[id(param)] * self.weight_decay
            values = param.data[:count]
            if self.mode == "delta":
                values.mul_(1 - factor)
                continue
            scale = layer.sara_scaling[self.adapter_name]
            if scale == 0:  # the adapter does not reach the weight: nothing of w is its to decay
                continue
            base = self._base(layer, count).to(values.dtype)
            values.sub_(factor * (base / scale + values))

    def _base(self, layer: SaRALayer, count: int) -> torch.Tensor:
        """The pre-trained entries ``w0`` under the live trainable indices (float, dequantized where needed)."""
        indices = layer.sara_indices[self.adapter_name]
        cached = self._base_entries.get(id(layer))
        if cached is None or cached[0] is not indices or cached[1:3] != (indices._version, count):
            with layer.readable_base_weight() as weight:
                flat = weight.detach().reshape(-1)
                base = flat.index_select(0, indices[:count].long().to(flat.device))
                base = base.to(compute_dtype(base.dtype, layer.sara_values[self.adapter_name].dtype))
            cached = self._base_entries[id(layer)] = (indices, indices._version, count, base.to(indices.device))
        return cached[3]


__all__ = ["SparseWeightDecay", "WEIGHT_DECAY_MODES", "WeightDecayMode"]
