"""The containers a SaRA layer keeps its adapters' entries in.

Per adapter: a fixed-capacity trainable set (the flat indices ``sara_indices`` and the 1-D values Parameter
``sara_values``; the live entries are a prefix, the rest an inert zero tail after a re-selection, so the Parameter
keeps its size and identity for optimizers, DDP / FSDP and compiled graphs) and the entries frozen by progressive
re-selection (``sara_frozen_indices`` / ``sara_frozen_values``, whose size changes, read by compiled forwards with a
dynamic size). State dicts hold only the live entries; loading pads them back to the capacity.
This module holds the containers; :class:`peft_sara.tuner.layer.SaRALayer` owns them and every change to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners._buffer_dict import BufferDict


class DynamicSizeBufferDict(BufferDict):
    """A :class:`BufferDict` whose tensors change size over an adapter's life (frozen entries grow at re-selection and
    differ between loaded adapters). Dynamo treats module buffers' shapes as static, so compiled forwards read them
    through :meth:`dynamic`: plain references to the same tensors, marked as having a dynamic (possibly 0 or 1) size,
    kept in step by every write (``__setitem__``, ``del``, ``.to()`` / ``.half()`` and the like)."""

    def __init__(self) -> None:
        super().__init__(persistent=True)
        self._dynamic: dict[str, torch.Tensor] = {}

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        super().__setitem__(key, value)
        self._refresh(key)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._dynamic.pop(key, None)

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        for key in self._buffers:
            self._refresh(key)
        return result

    def _refresh(self, key: str) -> None:
        tensor = self._buffers[key]
        torch._dynamo.decorators.mark_unbacked(tensor, 0)
        self._dynamic[key] = tensor

    def dynamic(self, key: str) -> torch.Tensor:
        """The tensor under ``key``, as compiled forwards should read it (its size is not baked into the graph)."""
        return self._dynamic[key]


@dataclass
class EntrySnapshot:
    """An adapter's entries as they were, taken by :meth:`peft_sara.tuner.layer.SaRALayer.snapshot_entries` to undo a write."""

    adapter_name: str
    indices: torch.Tensor
    values: torch.Tensor
    frozen_indices: torch.Tensor
    frozen_values: torch.Tensor
    scale: float
    grad: torch.Tensor | None
    awaiting: bool
