"""SaRA tuner layers: the ``SaRALayer`` mixin, one class per wrapped module type, and the layer walker.

Everything outside this module reads a layer through its public API: :meth:`SaRALayer.get_sparse_update` (indices,
values and scale of an adapter, frozen entries included), :meth:`SaRALayer.trainable_entries` /
:meth:`SaRALayer.frozen_entries`, :meth:`SaRALayer.get_delta_weight` and :meth:`SaRALayer.num_entries`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn

from . import kernels
from .config import SaRAConfig
from .functional import (
    ConvOp,
    LinearOp,
    SparseDeltaOp,
    SparseUpdate,
    composable_reason,
    effective_weight,
    offload_hooks_run,
    sparse_delta_forward,
    storage_lock,
    unpatchable_storage_reason,
    update_contribution,
)
from .masks import (
    check_entries,
    compute_dtype,
    index_dtype_for,
    select_trainable_indices,
    still_ineffective,
    value_dtype_for,
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
        # Base entries overwritten by `merge`, per merged adapter; written back bitwise by `unmerge`.
        self._sara_merge_backup: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
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
        if not base_layer.weight.is_contiguous():
            # Flat indices address the logical (row-major) layout; keep the base weight in it. Values are unchanged.
            base_layer.weight.data = base_layer.weight.data.contiguous()
        weight = base_layer.weight
        indices, cutoff = select_trainable_indices(weight, config.threshold, config.trainable_fraction)
        # Created in the base dtype, like PEFT's other tuners: PeftModel upcasts half-precision adapter values to
        # float32 unless `autocast_adapter_dtype=False`; float64 bases keep float64 values.
        value_dtype = value_dtype_for(weight.dtype)
        if config.init_weights:
            values = torch.zeros(indices.numel(), dtype=value_dtype, device=weight.device)
        else:
            values = (torch.randn(indices.numel(), device=weight.device) * RANDOM_INIT_STD).to(value_dtype)
        self.sara_indices[adapter_name] = indices.to(weight.device)
        self.sara_values[adapter_name] = nn.Parameter(values)
        self.sara_frozen_indices[adapter_name] = torch.zeros(0, dtype=indices.dtype, device=weight.device)
        self.sara_frozen_values[adapter_name] = torch.zeros(0, dtype=value_dtype, device=weight.device)
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
        """Replace an adapter's trainable (and frozen) entries, e.g. after re-selection or to fit a checkpoint.

        The values Parameter is replaced by a new one: rebuild optimizers afterwards (see ``peft_sara.training``).
        """
        self._check_entries(adapter_name, indices, values, "trainable")
        self.__dict__.pop("_sara_int64_cache", None)
        device = self.get_base_layer().weight.device
        index_dtype = index_dtype_for(self.get_base_layer().weight.numel())
        requires_grad = self.sara_values[adapter_name].requires_grad
        value_dtype = self.sara_values[adapter_name].dtype  # keep the dtype PEFT's autocast chose
        if values is None:
            values = torch.zeros(indices.numel(), dtype=value_dtype)
        self.sara_indices[adapter_name] = indices.to(device=device, dtype=index_dtype)
        self.sara_values[adapter_name] = nn.Parameter(
            values.detach().to(device=device, dtype=value_dtype), requires_grad=requires_grad
        )
        if frozen_indices is not None:
            self._check_entries(adapter_name, frozen_indices, frozen_values, "frozen")
            self.sara_frozen_indices[adapter_name] = frozen_indices.to(device=device, dtype=index_dtype)
            self.sara_frozen_values[adapter_name] = frozen_values.detach().to(device=device, dtype=value_dtype)

    def reselect(self, adapter_name: str) -> torch.Tensor:
        """Progressive adjustment: keep training only the entries whose current weight is still below the cutoff.

        Entries that grew past it move to the frozen set with their learned deltas. Returns the boolean mask over the
        previous trainable entries that survived (used to carry optimizer state over).
        """
        if self.merged:
            raise RuntimeError(
                f"Cannot re-select SaRA adapter '{adapter_name}' while adapters {self.merged_adapters} are merged: "
                "the test would read the merged weight. Call `unmerge_adapter()` first."
            )
        indices = self.sara_indices[adapter_name]
        values = self.sara_values[adapter_name].detach()
        base_entries = self.get_base_layer().weight.detach().reshape(-1).index_select(0, indices)
        current = base_entries.to(compute_dtype(base_entries.dtype, values.dtype)) + values
        keep = still_ineffective(current, self.sara_cutoff[adapter_name])
        frozen_indices = torch.cat([self.sara_frozen_indices[adapter_name], indices[~keep]])
        frozen_values = torch.cat([self.sara_frozen_values[adapter_name], values[~keep]])
        self.set_trainable_entries(adapter_name, indices[keep], values[keep], frozen_indices, frozen_values)
        return keep

    def _check_entries(self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor | None, what: str) -> None:
        numel = self.get_base_layer().weight.numel()
        check_entries(indices, values, numel, f"{what} entries of SaRA adapter '{adapter_name}'")

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # Only follow the base weight's device: the values keep their dtype (set at creation and by PEFT's autocast).
        device = device if device is not None else self.get_base_layer().weight.device
        for container in (self.sara_values, self.sara_indices, self.sara_frozen_indices, self.sara_frozen_values):
            if adapter_name in container:
                container[adapter_name] = container[adapter_name].to(device)

    # ------------------------------------------------------------------------------------------------ public API
    @property
    def weight_shape(self) -> torch.Size:
        """Shape of the base weight the flat indices address."""
        return self.get_base_layer().weight.shape

    def present_adapters(self, adapter_names: list[str]) -> list[str]:
        """The names among ``adapter_names`` that this layer has an update for (in order)."""
        return [name for name in adapter_names if name in self.sara_values]

    def trainable_entries(self, adapter_name: str) -> tuple[torch.Tensor, nn.Parameter]:
        """Flat indices of an adapter's trainable entries and the Parameter of their deltas (differentiable)."""
        return self.sara_indices[adapter_name], self.sara_values[adapter_name]

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
        count = self.sara_values[adapter_name].numel()
        return count if trainable_only else count + self.sara_frozen_values[adapter_name].numel()

    def num_trainable(self, adapter_name: str) -> int:
        """Number of trainable entries of an adapter in this layer."""
        return self.num_entries(adapter_name, trainable_only=True)

    def _sparse_parts(self, adapter_names: list[str], int64_indices: bool = True):
        """(indices, values, scale) lists of the trainable and frozen entries of the given adapters.

        With ``int64_indices`` the indices come as int64 copies cached per index tensor (PyTorch's scatter/gather
        need int64; converting on every forward would cost a pass over the indices each time).
        """
        indices, values, scales = [], [], []
        for name in adapter_names:
            scale = self.sara_scaling[name]
            for idx, vals in (
                (self.sara_indices[name], self.sara_values[name]),
                (self.sara_frozen_indices[name], self.sara_frozen_values[name]),
            ):
                if idx.numel():
                    indices.append(self._int64(idx) if int64_indices else idx)
                    values.append(vals)
                    scales.append(scale)
        return indices, values, scales

    def _int64(self, indices: torch.Tensor) -> torch.Tensor:
        return kernels.int64_indices(indices, self.__dict__.setdefault("_sara_int64_cache", {}))

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
        """Dense ``scale * Delta_W`` of one adapter, shaped like the base weight, in the base dtype."""
        return self.get_sparse_update(adapter_name).to_dense().to(self.get_base_layer().weight.dtype)

    def get_effective_weight(self, adapter_names: list[str] | None = None) -> torch.Tensor:
        """Dense copy of the weight the layer computes with (base with the adapters' entries patched)."""
        adapter_names = self.present_adapters(adapter_names if adapter_names is not None else self.active_adapters)
        with torch.no_grad():
            return effective_weight(self.get_base_layer().weight, *self._sparse_parts(adapter_names))

    @torch.no_grad()
    def merge_is_finite(self, adapter_name: str) -> bool:
        """Whether merging ``adapter_name`` would write only finite entries (no weight is changed)."""
        flat_weight = self.get_base_layer().weight.detach().reshape(-1)
        for idx, vals, scale in zip(*self._sparse_parts([adapter_name])):
            merged = kernels.reference.patched_values(flat_weight.index_select(0, idx), vals, scale)
            if not torch.isfinite(merged).all():
                return False
        return True

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the adapters' updates into the base weight (only the changed entries are touched)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        reason = unpatchable_storage_reason(weight)
        if reason is not None:
            raise ValueError(
                f"Cannot merge SaRA adapters {adapter_names} into this {type(self.get_base_layer()).__name__}: "
                f"{reason}. Keep the adapter unmerged (it runs through the base layer), or load the base in a plain "
                "float dtype to merge."
            )
        flat_weight = weight.data.view(-1)
        for name in self.present_adapters(adapter_names):
            indices, values, scales = self._sparse_parts([name])
            backups = []
            with storage_lock(weight), torch.no_grad():
                for idx, vals, scale in zip(indices, values, scales):
                    backups.append((idx, kernels.reference.patch_entries_(flat_weight, idx, vals, scale)))
                if safe_merge and not all(torch.isfinite(flat_weight.index_select(0, idx)).all() for idx, _ in backups):
                    for idx, old in reversed(backups):
                        kernels.reference.restore_entries_(flat_weight, idx, old)
                    raise ValueError(
                        f"NaNs or infs detected while merging adapter '{name}' into "
                        f"{type(self.get_base_layer()).__name__} of shape {tuple(weight.shape)}: the adapter "
                        "seems to be broken. Nothing was merged for it."
                    )
            self._sara_merge_backup[name] = backups
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the base weight bitwise."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        flat_weight = self.get_base_layer().weight.data.view(-1)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with storage_lock(flat_weight), torch.no_grad():
                for idx, old in reversed(self._sara_merge_backup.pop(name, [])):
                    kernels.reference.restore_entries_(flat_weight, idx, old)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """SaRA is additive (W' = W + Delta_W), so its update can be approximated by LoRA via SVD."""
        return True

    # ------------------------------------------------------------------------------------------------ forward
    def _op(self, x: torch.Tensor) -> tuple[SparseDeltaOp, torch.Tensor]:
        """The dense op of the wrapped module and the input to run it on (after any padding the module applies)."""
        raise NotImplementedError

    def composable_reason(self) -> str | None:
        """Why this layer cannot patch its base weight in place (see :func:`peft_sara.functional.composable_reason`),
        or ``None`` when the fast in-place path is safe."""
        return composable_reason(self.get_base_layer())

    def _sara_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
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
        indices, values, scales = self._sparse_parts(active, int64_indices=backend == "reference")
        if not indices:
            return self.base_layer(x, *args, **kwargs)
        op, x = self._op(x)
        return sparse_delta_forward(op, x, base_layer.weight, base_layer.bias, indices, values, scales, backend)

    def _update_contribution(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        op, x = self._op(x)
        return update_contribution(op, x, self.weight_shape, *self._sparse_parts(adapter_names))


class _SaRAModule(nn.Module, SaRALayer):
    """A SaRA layer module: wraps ``base_layer`` and creates the first adapter. Subclasses only provide ``_op``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SaRAConfig, **kwargs: Any) -> None:
        super().__init__()
        SaRALayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._sara_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "sara." + super().__repr__()


class Linear(_SaRAModule):
    """SaRA on ``nn.Linear`` (and transformers' ``Conv1D``, whose weight is stored transposed)."""

    @functools.cached_property
    def _linear_op(self) -> LinearOp:
        return LinearOp(transposed=not isinstance(self.get_base_layer(), nn.Linear))

    def _op(self, x):
        return self._linear_op, x


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
