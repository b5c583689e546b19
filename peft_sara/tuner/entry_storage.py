"""Where a SaRA layer keeps its adapters' entries, and how that storage changes over a run.

Per adapter: a fixed-capacity trainable set (the flat indices ``sara_indices`` and the 1-D values Parameter
``sara_values``; the live entries are a prefix, the rest an inert zero tail after a re-selection, so the Parameter
keeps its size and identity for optimizers, DDP / FSDP and compiled graphs) and the entries frozen by progressive
re-selection (``sara_frozen_indices`` / ``sara_frozen_values``, whose size changes, read by compiled forwards with a
dynamic size). State dicts hold only the live entries; loading pads them back to the capacity.
:class:`SparseEntryStorage` is the part of :class:`peft_sara.tuner.layer.SaRALayer` that owns all of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from .kernels.reference import patched_values
from .selection import (
    check_entries,
    compact_,
    gathered,
    index_dtype_for,
    still_ineffective,
    write_prefix_,
)


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
    """An adapter's entries as they were, taken by :meth:`SparseEntryStorage.snapshot_entries` to undo a write."""

    adapter_name: str
    indices: torch.Tensor
    values: torch.Tensor
    frozen_indices: torch.Tensor
    frozen_values: torch.Tensor
    scale: float
    grad: torch.Tensor | None
    awaiting: bool


class SparseEntryStorage:
    """Mixin of :class:`peft_sara.tuner.layer.SaRALayer`: the containers of each adapter's entries and every change to them
    (setting entries, progressive re-selection, state-dict trimming and padding)."""

    def _init_entry_storage(self) -> None:
        self.sara_values = nn.ParameterDict({})
        self.sara_indices = BufferDict(persistent=True)
        self.sara_frozen_indices = DynamicSizeBufferDict()
        self.sara_frozen_values = DynamicSizeBufferDict()
        # Live (trainable) entries at the front of `sara_values` / `sara_indices`; re-selection compacts the survivors
        # there and leaves an inert, zeroed tail. The count as an int (eager bookkeeping) and as a 0-d tensor (compiled
        # forwards mask the tail's gradient with it).
        self.sara_num_trainable: dict[str, int] = {}
        self.sara_live_count = BufferDict(persistent=False)
        # Adapters created without a selection, whose entries a checkpoint is about to set (see `awaits_entries`).
        self.sara_awaiting_entries: dict[str, bool] = {}
        # The state dict holds only the live entries; loading pads them back to the layer's capacity.
        self.register_state_dict_post_hook(SparseEntryStorage._state_dict_live_entries_only)
        self.register_load_state_dict_pre_hook(SparseEntryStorage._load_state_dict_into_capacity)

    def _create_entries(
        self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor, awaiting: bool = False
    ) -> None:
        """A new adapter's storage: all ``indices`` trainable with ``values``, nothing frozen; ``awaiting``: no entries
        yet, a checkpoint will set them."""
        device = values.device
        if awaiting:
            self.sara_awaiting_entries[adapter_name] = True
        else:
            self.sara_awaiting_entries.pop(adapter_name, None)
        self.sara_indices[adapter_name] = indices.to(device)
        self.sara_values[adapter_name] = nn.Parameter(values)
        self.sara_live_count[adapter_name] = torch.zeros((), dtype=torch.int64, device=device)
        self._set_live_count(adapter_name, indices.numel())
        empty_indices = torch.zeros(0, dtype=indices.dtype, device=device)
        self._set_frozen(adapter_name, empty_indices, torch.zeros(0, dtype=values.dtype, device=device))

    def awaits_entries(self, adapter_name: str) -> bool:
        """Whether the adapter was injected for a load (PEFT's ``from_pretrained`` / ``load_adapter`` with the config
        from the file, ``low_cpu_mem_usage=True``, ``peft_sara.load_sara_adapter``) and no checkpoint has set its
        entries yet: it has none, and its forward refuses to run."""
        return adapter_name in self.sara_awaiting_entries

    def trainable_entries(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices of an adapter's trainable entries and their deltas, differentiable into ``sara_values``.

        Only the live entries: after a re-selection both are prefixes (views) of the fixed-capacity index buffer and
        values Parameter; before it, the buffer and the Parameter themselves.
        """
        # Read through the containers' own dicts: this runs on every forward, where each nn.Module attribute lookup
        # costs about as much as a small op's dispatch.
        containers = self._modules
        values = containers["sara_values"]._parameters[adapter_name]
        indices = containers["sara_indices"]._buffers[adapter_name]
        count = self.sara_num_trainable.get(adapter_name, values.shape[0])
        if count == values.shape[0]:
            return indices, values
        return indices[:count], values[:count]  # slicing keeps autograd to the Parameter

    def frozen_entries(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices and deltas of the entries frozen by progressive re-selection (empty before it)."""
        containers = self._modules
        return containers["sara_frozen_indices"]._buffers[adapter_name], containers["sara_frozen_values"]._buffers[
            adapter_name
        ]

    def num_entries(self, adapter_name: str, trainable_only: bool = False) -> int:
        """Number of stored entries of an adapter in this layer (trainable, plus frozen unless ``trainable_only``)."""
        count = self.num_trainable(adapter_name)
        return count if trainable_only else count + self.sara_frozen_values[adapter_name].numel()

    def num_trainable(self, adapter_name: str) -> int:
        """Number of trainable (live) entries of an adapter in this layer; the values Parameter may hold more."""
        return self.sara_num_trainable.get(adapter_name, self.sara_values[adapter_name].shape[0])

    def set_trainable_entries(
        self,
        adapter_name: str,
        indices: torch.Tensor,
        values: torch.Tensor | None = None,
        frozen_indices: torch.Tensor | None = None,
        frozen_values: torch.Tensor | None = None,
        *,
        checked: bool = False,
    ) -> None:
        """Set an adapter's trainable (and frozen) entries, e.g. to fit a checkpoint or a combination of adapters.

        Entries that fit into the current capacity are written in place (the values Parameter keeps its identity, so
        optimizers and DDP / FSDP wrappers stay valid; pending gradients are dropped); more entries than that replace
        the Parameter by a larger one (rebuild optimizers then). ``checked``: the entries come from the one reader
        (``peft_sara.tuner.reader.read_layer``, which checked them against this layer), so they are not checked again.
        """
        if not checked:
            self._check_entries(adapter_name, indices, values, "trainable")
            if frozen_indices is not None:
                self._check_entries(adapter_name, frozen_indices, frozen_values, "frozen")
        param = self.sara_values[adapter_name]
        device = param.device  # where the adapter lives (an offloaded base's weight is on meta)
        if device.type == "meta":  # created empty under `init_empty_weights` (PEFT's low_cpu_mem_usage)
            device = self.get_base_layer().weight.device
        index_dtype = index_dtype_for(self.weight_shape.numel())
        if values is None:
            values = torch.zeros(indices.numel(), dtype=param.dtype)
        if indices.numel() <= param.shape[0]:
            write_prefix_(param, values.detach())
            write_prefix_(self.sara_indices[adapter_name], indices)
            param.grad = None
        else:
            self.sara_indices[adapter_name] = indices.to(device=device, dtype=index_dtype)
            # keep the dtype PEFT's autocast chose, and whether the adapter trains
            self.sara_values[adapter_name] = nn.Parameter(
                values.detach().to(device=device, dtype=param.dtype), requires_grad=param.requires_grad
            )
        self._set_live_count(adapter_name, indices.numel())
        self.sara_awaiting_entries.pop(adapter_name, None)
        if frozen_indices is not None:
            self._set_frozen(
                adapter_name,
                frozen_indices.to(device=device, dtype=index_dtype),
                frozen_values.detach().to(device=device, dtype=param.dtype),
            )

    def snapshot_entries(self, adapter_name: str) -> EntrySnapshot:
        """What :meth:`restore_entries` needs to undo :meth:`set_trainable_entries` (and a scale change) of an adapter
        whose capacity the write keeps: copies of its live entries only (the capacity's tail is zero: an empty hotswap
        slot costs nothing), the frozen tensors by reference (a write replaces them, never writes into them)."""
        indices, values = self.trainable_entries(adapter_name)
        frozen_indices, frozen_values = self.frozen_entries(adapter_name)
        return EntrySnapshot(
            adapter_name,
            indices.clone(),
            values.detach().clone(),
            frozen_indices,
            frozen_values,
            self.sara_scaling[adapter_name],
            self.sara_values[adapter_name].grad,
            self.awaits_entries(adapter_name),
        )

    @torch.no_grad()
    def restore_entries(self, snapshot: EntrySnapshot) -> None:
        """Put back, in place, the entries, scale and gradient :meth:`snapshot_entries` saw."""
        name = snapshot.adapter_name
        self.set_trainable_entries(
            name, snapshot.indices, snapshot.values, snapshot.frozen_indices, snapshot.frozen_values, checked=True
        )
        self._set_frozen(name, snapshot.frozen_indices, snapshot.frozen_values)  # the same tensors, not copies
        self.set_scale(name, snapshot.scale)
        self.sara_values[name].grad = snapshot.grad
        if snapshot.awaiting:
            self.sara_awaiting_entries[name] = True

    def reselect(self, adapter_name: str, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Progressive adjustment: keep training only the entries whose current weight is still within the cutoff.

        Entries that grew past it move to the frozen set with their learned deltas. In place: the survivors move to the
        front of the values Parameter, of its pending gradient and of the index buffer; the freed tail is zeroed and
        inert (never written to the weight, never saved, zero gradient). Parameters keep their size and identity.

        ``keep`` overrides the decision (a boolean mask over the trainable entries, as :meth:`reselection_mask`
        returns; :class:`peft_sara.training.SaRATrainingHelper` passes rank 0's on every rank). Returns the mask used:
        re-order per-entry optimizer state with it (:func:`peft_sara.tuner.selection.compact_`).
        """
        if self.merged:
            raise RuntimeError(
                f"Cannot re-select SaRA adapter '{adapter_name}' while adapters {self.merged_adapters} are merged: "
                "the test would read the merged weight. Call `unmerge_adapter()` first."
            )
        count = self.num_trainable(adapter_name)
        if keep is None:
            keep = self.reselection_mask(adapter_name)
        if keep.dtype != torch.bool or keep.shape != (count,):
            raise ValueError(
                f"The re-selection mask of SaRA adapter '{adapter_name}' must be a bool tensor of shape ({count},), one "
                f"entry per trainable entry; got {keep.dtype} of shape {tuple(keep.shape)}."
            )
        param, indices = self.sara_values[adapter_name], self.sara_indices[adapter_name]
        keep = keep.to(indices.device)
        live_values = gathered(param).detach()[:count]
        leaving = ~keep
        frozen_indices = torch.cat([self.sara_frozen_indices[adapter_name], indices[:count][leaving]])
        frozen_values = self.sara_frozen_values[adapter_name]
        frozen_values = torch.cat([frozen_values, live_values[leaving].to(frozen_values)])
        compact_(param, keep)
        if param.grad is not None:  # gradients accumulated for the next step follow their entries
            compact_(param.grad, keep)
        compact_(indices, keep)
        self._set_frozen(adapter_name, frozen_indices, frozen_values)
        self._set_live_count(adapter_name, int(keep.sum()))
        return keep

    @torch.no_grad()
    def reselection_mask(self, adapter_name: str) -> torch.Tensor:
        """Boolean mask over the trainable entries: those whose current weight, ``cast(w + s*delta)`` as the forward
        computes it, is within the cutoff.

        A pure function of the base weight and the values, so ranks holding bitwise-identical copies agree on it.
        """
        count = self.num_trainable(adapter_name)
        indices = self.sara_indices[adapter_name][:count]
        values = gathered(self.sara_values[adapter_name]).detach()[:count]
        with self.readable_base_weight() as weight:  # dequantized / onloaded where needed
            base_entries = gathered(weight).detach().reshape(-1).index_select(0, indices)
        current = patched_values(base_entries, values, self.sara_scaling[adapter_name])  # the forward's formula
        return still_ineffective(current, self.cutoff(adapter_name))

    def _set_live_count(self, adapter_name: str, count: int) -> None:
        self.sara_num_trainable[adapter_name] = count
        self.sara_live_count[adapter_name].fill_(count)

    def _set_frozen(self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor) -> None:
        self.sara_frozen_indices[adapter_name] = indices
        self.sara_frozen_values[adapter_name] = values

    # --------------------------------------------------------------------------------- fixed-capacity state dicts
    @staticmethod
    def _state_dict_live_entries_only(
        module: SparseEntryStorage, state_dict: dict, prefix: str, local_metadata: dict
    ) -> None:
        """State-dict post-hook: trim ``sara_values`` / ``sara_indices`` to the live entries (copies, not views, so
        ``torch.save`` does not write the whole capacity's storage)."""
        for name in module.sara_values:
            count = module.num_trainable(name)
            for key in (f"{prefix}sara_values.{name}", f"{prefix}sara_indices.{name}"):
                value = state_dict.get(key)
                if value is not None and value.shape[0] > count:
                    state_dict[key] = value.detach()[:count].clone()

    @staticmethod
    def _load_state_dict_into_capacity(module: SparseEntryStorage, state_dict: dict, prefix: str, *args: Any) -> None:
        """Load pre-hook: a state dict holds the live entries only. Pad them to the layer's capacity (growing it when
        they do not fit) and record their number; resize the frozen buffers to the incoming ones (a state dict without
        frozen entries was saved before any re-selection: none)."""
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
            if count < capacity:  # (a loaded adapter is sized to its checkpoint: nothing to pad, nothing to copy)
                state_dict[values_key] = torch.cat([values, values.new_zeros(capacity - count)])
                state_dict[indices_key] = torch.cat([indices, indices.new_zeros(capacity - count)])
            module._set_live_count(name, count)
            module.sara_awaiting_entries.pop(name, None)
            frozen = []
            for container_name in ("sara_frozen_indices", "sara_frozen_values"):
                current = getattr(module, container_name)[name]
                incoming = state_dict.get(f"{prefix}{container_name}.{name}")
                shape = incoming.shape if incoming is not None else torch.Size([0])
                frozen.append(current if current.shape == shape else current.new_zeros(shape))
            module._set_frozen(name, *frozen)

    def _check_entries(self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor | None, what: str) -> None:
        numel = self.weight_shape.numel()
        check_entries(indices, values, numel, f"{what} entries of SaRA adapter '{adapter_name}'")
