"""SaRA tuner layers: the ``SaRALayer`` mixin, one class per wrapped module type, and the layer walker.

Everything outside this module reads a layer through its public API: :meth:`SaRALayer.get_sparse_update` (indices,
values and scale of an adapter, frozen entries included), :meth:`SaRALayer.trainable_entries` /
:meth:`SaRALayer.frozen_entries`, :meth:`SaRALayer.get_delta_weight` and :meth:`SaRALayer.num_entries`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn

from . import kernels
from .base_weight import MergeBackup, logical_weight_shape, merge_entries_, readable_weight, unmerge_entries_
from .capacity import load_state_dict_into_capacity, state_dict_live_entries_only
from .config import SaRAConfig
from .constants import CACHE_ENV_VAR
from .custom_ops import compiled_sparse_delta
from .functional import (
    ConvOp,
    LinearOp,
    SparseDeltaOp,
    SparseUpdate,
    composable_reason,
    effective_weight,
    has_forward_hooks,
    offload_hooks_run,
    patched_copy,
    sparse_delta_forward,
    unpatchable_storage_reason,
    update_contribution,
)
from .masks import (
    check_entries,
    compact_,
    compute_dtype,
    gathered,
    index_dtype_for,
    select_trainable_indices,
    still_ineffective,
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
    # PEFT's protocol for diffusers' layerwise casting: SaRA layers may cast their input to the compute dtype.
    cast_input_dtype_enabled: bool = True
    other_param_names = (
        "sara_indices",
        "sara_frozen_indices",
        "sara_frozen_values",
        "sara_scaling",
        "sara_cutoff",
        "sara_kernel",
        "sara_num_trainable",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.sara_values = nn.ParameterDict({})
        self.sara_indices = BufferDict(persistent=True)
        self.sara_frozen_indices = BufferDict(persistent=True)
        self.sara_frozen_values = BufferDict(persistent=True)
        self.sara_scaling: dict[str, float] = {}
        self.sara_cutoff: dict[str, float] = {}
        self.sara_kernel: dict[str, str] = {}
        # Live (trainable) entries at the front of `sara_values` / `sara_indices`; re-selection compacts the survivors
        # there and leaves an inert, zeroed tail, so the Parameter keeps its size and identity for the whole run.
        self.sara_num_trainable: dict[str, int] = {}
        # The state dict holds only the live entries; loading pads them back to the layer's capacity.
        self.register_state_dict_post_hook(state_dict_live_entries_only)
        self.register_load_state_dict_pre_hook(load_state_dict_into_capacity)
        # Base entries overwritten by `merge`, per merged adapter; written back bitwise by `unmerge`.
        self._sara_merge_backup: dict[str, MergeBackup] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())

    # ----------------------------------------------------------------------------------------------- adapters
    def update_layer(self, adapter_name: str, config: SaRAConfig, **kwargs: Any) -> None:
        """Select the trainable entries of the base weight and create the adapter's (zero) update."""
        if self.merged:
            raise RuntimeError(
                f"Cannot add SaRA adapter '{adapter_name}' while adapters {self.merged_adapters} are merged: the "
                "selection would read the merged weight. Call `unmerge_adapter()` first."
            )
        base_layer = self.get_base_layer()
        if unpatchable_storage_reason(base_layer.weight) is None and not base_layer.weight.is_contiguous():
            # Flat indices address the logical (row-major) layout; keep the base weight in it. Values are unchanged.
            base_layer.weight.data = base_layer.weight.data.contiguous()
        # Selection reads the dense weight: dequantized (bitsandbytes), upcast (fp8) or onloaded (offloaded to meta).
        with readable_weight(base_layer) as weight:
            indices, cutoff = select_trainable_indices(weight, config.threshold, config.trainable_fraction)
            device = weight.device
        # Created in the base dtype, like PEFT's other tuners: PeftModel upcasts half-precision adapter values to
        # float32 unless `autocast_adapter_dtype=False`; float64 bases keep float64 values; quantized bases float32.
        value_dtype = value_dtype_for(base_layer.weight.dtype)
        if config.init_weights:
            values = torch.zeros(indices.numel(), dtype=value_dtype, device=device)
        else:
            values = (torch.randn(indices.numel(), device=device) * RANDOM_INIT_STD).to(value_dtype)
        self.sara_indices[adapter_name] = indices.to(device)
        self.sara_values[adapter_name] = nn.Parameter(values)
        self.sara_num_trainable[adapter_name] = indices.numel()  # all entries live until a re-selection
        self.sara_frozen_indices[adapter_name] = torch.zeros(0, dtype=indices.dtype, device=device)
        self.sara_frozen_values[adapter_name] = torch.zeros(0, dtype=value_dtype, device=device)
        self.sara_scaling[adapter_name] = 1.0
        self.sara_cutoff[adapter_name] = cutoff
        self.sara_kernel[adapter_name] = config.kernel
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def set_trainable_entries(
        self,
        adapter_name: str,
        indices: torch.Tensor,
        values: torch.Tensor | None = None,
        frozen_indices: torch.Tensor | None = None,
        frozen_values: torch.Tensor | None = None,
    ) -> None:
        """Set an adapter's trainable (and frozen) entries, e.g. to fit a checkpoint or a combination of adapters.

        Entries that fit into the current capacity are written in place (the values Parameter keeps its identity, so
        optimizers and DDP / FSDP wrappers stay valid; pending gradients are dropped); more entries than that replace
        the Parameter by a larger one (rebuild optimizers then).
        """
        self._check_entries(adapter_name, indices, values, "trainable")
        if frozen_indices is not None:
            self._check_entries(adapter_name, frozen_indices, frozen_values, "frozen")
        self._clear_index_caches()
        param = self.sara_values[adapter_name]
        device = param.device  # where the adapter lives (an offloaded base's weight is on meta)
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
        self.sara_num_trainable[adapter_name] = indices.numel()
        if frozen_indices is not None:
            self.sara_frozen_indices[adapter_name] = frozen_indices.to(device=device, dtype=index_dtype)
            self.sara_frozen_values[adapter_name] = frozen_values.detach().to(device=device, dtype=param.dtype)

    def reselect(self, adapter_name: str, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Progressive adjustment: keep training only the entries whose current weight is still within the cutoff.

        Entries that grew past it move to the frozen set with their learned deltas. In place: the survivors move to the
        front of the values Parameter, of its pending gradient and of the index buffer; the freed tail is zeroed and
        inert (never written to the weight, never saved, zero gradient). Parameters keep their size and identity.

        ``keep`` overrides the decision (a boolean mask over the trainable entries, as :meth:`reselection_mask`
        returns; :class:`peft_sara.training.SaRATrainingHelper` passes rank 0's on every rank). Returns the mask used:
        re-order per-entry optimizer state with it (:func:`peft_sara.masks.compact_`).
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
        self.sara_frozen_indices[adapter_name] = frozen_indices
        self.sara_frozen_values[adapter_name] = frozen_values
        self.sara_num_trainable[adapter_name] = int(keep.sum())
        self._clear_index_caches()
        return keep

    @torch.no_grad()
    def reselection_mask(self, adapter_name: str) -> torch.Tensor:
        """Boolean mask over the trainable entries: those whose current weight (base + delta) is within the cutoff.

        A pure function of the base weight and the values, so ranks holding bitwise-identical copies agree on it.
        """
        count = self.num_trainable(adapter_name)
        indices = self.sara_indices[adapter_name][:count]
        values = gathered(self.sara_values[adapter_name]).detach()[:count]
        with readable_weight(self.get_base_layer()) as weight:  # dequantized / onloaded where needed
            base_entries = gathered(weight).detach().reshape(-1).index_select(0, indices)
        current = base_entries.to(compute_dtype(base_entries.dtype, values.dtype)) + values
        return still_ineffective(current, self.sara_cutoff[adapter_name])

    def _clear_index_caches(self) -> None:
        self.__dict__.pop("_sara_live_views", None)

    def _live_prefix(self, tensor: torch.Tensor, count: int) -> torch.Tensor:
        """``tensor[:count]``, the same view object while ``tensor`` and ``count`` stay (index caches key on it)."""
        if torch.compiler.is_compiling():
            return tensor[:count]
        views = self.__dict__.setdefault("_sara_live_views", {})
        cached = views.get(id(tensor))
        if cached is None or cached[0] is not tensor or cached[1] != count:
            cached = views[id(tensor)] = (tensor, count, tensor[:count])
        return cached[2]

    def _check_entries(self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor | None, what: str) -> None:
        numel = self.weight_shape.numel()
        check_entries(indices, values, numel, f"{what} entries of SaRA adapter '{adapter_name}'")

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # Only follow the base weight's device: the values keep their dtype (set at creation and by PEFT's autocast).
        device = device if device is not None else self.get_base_layer().weight.device
        if torch.device(device).type == "meta":  # an offloaded base: the adapter stays where it was created
            return
        for container in (self.sara_values, self.sara_indices, self.sara_frozen_indices, self.sara_frozen_values):
            if adapter_name in container:
                container[adapter_name] = container[adapter_name].to(device)

    # ------------------------------------------------------------------------------------------------ public API
    @property
    def weight_shape(self) -> torch.Size:
        """Shape of the base weight the flat indices address (the logical shape of a packed 4-bit weight)."""
        return logical_weight_shape(self.get_base_layer())

    def present_adapters(self, adapter_names: list[str]) -> list[str]:
        """The names among ``adapter_names`` that this layer has an update for (in order)."""
        return [name for name in adapter_names if name in self.sara_values]

    def trainable_entries(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices of an adapter's trainable entries and their deltas, differentiable into ``sara_values``.

        Only the live entries: after a re-selection both are prefixes (views) of the fixed-capacity index buffer and
        values Parameter; before it, the buffer and the Parameter themselves.
        """
        count = self.num_trainable(adapter_name)
        indices, values = self.sara_indices[adapter_name], self.sara_values[adapter_name]
        if count == values.shape[0]:
            return indices, values
        return self._live_prefix(indices, count), values[:count]  # slicing keeps autograd to the Parameter

    def frozen_entries(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices and deltas of the entries frozen by progressive re-selection (empty before it)."""
        return self.sara_frozen_indices[adapter_name], self.sara_frozen_values[adapter_name]

    def get_sparse_update(self, adapter_name: str) -> SparseUpdate:
        """An adapter's whole update of this layer (trainable then frozen entries, int64 indices, detached)."""
        indices, values, _ = self._sparse_parts([adapter_name])
        value_dtype = compute_dtype(self.sara_values[adapter_name].dtype)
        empty = torch.zeros(0, dtype=value_dtype, device=self.sara_values[adapter_name].device)
        return SparseUpdate(
            indices=torch.cat(indices) if indices else empty.long(),
            values=torch.cat([part.detach().to(value_dtype) for part in values]) if values else empty,
            scale=self.sara_scaling[adapter_name],
            weight_shape=self.weight_shape,
        )

    def num_entries(self, adapter_name: str, trainable_only: bool = False) -> int:
        """Number of stored entries of an adapter in this layer (trainable, plus frozen unless ``trainable_only``)."""
        count = self.num_trainable(adapter_name)
        return count if trainable_only else count + self.sara_frozen_values[adapter_name].numel()

    def num_trainable(self, adapter_name: str) -> int:
        """Number of trainable (live) entries of an adapter in this layer; the values Parameter may hold more."""
        return self.sara_num_trainable.get(adapter_name, self.sara_values[adapter_name].shape[0])

    def _sparse_parts(self, adapter_names: list[str], int64_indices: bool = True):
        """(indices, values, scale) lists of the live trainable and the frozen entries of the given adapters.

        Indices come as stored (int32 where they fit); ``int64_indices`` converts them (for the public API and
        merging; the forward converts inside the op, once per call, instead of keeping int64 copies around).
        """
        indices, values, scales = [], [], []
        for name in adapter_names:
            scale = self.sara_scaling[name]
            for idx, vals in (self.trainable_entries(name), self.frozen_entries(name)):
                if idx.numel():
                    indices.append(idx.long() if int64_indices else idx)
                    values.append(vals)
                    scales.append(scale)
        return indices, values, scales

    # ------------------------------------------------------------------------------------------------ scaling
    def set_scale(self, adapter: str, scale: float) -> None:
        """Set the strength of ``adapter`` (1.0 = as trained)."""
        if adapter in self.sara_scaling:
            self.sara_scaling[adapter] = float(scale)

    def scale_layer(self, scale: float) -> None:
        """Multiply the strength of the active adapters by ``scale`` (diffusers' ``cross_attention_kwargs``)."""
        if scale == 1:
            return
        for adapter in self.active_adapters:
            if adapter in self.sara_scaling:
                self.sara_scaling[adapter] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Undo :meth:`scale_layer` (``None`` resets the active adapters to strength 1.0)."""
        for adapter in self.active_adapters:
            if adapter not in self.sara_scaling:
                continue
            if scale is None:
                self.sara_scaling[adapter] = 1.0
            elif scale != 0:
                self.sara_scaling[adapter] /= scale

    # ------------------------------------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ``scale * Delta_W`` of one adapter, shaped like the base weight, in the base dtype (float32 for
        quantized storage)."""
        return self.get_sparse_update(adapter_name).to_dense().to(value_dtype_for(self.get_base_layer().weight.dtype))

    def get_effective_weight(self, adapter_names: list[str] | None = None) -> torch.Tensor:
        """Dense copy of the weight the layer computes with (base with the adapters' entries patched)."""
        adapter_names = self.present_adapters(adapter_names if adapter_names is not None else self.active_adapters)
        with torch.no_grad(), readable_weight(self.get_base_layer()) as weight:
            return effective_weight(weight, *self._sparse_parts(adapter_names))

    @torch.no_grad()
    def merge_is_finite(self, adapter_name: str) -> bool:
        """Whether merging ``adapter_name`` would write only finite entries (no weight is changed)."""
        with readable_weight(self.get_base_layer()) as weight:
            flat_weight = weight.reshape(-1)
            for idx, vals, scale in zip(*self._sparse_parts([adapter_name])):
                merged = kernels.reference.patched_values(flat_weight.index_select(0, idx), vals, scale)
                if not torch.isfinite(merged).all():
                    return False
        return True

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the adapters' updates into the base weight (only the changed entries are touched; a bitsandbytes
        weight is requantized). Layers that share their weight with another SaRA layer refuse."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        tied = getattr(self, "_sara_tied_layers", None)
        if tied and self.present_adapters(adapter_names):
            raise ValueError(
                f"Cannot merge SaRA adapters {adapter_names}: this layer shares its weight with {tied}, so a merged "
                "weight would apply every sharing layer's update in each of them. Keep these adapters unmerged."
            )
        base_layer = self.get_base_layer()
        for name in self.present_adapters(adapter_names):
            where = f"SaRA adapter '{name}' into {type(base_layer).__name__} of shape {tuple(self.weight_shape)}"
            self._sara_merge_backup[name] = merge_entries_(base_layer, *self._sparse_parts([name]), safe_merge, where)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the base weight bitwise."""
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
        """Why this layer cannot patch its base weight in place (see :func:`peft_sara.functional.composable_reason`),
        or ``None`` when the fast in-place path is safe."""
        return composable_reason(self.get_base_layer())

    def _sara_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.is_grad_enabled() and "_sara_inference_weight" in self.__dict__:
            output = self._cached_inference_forward(x)
            if output is not None:
                return output
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = self.present_adapters(self.active_adapters)
        if not active:
            return self.base_layer(x, *args, **kwargs)
        base_layer = self.get_base_layer()
        if base_layer.weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"The base weight of this SaRA layer ({type(base_layer).__name__}, shape "
                f"{tuple(base_layer.weight.shape)}) requires grad, but SaRA trains only its sparse values and would "
                "silently give the weight no gradient. Freeze it (`requires_grad_(False)`), or train the whole module "
                "with `modules_to_save` instead."
            )
        if composable_reason(base_layer) is not None:
            with offload_hooks_run(
                self.sara_values, self.sara_indices, self.sara_frozen_indices, self.sara_frozen_values
            ):
                return self.base_layer(x, *args, **kwargs) + self._update_contribution(x, active)
        backend = kernels.resolve_backend(self.sara_kernel[active[0]], base_layer.weight.device)
        compiling = torch.compiler.is_compiling()  # the registered op: traced whole, no data-dependent Python
        indices, values, scales = self._sparse_parts(active, int64_indices=False)
        if not indices:
            return self.base_layer(x, *args, **kwargs)
        op, x = self._op(x)
        if compiling:
            return compiled_sparse_delta(op, x, base_layer.weight, base_layer.bias, indices, values, scales, backend)
        if not torch.is_grad_enabled():  # inference: never write into the base weight (threads, state_dict)
            return op.forward(
                x, self._inference_weight(base_layer.weight, indices, values, scales, backend), base_layer.bias
            )
        self.__dict__.pop("_sara_inference_weight", None)  # training holds no inference copy
        return sparse_delta_forward(op, x, base_layer.weight, base_layer.bias, indices, values, scales, backend)

    def _inference_weight(self, weight, indices, values, scales, backend) -> torch.Tensor:
        """The patched weight for no-grad forwards: a copy, kept while the weight, values and scales are unchanged
        (one weight-sized tensor per layer; ``PEFT_SARA_CACHE_PATCHED_WEIGHTS=0`` rebuilds it on every call)."""
        patched = patched_copy(weight, indices, values, scales, backend)
        if os.environ.get(CACHE_ENV_VAR, "1") != "0":
            self.__dict__["_sara_inference_weight"] = (self._inference_key(weight), patched)
        return patched

    def _inference_key(self, weight: torch.Tensor) -> tuple:
        """What the cached patched weight depends on: the base weight's identity, storage and version, and per active
        adapter its scale, live count and the identity and version of its trainable and frozen values."""
        values, frozen = self._modules["sara_values"]._parameters, self._modules["sara_frozen_values"]._buffers
        adapters = tuple(
            (name, self.sara_scaling[name], self.sara_num_trainable.get(name), id(v), v._version, id(f), f._version)
            for name in self.active_adapters
            if (v := values.get(name)) is not None and (f := frozen.get(name)) is not None
        )
        return id(weight), weight.data_ptr(), weight._version, adapters

    def _cached_inference_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The no-grad forward with the cached patched weight, or ``None`` when it does not apply (merged, disabled,
        hooked base layer, compiling) or is stale; the general path then runs (and refreshes the cache)."""
        base_layer = self.get_base_layer()
        if self.merged or self.disable_adapters or has_forward_hooks(base_layer) or torch.compiler.is_compiling():
            return None
        key, patched = self.__dict__["_sara_inference_weight"]
        if key != self._inference_key(base_layer.weight):
            return None
        op, x = self._op(x)
        return op.forward(x, patched, base_layer.bias)

    def _update_contribution(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        op, x = self._op(x)
        parts = self._sparse_parts(adapter_names, int64_indices=False)  # index_add takes int32 indices as they are
        return update_contribution(op, x, self.weight_shape, *parts)


class _SaRAModule(nn.Module, SaRALayer):
    """A SaRA layer module: wraps ``base_layer`` and creates the first adapter. Subclasses only provide ``_op``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SaRAConfig, **kwargs: Any) -> None:
        super().__init__()
        SaRALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

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
        return ConvOp.for_module(self.get_base_layer(), x)


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
    "SparseUpdate",
    "Linear",
    "Conv",
    "dispatch_sara_layer",
    "sara_layers",
    "sara_adapter_names",
    "count_entries",
]
