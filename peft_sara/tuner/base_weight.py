"""Reading and rewriting a base layer's weight whatever its storage, through the layer's resolved backend.

:func:`resolve_storage_backend` asks each backend module of :mod:`peft_sara.tuner.quantized` once and returns a
:class:`~peft_sara.tuner.quantized.StorageBackend` (PEFT's ``QuantizationBackend`` interface), or ``None`` for a plain
floating weight; a SaRA layer calls it at creation and again only when its base weight object is replaced or cast,
and keeps the answer as ``layer.quantization_backend``. From that backend and the base layer's hooks,
:func:`execution_path` decides how a layer runs (off / main / composable), and every caller asks it.

SaRA selects entries by magnitude and merges by writing entries, so it needs the weight as a dense floating tensor of
the layer's logical shape: :func:`readable_weight` gives one (dequantized or onloaded for the duration), and
:func:`merge_entries_` writes a merged weight back (in place, requantized by the backend, or refused).
"""

from __future__ import annotations

import contextlib
import enum
import warnings
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from .functional import SparseEntries, has_forward_hooks
from .kernels.reference import patched_values
from .quantized import StorageBackend, bnb, gguf, quanto, storage, torchao

# The backend modules, asked in order (the first that claims the weight resolves it); `storage` last: it claims
# whatever floating storage of 2+ bytes is not plain.
BACKEND_MODULES = (bnb, torchao, quanto, gguf, storage)

HOOKS_REASON = "the base layer has forward hooks (offloading, layerwise casting, ...)"


class ExecutionPath(enum.Enum):
    """How a SaRA layer runs. ``OFF``: the base layer alone (adapters disabled, merged, or none active here).
    ``MAIN``: the op on the base weight with the entries patched in (a plain floating weight, no hooks).
    ``COMPOSABLE``: the base layer's own forward plus the update's contribution (hooks, or storage of a backend)."""

    OFF = "off"
    MAIN = "main"
    COMPOSABLE = "composable"


def resolve_storage_backend(base_layer: nn.Module) -> StorageBackend | None:
    """The backend storing ``base_layer``'s weight, or ``None`` for a plain floating weight SaRA computes with and
    writes into directly. Asks each backend module once; a library never imported stores nothing, so none is imported
    to answer."""
    weight = base_layer.weight
    if type(weight) in storage.PLAIN_TENSOR_TYPES and weight.dtype.itemsize >= 2 and weight.dtype.is_floating_point:
        if not weight.is_meta and quanto.resolve(base_layer) is None:  # the common case (quanto keeps a float weight)
            return None
    for module in BACKEND_MODULES:
        backend = module.resolve(base_layer)
        if backend is not None:
            backend.prepare(base_layer)
            return backend
    return None


def execution_path(layer: nn.Module, adapter_names: Sequence[str], base_layer: nn.Module) -> ExecutionPath:
    """The one decision of how ``layer`` runs for the ``adapter_names`` it holds (see :class:`ExecutionPath`).

    Off when the layer's adapters are disabled or merged or none is given; composable when calling the base layer runs
    more than its ``forward`` (accelerate's offload hooks, diffusers' layerwise casting: those can be added at any
    time, so they are looked at on each call) or its weight has a storage backend; main otherwise.
    """
    if layer.disable_adapters or layer.merged_adapters or not adapter_names:
        return ExecutionPath.OFF
    if has_forward_hooks(base_layer) or layer.storage_backend(base_layer) is not None:
        return ExecutionPath.COMPOSABLE
    return ExecutionPath.MAIN


def composable_reason(layer: nn.Module, base_layer: nn.Module) -> str | None:
    """Why ``layer`` runs its base layer's own forward (its hooks, or the weight's storage), or ``None`` if it does
    not, for messages; :func:`execution_path` decides."""
    if execution_path(layer, list(layer.sara_values.keys()), base_layer) is not ExecutionPath.COMPOSABLE:
        return None
    if has_forward_hooks(base_layer):
        return HOOKS_REASON
    return layer.storage_backend(base_layer).storage_reason


class ResolvedFor:
    """The weight object (held weakly: an offloaded weight must be freed once moved off) and dtype a layer's storage
    backend was resolved for. A copied or unpickled layer resolves again."""

    __slots__ = ("reference", "dtype", "offloaded_type")

    def __init__(self, weight: torch.Tensor | None = None) -> None:
        self.reference = weakref.ref(weight) if weight is not None else _no_weight
        self.dtype = weight.dtype if weight is not None else None
        self.offloaded_type = type(weight) if weight is not None and weight.is_meta else None

    def still_holds(self, weight: torch.Tensor) -> bool:
        """Whether a weight other than the one resolved has the same storage anyway: accelerate's offload hooks put a
        new meta parameter of the same type and dtype in place after each forward."""
        return self.offloaded_type is type(weight) and weight.is_meta and weight.dtype is self.dtype

    def __reduce__(self) -> tuple:
        return (ResolvedFor, ())

    def __deepcopy__(self, memo: dict) -> ResolvedFor:
        return ResolvedFor()


def _no_weight() -> None:
    return None


def logical_weight_shape(base_layer: nn.Module, backend: StorageBackend | None) -> torch.Size:
    """Shape of the weight the layer computes with (packed quantized storage has another shape)."""
    return backend.logical_shape(base_layer) if backend is not None else base_layer.weight.shape


_RESOLVE = object()


@contextlib.contextmanager
def readable_weight(
    base_layer: nn.Module, backend: StorageBackend | None | object = _RESOLVE
) -> Iterator[torch.Tensor]:
    """The base weight as a dense floating tensor of its logical shape, for reading only.

    Plain weights come as they are; others as their ``backend`` (resolved here when not given) reads them: dequantized,
    fp8 upcast to float32; a weight offloaded to the meta device is onloaded through its accelerate hook for the
    duration (the onloaded weight is another object, resolved again).
    """
    hook = getattr(base_layer, "_hf_hook", None)
    onload = hook is not None and base_layer.weight.is_meta
    if onload:
        hook.pre_forward(base_layer)
        backend = _RESOLVE
    try:
        if backend is _RESOLVE:
            backend = resolve_storage_backend(base_layer)
        yield base_layer.weight.detach() if backend is None else backend.get_base_weight(base_layer)
    finally:
        if onload:
            hook.post_forward(base_layer, None)


@dataclass
class MergeBackup:
    """What :func:`unmerge_entries_` needs to restore a base weight bitwise: the overwritten entries of a plain weight
    (per entry set: its flat indices and their old values), or the whole previous parameter of a quantized one
    (requantizing is lossy, restoring is not) with the backend that swaps it back."""

    entries: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    weight: nn.Parameter | None = None
    backend: StorageBackend | None = None


def merge_refusal(backend: StorageBackend | None) -> str | None:
    """Why a weight of this storage cannot take a merge, or ``None`` if it can (in place, or requantized)."""
    if backend is None or backend.supports_merge:
        return None
    return backend.merge_refusal


@torch.no_grad()
def merge_entries_(layer: nn.Module, entries: Sequence[SparseEntries], check_finite: bool, where: str) -> MergeBackup:
    """Write ``cast(w + scale * delta)`` at each entry set into ``layer``'s base weight; a quantized weight is read
    dense, patched and requantized by the layer's backend (with a warning: requantization rounds every entry of the
    layer), or the merge is refused where the backend cannot write. ``where`` names the adapter and layer in errors.
    Raises, changing nothing, if ``check_finite`` and a written entry is not finite."""
    base_layer = layer.get_base_layer()
    backend = layer.storage_backend(base_layer)
    refusal = merge_refusal(backend)
    if refusal is not None:
        raise ValueError(f"Cannot merge {where}: {refusal}")
    if backend is None:
        target = base_layer.weight.data  # any strides: entries are addressed by their coordinates
    else:
        target = backend.get_base_weight(base_layer).clone()
    backup = MergeBackup()
    for entry in entries:
        saved = _read_entries(target, entry.indices)
        _write_entries_(target, entry.indices, patched_values(saved, entry.values.detach(), float(entry.scale)))
        backup.entries.append((entry.indices, saved))
    if check_finite and not all(torch.isfinite(_read_entries(target, indices)).all() for indices, _ in backup.entries):
        if backend is None:
            unmerge_entries_(base_layer, backup)
        raise ValueError(f"NaNs or infs detected while merging {where}: the adapter seems to be broken.")
    if backend is None:
        return backup
    previous = base_layer.weight
    backend.set_base_weight(layer, target)
    layer_kind = type(base_layer).__name__
    name = backend.backend_name
    kind = name if layer_kind in name else f"{name} {layer_kind}"
    collected = _REQUANTIZED.get()
    if collected is not None:
        collected.append(kind)
    else:  # one message per backend (no layer name), so Python's default filter shows it once, not once per layer
        _warn_requantized({kind: 1}, stacklevel=4)
    return MergeBackup(weight=previous, backend=backend)


# The quantized backends requantized by the merges of one operation (see `one_merge_warning`), or None outside one.
_REQUANTIZED: ContextVar[list[str] | None] = ContextVar("sara_requantized", default=None)


def _warn_requantized(counts: dict[str, int], stacklevel: int) -> None:
    for description, count in counts.items():
        layers = f"{count} {description} layers" if count > 1 else f"{description} weights"
        warnings.warn(
            f"Merging SaRA adapters into {layers} requantizes the whole layer, which rounds every entry; generations "
            "may change slightly. Unmerging restores the original quantized weights exactly.",
            UserWarning,
            stacklevel=stacklevel,
        )


@contextlib.contextmanager
def one_merge_warning() -> Iterator[None]:
    """Merges inside warn about requantization once, when the operation has succeeded (naming how many layers of each
    backend it requantized), instead of once per layer. Nested uses join the outermost one."""
    if _REQUANTIZED.get() is not None:
        yield
        return
    token = _REQUANTIZED.set([])
    try:
        yield
        counts = dict(Counter(_REQUANTIZED.get()))
    finally:
        _REQUANTIZED.reset(token)
    _warn_requantized(counts, stacklevel=4)


@torch.no_grad()
def unmerge_entries_(base_layer: nn.Module, backup: MergeBackup) -> None:
    """Undo :func:`merge_entries_` bitwise."""
    if backup.weight is not None:
        backup.backend.swap_base_weight(base_layer, backup.weight)
        return
    weight = base_layer.weight.data
    for indices, saved in reversed(backup.entries):
        _write_entries_(weight, indices, saved)


def _read_entries(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The entries at flat (row-major) ``indices`` of ``weight``, whatever its strides."""
    if weight.is_contiguous():
        return weight.view(-1).index_select(0, indices)
    return weight[torch.unravel_index(indices.long(), weight.shape)]


def _write_entries_(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values`` at flat (row-major) ``indices`` of ``weight`` in place, whatever its strides."""
    if weight.is_contiguous():
        weight.view(-1).index_copy_(0, indices.long(), values)
    else:
        weight.index_put_(torch.unravel_index(indices.long(), weight.shape), values)


__all__ = [
    "BACKEND_MODULES",
    "ExecutionPath",
    "MergeBackup",
    "ResolvedFor",
    "composable_reason",
    "execution_path",
    "logical_weight_shape",
    "merge_entries_",
    "merge_refusal",
    "one_merge_warning",
    "readable_weight",
    "resolve_storage_backend",
    "unmerge_entries_",
]
