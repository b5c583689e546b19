"""SaRA tuner layers: the ``SaRALayer`` mixin, one class per wrapped module type, and the layer walker.

Everything outside this module reads a layer through its public API: :meth:`SaRALayer.get_sparse_update` (indices,
values and scale of an adapter, frozen entries included), :meth:`SaRALayer.trainable_entries` /
:meth:`SaRALayer.frozen_entries`, :meth:`SaRALayer.get_delta_weight` and :meth:`SaRALayer.num_entries`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from torch.compiler import is_compiling

from . import kernels
from .base_weight import (
    ExecutionPath,
    MergeBackup,
    ResolvedFor,
    composable_reason,
    execution_path,
    logical_weight_shape,
    merge_entries_,
    merge_refusal,
    readable_weight,
    resolve_storage_backend,
    unmerge_entries_,
)
from .config import SaRAConfig
from .entry_storage import DynamicSizeBufferDict, EntrySnapshot
from .functional import (
    ConvOp,
    LinearOp,
    SparseDeltaOp,
    SparseEntries,
    SparseUpdate,
    effective_weight,
    offload_hooks_run,
    sparse_delta_forward,
    update_contribution,
)
from .quantized import StorageBackend
from .selection import (
    check_entries,
    compact_,
    compute_dtype,
    gathered,
    index_dtype_for,
    select_trainable_indices,
    still_ineffective,
    threshold_cutoff,
    value_dtype_for,
    write_prefix_,
)

# Scale of the random values drawn when `init_weights=False` (tests need a visible, non-identity update).
RANDOM_INIT_STD = 0.02


class SaRALayer(BaseTunerLayer):
    """Per-adapter sparse update of a frozen weight.

    For each adapter the layer keeps the flat indices of its trainable entries (``sara_indices``, int32 where they
    fit), a 1-D float32 parameter of their deltas (``sara_values``), the entries frozen by progressive re-selection
    with their learned deltas (``sara_frozen_indices`` / ``sara_frozen_values``), a scale, and the magnitude cutoff
    used to re-select. The effective weight is the base weight with those entries replaced by
    ``cast(base + scale * delta)``; merging writes exactly that, unmerging writes the saved base entries back.
    """

    adapter_layer_names = ("sara_values",)
    # The base weight's storage backend (PEFT's attribute, with its `QuantizationBackend` interface; `None` for a plain
    # floating weight), resolved at creation: read it through `storage_backend()`, which resolves a replaced weight.
    quantization_backend: StorageBackend | None = None
    # PEFT's protocol for diffusers' layerwise casting: SaRA layers may cast their input to the compute dtype.
    cast_input_dtype_enabled: bool = True
    other_param_names = (
        "sara_indices",
        "sara_frozen_indices",
        "sara_frozen_values",
        "sara_scaling",
        "sara_scale",
        "sara_cutoff",
        "sara_selection",
        "sara_kernel",
        "sara_num_trainable",
        "sara_live_count",
        "sara_awaiting_entries",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self._init_entry_storage()
        self.sara_scaling: dict[str, float] = {}
        # The same scales as 0-d tensors, read by compiled forwards (a Python float would be baked into the graph).
        self.sara_scale = BufferDict(persistent=False)
        # Per adapter: its selection rule (threshold, trainable_fraction) and the magnitude cutoff it gives here.
        self.sara_selection: dict[str, tuple[float | None, float | None]] = {}
        self.sara_cutoff: dict[str, float] = {}
        self.sara_kernel: dict[str, str] = {}
        # Names of the other SaRA layers whose base weight shares this one's storage (tied weights): merging refuses.
        self.sara_tied_layers: list[str] = []
        # All SaRA layers of the model (set at injection): a merge checks every one of them before writing any.
        self.sara_merge_group: MergeGroup | None = None
        # Base entries overwritten by `merge`, per merged adapter; written back bitwise by `unmerge`.
        self._sara_merge_backup: dict[str, MergeBackup] = {}
        # The strengths before the last `scale_layer` not yet undone: diffusers' fuse_lora(lora_scale=...) scales each
        # layer right before its merge, so a merge that refuses puts them back (refused means unchanged).
        self._sara_scales_before_scaling: dict[str, float] | None = None
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        base_layer = self.get_base_layer()
        self.in_features, self.out_features = _get_in_out_features(base_layer)
        self._resolve_storage_backend(base_layer)

    # ---------------------------------------------------------------------------------------------- entries
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
        self.register_state_dict_post_hook(SaRALayer._state_dict_live_entries_only)
        self.register_load_state_dict_pre_hook(SaRALayer._load_state_dict_into_capacity)

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
        current = kernels.reference.patched_values(
            base_entries, values, self.sara_scaling[adapter_name]
        )  # the forward's formula
        return still_ineffective(current, self.cutoff(adapter_name))

    def _set_live_count(self, adapter_name: str, count: int) -> None:
        self.sara_num_trainable[adapter_name] = count
        self.sara_live_count[adapter_name].fill_(count)

    def _set_frozen(self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor) -> None:
        self.sara_frozen_indices[adapter_name] = indices
        self.sara_frozen_values[adapter_name] = values

    # --------------------------------------------------------------------------------- fixed-capacity state dicts
    @staticmethod
    def _state_dict_live_entries_only(module: SaRALayer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        """State-dict post-hook: trim ``sara_values`` / ``sara_indices`` to the live entries (copies, not views, so
        ``torch.save`` does not write the whole capacity's storage)."""
        for name in module.sara_values:
            count = module.num_trainable(name)
            for key in (f"{prefix}sara_values.{name}", f"{prefix}sara_indices.{name}"):
                value = state_dict.get(key)
                if value is not None and value.shape[0] > count:
                    state_dict[key] = value.detach()[:count].clone()

    @staticmethod
    def _load_state_dict_into_capacity(module: SaRALayer, state_dict: dict, prefix: str, *args: Any) -> None:
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

    # ---------------------------------------------------------------------------------------------- base storage
    def _resolve_storage_backend(self, base_layer: nn.Module) -> None:
        """Resolve the base weight's storage backend (PEFT's ``quantization_backend`` attribute; ``None`` for a plain
        floating weight) and remember which weight object, in which dtype, it was resolved for."""
        self.quantization_backend = resolve_storage_backend(base_layer)
        self._sara_resolved_for = ResolvedFor(base_layer.weight)

    def storage_backend(self, base_layer: nn.Module | None = None) -> StorageBackend | None:
        """The base weight's :class:`~peft_sara.tuner.quantized.StorageBackend` (``None``: a plain floating weight),
        resolved at creation and again only when the base weight object was replaced (a requantizing merge, an onload,
        ``freeze``, ``quantize_``) or cast in place (``.to(dtype)``) since."""
        base_layer = base_layer if base_layer is not None else self.get_base_layer()
        weight = base_layer._parameters.get("weight")  # a dict read: this runs on every forward
        if weight is None:
            weight = base_layer.weight
        resolved_for = self._sara_resolved_for
        if resolved_for.reference() is not weight or weight.dtype is not resolved_for.dtype:
            if not resolved_for.still_holds(weight):
                self._resolve_storage_backend(base_layer)
        return self.quantization_backend

    def execution_path(self, adapter_names: list[str] | None = None) -> ExecutionPath:
        """How this layer runs for ``adapter_names`` (default: the active adapters it holds): off, main or composable
        (see :func:`peft_sara.tuner.base_weight.execution_path`, the one place that decides)."""
        names = self.present_adapters(adapter_names if adapter_names is not None else self.active_adapters)
        return execution_path(self, names, self.get_base_layer())

    # ----------------------------------------------------------------------------------------------- adapters
    def update_layer(self, adapter_name: str, config: SaRAConfig, select_entries: bool = True, **kwargs: Any) -> None:
        """Select the trainable entries of the base weight and create the adapter's (zero) update.

        With ``select_entries=False`` the adapter starts with no entries and waits for a checkpoint to set them
        (:meth:`awaits_entries`): the injection of a load, whose file names the entries, skips the selection.
        """
        if self.merged:
            raise RuntimeError(
                f"Cannot add SaRA adapter '{adapter_name}' while adapters {self.merged_adapters} are merged: the "
                "selection would read the merged weight. Call `unmerge_adapter()` first."
            )
        base_layer = self.get_base_layer()
        # Created in the base dtype, like PEFT's other tuners: PeftModel upcasts half-precision adapter values to
        # float32 unless `autocast_adapter_dtype=False`; float64 bases keep float64 values; quantized bases float32.
        value_dtype = value_dtype_for(base_layer.weight.dtype)
        self.sara_selection[adapter_name] = (config.threshold, config.trainable_fraction)
        if select_entries:
            # Selection reads the dense weight: dequantized (bitsandbytes), upcast (fp8) or onloaded (offloaded).
            with self.readable_base_weight() as weight:
                indices, cutoff = select_trainable_indices(weight, config.threshold, config.trainable_fraction)
                device = weight.device
            self.sara_cutoff[adapter_name] = cutoff
            if config.init_weights:
                values = torch.zeros(indices.numel(), dtype=value_dtype, device=device)
            else:
                values = (torch.randn(indices.numel(), device=device) * RANDOM_INIT_STD).to(value_dtype)
        else:
            device = base_layer.weight.device
            if device.type == "meta":  # an offloaded base: the adapter lives on the hook's execution device
                with self.readable_base_weight() as weight:
                    device = weight.device
            indices = torch.zeros(0, dtype=index_dtype_for(self.weight_shape.numel()), device=device)
            values = torch.zeros(0, dtype=value_dtype, device=device)
        self._create_entries(adapter_name, indices, values, awaiting=not select_entries)
        self.sara_scale[adapter_name] = torch.ones((), dtype=torch.float32, device=device)
        self.set_scale(adapter_name, 1.0)
        self.sara_kernel[adapter_name] = config.kernel
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def cutoff(self, adapter_name: str) -> float:
        """The magnitude cutoff of an adapter's selection rule on this layer's base weight (``|w| <= cutoff`` counts
        as ineffective; see :func:`peft_sara.tuner.selection.select_trainable_indices`). Computed on first use for an
        adapter whose entries came from a checkpoint."""
        if adapter_name not in self.sara_cutoff:
            threshold, trainable_fraction = self.sara_selection[adapter_name]
            if threshold is not None:
                self.sara_cutoff[adapter_name] = threshold_cutoff(threshold)
            else:
                with torch.no_grad(), self.readable_base_weight() as weight:
                    _, cutoff = select_trainable_indices(weight, trainable_fraction=trainable_fraction)
                self.sara_cutoff[adapter_name] = cutoff
        return self.sara_cutoff[adapter_name]

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # Only follow the base weight's device: the values keep their dtype (set at creation and by PEFT's autocast).
        device = device if device is not None else self.get_base_layer().weight.device
        if torch.device(device).type == "meta":  # an offloaded base: the adapter stays where it was created
            return
        for container in (self.sara_values, self.sara_indices, self.sara_scale, self.sara_live_count):
            if adapter_name in container:
                container[adapter_name] = container[adapter_name].to(device)
        if adapter_name in self.sara_frozen_values:
            frozen_indices, frozen_values = self.frozen_entries(adapter_name)
            self._set_frozen(adapter_name, frozen_indices.to(device), frozen_values.to(device))

    # ------------------------------------------------------------------------------------------------ public API
    @property
    def weight_shape(self) -> torch.Size:
        """Shape of the base weight the flat indices address (the logical shape of a packed 4-bit weight)."""
        base_layer = self.get_base_layer()
        return logical_weight_shape(base_layer, self.storage_backend(base_layer))

    def present_adapters(self, adapter_names: list[str]) -> list[str]:
        """The names among ``adapter_names`` that this layer has an update for (in order)."""
        values = self._modules["sara_values"]._parameters  # a dict read (this runs on every forward)
        return [name for name in adapter_names if name in values]

    def get_sparse_update(self, adapter_name: str) -> SparseUpdate:
        """An adapter's whole update of this layer (trainable then frozen entries, int64 indices, detached)."""
        entries = self.sparse_entries([adapter_name])
        value_dtype = compute_dtype(self.sara_values[adapter_name].dtype)
        empty = torch.zeros(0, dtype=value_dtype, device=self.sara_values[adapter_name].device)
        return SparseUpdate(
            indices=torch.cat([entry.indices.long() for entry in entries]) if entries else empty.long(),
            values=torch.cat([entry.values.detach().to(value_dtype) for entry in entries]) if entries else empty,
            scale=self.sara_scaling[adapter_name],
            weight_shape=self.weight_shape,
        )

    def sparse_entries(self, adapter_names: list[str]) -> list[SparseEntries]:
        """The live trainable and the frozen entries of the given adapters, one :class:`SparseEntries` per non-empty
        set, in order (indices as stored; values differentiable into ``sara_values``)."""
        entries = []
        for name in adapter_names:
            scale = self.sara_scaling[name]
            indices, values = self.trainable_entries(name)
            if indices.numel():
                entries.append(SparseEntries(indices, values, scale))
            indices, values = self.frozen_entries(name)
            if indices.numel():
                entries.append(SparseEntries(indices, values, scale))
        return entries

    def _forward_entries(self, adapter_names: list[str]) -> list[SparseEntries]:
        """:meth:`sparse_entries` for a forward. A compiled forward takes every set whole, whatever its live count and
        size, with tensor scales and counts, so that value, scale and size changes and re-selection keep the graph."""
        if not is_compiling():
            return self.sparse_entries(adapter_names)
        entries = []
        for name in adapter_names:
            scale = self.sara_scale[name]
            entries.append(
                SparseEntries(self.sara_indices[name], self.sara_values[name], scale, self.sara_live_count[name])
            )
            frozen_indices, frozen_values = (
                self.sara_frozen_indices.dynamic(name),
                self.sara_frozen_values.dynamic(name),
            )
            entries.append(SparseEntries(frozen_indices, frozen_values, scale))
        return entries

    # ------------------------------------------------------------------------------------------------ scaling
    def set_scale(self, adapter: str, scale: float) -> None:
        """Set the strength of ``adapter`` (1.0 = as trained)."""
        if adapter in self.sara_scale:
            self.sara_scaling[adapter] = float(scale)
            self.sara_scale[adapter].fill_(float(scale))

    def scale_layer(self, scale: float) -> None:
        """Multiply the strength of the active adapters by ``scale`` (diffusers' ``cross_attention_kwargs``)."""
        if scale == 1:
            return
        before = dict(self.sara_scaling)
        for adapter in self.active_adapters:
            if adapter in self.sara_scaling:
                self.set_scale(adapter, self.sara_scaling[adapter] * scale)
        self._sara_scales_before_scaling = before

    def unscale_layer(self, scale: float | None = None) -> None:
        """Undo :meth:`scale_layer` (``None`` resets the active adapters to strength 1.0)."""
        self._sara_scales_before_scaling = None
        for adapter in self.active_adapters:
            if adapter not in self.sara_scaling:
                continue
            if scale is None:
                self.set_scale(adapter, 1.0)
            elif scale != 0:
                self.set_scale(adapter, self.sara_scaling[adapter] / scale)

    # ------------------------------------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ``scale * Delta_W`` of one adapter, shaped like the base weight, in the base dtype (float32 for
        quantized storage)."""
        return self.get_sparse_update(adapter_name).to_dense().to(value_dtype_for(self.get_base_layer().weight.dtype))

    def get_effective_weight(self, adapter_names: list[str] | None = None) -> torch.Tensor:
        """Dense copy of the weight the layer computes with (base with the adapters' entries patched)."""
        adapter_names = self.present_adapters(adapter_names if adapter_names is not None else self.active_adapters)
        with torch.no_grad(), self.readable_base_weight() as weight:
            return effective_weight(weight, self.sparse_entries(adapter_names))

    def readable_base_weight(self) -> AbstractContextManager[torch.Tensor]:
        """A context giving the base weight as a dense floating tensor of :attr:`weight_shape`, for reading only
        (dequantized, upcast or onloaded by the layer's storage backend where needed)."""
        base_layer = self.get_base_layer()
        return readable_weight(base_layer, self.storage_backend(base_layer))

    @torch.no_grad()
    def merge_is_finite(self, adapter_name: str) -> bool:
        """Whether merging ``adapter_name`` would write only finite entries (no weight is changed). Checked in the
        dtype the layer computes with (float32 for 1-byte storage, which has no ``isfinite``)."""
        with self.readable_base_weight() as weight:
            flat_weight = weight.reshape(-1)
            for entry in self.sparse_entries([adapter_name]):
                base_entries = flat_weight.index_select(0, entry.indices)
                if not torch.isfinite(kernels.reference.patched_values(base_entries, entry.values, entry.scale)).all():
                    return False
        return True

    def merge_refusal(self, adapter_names: list[str], safe_merge: bool, name: str = "this layer") -> str | None:
        """Why merging ``adapter_names`` into this layer would be refused (tied weights, storage that cannot take a
        merged weight, with ``safe_merge`` non-finite merged entries), or ``None``; changes nothing."""
        adapters = [adapter for adapter in self.present_adapters(adapter_names) if adapter not in self.merged_adapters]
        if not adapters:
            return None
        if self.sara_tied_layers:
            return (
                f"Cannot merge SaRA adapters {adapters}: layer '{name}' shares its weight with {self.sara_tied_layers}, "
                "so a merged weight would apply every sharing layer's update in each of them. Keep these adapters "
                "unmerged (the unmerged forward is exact)."
            )
        base_layer = self.get_base_layer()
        reason = merge_refusal(self.storage_backend(base_layer))  # the backend's reason says what to do instead
        if reason is not None:
            return f"Cannot merge SaRA adapters {adapters} into layer '{name}' ({type(base_layer).__name__}): {reason}"
        for adapter in adapters if safe_merge else ():
            if not self.merge_is_finite(adapter):
                return (
                    f"NaNs or infs detected while merging adapter '{adapter}' into layer '{name}': the adapter seems "
                    "to be broken."
                )
        return None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the adapters' updates into the base weight (only the changed entries are touched; a bitsandbytes
        weight is requantized). Before the first layer of a model writes, every SaRA layer of the model is checked
        (:class:`MergeGroup`): a refusal anywhere (tied weights, fp8 / torchao / GGUF K-quant storage, with
        ``safe_merge`` non-finite entries) raises with no weight changed, also under diffusers' ``fuse_lora``, which
        merges layer by layer."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        scales_before, self._sara_scales_before_scaling = self._sara_scales_before_scaling, None
        group = self.sara_merge_group
        try:
            if group is not None:
                group.check(adapter_names, safe_merge)
            else:
                refusal = self.merge_refusal(adapter_names, safe_merge)
                if refusal is not None:
                    raise ValueError(refusal + " Nothing was merged.")
        except ValueError:
            for adapter, scale in (scales_before or {}).items():  # fuse_lora(lora_scale=...) scaled it just before
                self.set_scale(adapter, scale)
            raise
        base_layer = self.get_base_layer()
        merged_any = False
        for name in self.present_adapters(adapter_names):
            where = f"SaRA adapter '{name}' into {type(base_layer).__name__} of shape {tuple(self.weight_shape)}"
            self._sara_merge_backup[name] = merge_entries_(self, self.sparse_entries([name]), safe_merge, where)
            self.merged_adapters.append(name)
            merged_any = True
        if group is not None and merged_any:
            group.merged_one()

    def unmerge(self) -> None:
        """Restore the base weight bitwise."""
        if self.sara_merge_group is not None:
            self.sara_merge_group.checked = None
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            backup = self._sara_merge_backup.pop(self.merged_adapters.pop(), None)
            if backup is not None:
                unmerge_entries_(self.get_base_layer(), backup)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether PEFT's ``convert_to_lora`` handles this layer: SaRA is additive (W' = W + Delta_W), so a matrix
        update (Linear, transformers' Conv1D) is approximated by SVD; PEFT treats a conv kernel as a batch of matrices,
        so convolutions are exported with ``peft_sara.conversion`` (LoCon layout) instead."""
        return len(self.weight_shape) == 2

    # ------------------------------------------------------------------------------------------------ forward
    def _op(self, x: torch.Tensor) -> tuple[SparseDeltaOp, torch.Tensor]:
        """The dense op of the wrapped module and the input to run it on (after any padding the module applies)."""
        raise NotImplementedError

    def composable_reason(self) -> str | None:
        """Why this layer runs its base layer's own forward plus the update (its hooks, or its weight's storage), or
        ``None`` if it does not (see :meth:`execution_path`)."""
        return composable_reason(self, self.get_base_layer())

    def get_base_layer(self) -> nn.Module:
        """The wrapped module (recursively, through any tuner layer that wraps it); PEFT's walk, with a fast path for
        the usual direct wrap (a failing ``hasattr`` on a module costs as much as a small op, on every forward)."""
        base_layer = self._modules["base_layer"]
        if _may_have_attribute(base_layer, "base_layer"):  # a tuner layer, or any module with a `base_layer`
            return super().get_base_layer()
        return base_layer

    def _sara_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Runs once per layer call: module attributes are read through their dicts (an nn.Module `__getattr__` costs
        # about as much as a small op's dispatch), and the kernel backend is resolved only when autograd will run.
        if self.disable_adapters and self.merged_adapters:  # PEFT's public properties (class attributes)
            self.unmerge()
        active = self.present_adapters(self.active_adapters)
        base_layer = self.get_base_layer()
        path = execution_path(self, active, base_layer)
        if path is ExecutionPath.OFF:
            return self.base_layer(x, *args, **kwargs)
        if self.sara_awaiting_entries:
            _refuse_awaiting(self, active)
        grad_enabled = torch.is_grad_enabled()
        if grad_enabled and base_layer.weight.requires_grad:
            raise RuntimeError(
                f"The base weight of this SaRA layer ({type(base_layer).__name__}, shape "
                f"{tuple(base_layer.weight.shape)}) requires grad, but SaRA trains only its sparse values and would "
                "silently give the weight no gradient. Freeze it (`requires_grad_(False)`), or train the whole module "
                "with `modules_to_save` instead."
            )
        kernel = kernels.resolve_backend(self.sara_kernel[active[0]], x.device) if grad_enabled else "reference"
        if path is ExecutionPath.COMPOSABLE:
            with offload_hooks_run(
                self.sara_values, self.sara_indices, self.sara_frozen_indices, self.sara_frozen_values
            ):
                op, op_input = self._op(x)
                entries = self._forward_entries(active)
                update = update_contribution(op, op_input, self.weight_shape, entries, kernel)
                return self.base_layer(x, *args, **kwargs) + update
        entries = self._forward_entries(active)
        if not entries:
            return self.base_layer(x, *args, **kwargs)
        op, x = self._op(x)
        return sparse_delta_forward(op, x, base_layer.weight, base_layer.bias, entries, kernel)


def _refuse_awaiting(layer: SaRALayer, adapter_names: list[str]) -> None:
    awaiting = [name for name in adapter_names if layer.awaits_entries(name)]
    if awaiting:
        raise RuntimeError(
            f"SaRA adapter '{awaiting[0]}' of this layer was injected to be loaded from a checkpoint (from a config "
            "read with `SaRAConfig.from_pretrained`, or with `low_cpu_mem_usage=True`), but no checkpoint has set its "
            "entries. Load them (`PeftModel.from_pretrained`, `load_adapter`, `set_peft_model_state_dict`), or, to "
            "train a new adapter with that config's settings, build it in code: `SaRAConfig(**config.to_dict())`."
        )


class MergeGroup:
    """The SaRA layers of one model, checked together before any of them merges.

    diffusers' ``fuse_lora`` calls each layer's ``merge`` in turn; the first call of a pass checks every layer of the
    group (:meth:`SaRALayer.merge_refusal`) and remembers the pass as checked until each layer that had something to
    merge has merged, or an unmerge or a new adapter (a new group) comes first. A scale set during the pass (diffusers'
    ``fuse_lora(lora_scale=...)`` scales each layer right before its merge) does not restart the check, which would
    make a pass quadratic; ``safe_merge`` still checks each layer's own merged entries as it writes them."""

    def __init__(self, layers: dict[str, SaRALayer]) -> None:
        self.layers = layers
        self.checked: tuple[tuple[str, ...], bool] | None = None
        self.pending = 0

    def refusal(self, adapter_names: list[str] | None, safe_merge: bool) -> tuple[str | None, int]:
        """The first refusal over all layers (None if every layer can merge) and how many layers would merge."""
        pending = 0
        for name, layer in self.layers.items():
            names = list(adapter_names) if adapter_names is not None else list(layer.active_adapters)
            refusal = layer.merge_refusal(names, safe_merge, name)
            if refusal is not None:
                return refusal, 0
            pending += any(adapter not in layer.merged_adapters for adapter in layer.present_adapters(names))
        return None, pending

    def check(self, adapter_names: list[str] | None, safe_merge: bool) -> None:
        """Raise ``ValueError`` (nothing merged) unless every layer can merge ``adapter_names``; then remember it."""
        key = (tuple(adapter_names or ()), bool(safe_merge))
        if self.checked == key and adapter_names is not None:
            return
        refusal, pending = self.refusal(adapter_names, safe_merge)
        if refusal is not None:
            self.checked = None
            raise ValueError(refusal + " Nothing was merged.")
        self.checked, self.pending = (key, pending) if adapter_names is not None else (None, 0)

    def merged_one(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.checked = None


def _may_have_attribute(module: nn.Module, name: str) -> bool:
    """``hasattr(module, name)`` without the cost of nn.Module's failing ``__getattr__`` in the usual case: ``False``
    only when no instance dict, parameter, buffer, submodule or class attribute has that name. The class lookup is
    cached in eager mode; a compiled forward asks the class directly (dynamo folds it into a constant, and would warn
    that it ignores the cache)."""
    if name in module.__dict__ or name in module._modules or name in module._parameters or name in module._buffers:
        return True
    return hasattr(type(module), name) if is_compiling() else _class_has_attribute(type(module), name)


@functools.lru_cache(maxsize=256)
def _class_has_attribute(cls: type, name: str) -> bool:
    return hasattr(cls, name)


class _SaRAModule(nn.Module, SaRALayer):
    """A SaRA layer module: wraps ``base_layer`` and creates the first adapter. Subclasses only provide ``_op``."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: SaRAConfig, select_entries: bool = True, **kwargs: Any
    ) -> None:
        super().__init__()
        SaRALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, select_entries=select_entries)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args and "input" in kwargs:  # `layer(input=x)`, nn.Linear / nn.Conv's own argument name
            args = (kwargs.pop("input"),)
        return self._sara_forward(*args, **kwargs)

    def __repr__(self) -> str:
        return "sara." + super().__repr__()


class Linear(_SaRAModule):
    """SaRA on ``nn.Linear`` (and transformers' ``Conv1D``, whose weight is stored transposed)."""

    def _op(self, x):
        op = self.__dict__.get("_linear_op")  # built once (a cached_property's lock would stop torch.compile)
        if op is None:
            op = self.__dict__["_linear_op"] = LinearOp(transposed=not isinstance(self.get_base_layer(), nn.Linear))
        return op, x


class Conv(_SaRAModule):
    """SaRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: any kernel, stride, padding, dilation, groups, bias."""

    def _op(self, x):
        base_layer = self.get_base_layer()
        if base_layer.padding_mode != "zeros" or base_layer.padding == "same":  # the input may need explicit padding
            return ConvOp.for_module(base_layer, x)
        key = (base_layer.stride, base_layer.padding, base_layer.dilation, base_layer.groups)
        cached = self.__dict__.get("_conv_op")  # built once per configuration (read on every forward)
        if cached is None or cached[0] != key:
            cached = self.__dict__["_conv_op"] = (key, ConvOp.for_module(base_layer, x)[0])
        return cached[1], x


def _is_transformers_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers.pytorch_utils.Conv1D


# Wrapped module kinds, in order: (test on the base module, SaRA layer class). A new kind is one entry here.
LAYER_CLASSES: list[tuple[Any, type[SaRALayer]]] = [
    (lambda module: isinstance(module, nn.Linear), Linear),
    (lambda module: isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)), Conv),
    (_is_transformers_conv1d, Linear),
]


def dispatch_sara_layer(target: nn.Module, adapter_name: str, config: SaRAConfig, **kwargs: Any) -> nn.Module:
    """Wrap ``target`` in the SaRA layer class for its type, or raise a clear error for unsupported modules."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    for matches, layer_class in LAYER_CLASSES:
        if matches(base):
            return layer_class(target, adapter_name, config, **kwargs)
    raise TypeError(
        f"SaRA cannot adapt {type(base).__name__}: supported are nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d and "
        "transformers' Conv1D. Narrow `target_modules` to those layers."
    )


def sara_layers(model: nn.Module) -> Iterator[tuple[str, SaRALayer]]:
    """(name, layer) for every SaRA layer in ``model`` (a PeftModel, or a model with injected adapters)."""
    for name, module in model.named_modules():
        if isinstance(module, SaRALayer):
            yield name, module


def sara_adapter_names(model: nn.Module) -> list[str]:
    """Names of the SaRA adapters present in ``model``'s layers, in insertion order."""
    names: dict[str, None] = {}
    for _, layer in sara_layers(model):
        names.update(dict.fromkeys(layer.sara_values.keys()))
    return list(names)


def count_entries(model: nn.Module, adapter_name: str) -> int:
    """Stored entries (trainable and frozen) of one adapter over all of ``model``'s SaRA layers."""
    return sum(layer.num_entries(adapter_name) for _, layer in sara_layers(model) if adapter_name in layer.sara_values)


__all__ = [
    "SaRALayer",
    "MergeGroup",
    "SparseUpdate",
    "Linear",
    "Conv",
    "dispatch_sara_layer",
    "sara_layers",
    "sara_adapter_names",
    "count_entries",
]
