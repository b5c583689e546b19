"""Reading and rewriting a base layer's weight whatever its storage: plain, quantized (bitsandbytes, torchao,
optimum-quanto, GGUF: one module per backend in :mod:`peft_sara.tuner.quantized`), fp8 (diffusers' layerwise casting) or
offloaded to the meta device by accelerate.

SaRA selects entries by magnitude and merges by writing entries, so it needs the weight as a dense floating tensor of
the layer's logical shape; :func:`readable_weight` provides one (dequantized or onloaded for the duration), and
:func:`merge_entries_` writes a merged weight back (in place, requantized, or refused). :func:`composable_reason` says
which layers must run their own forward with the update added beside it.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

from .functional import SparseEntries, has_forward_hooks
from .kernels.reference import patched_values
from .quantized import MergeRefused
from .quantized import bnb as bnb_backend
from .quantized import gguf as gguf_backend
from .quantized import quanto as quanto_backend
from .quantized import torchao as torchao_backend

# The quantized storage backends, asked in order; each module answers the same questions (see peft_sara.tuner.quantized).
QUANTIZED_BACKENDS: tuple[ModuleType, ...] = (bnb_backend, torchao_backend, quanto_backend, gguf_backend)


_PLAIN_TENSOR_TYPES = (nn.Parameter, torch.Tensor)
_PLAIN_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def quantized_backend(base_layer: nn.Module) -> tuple[ModuleType, str] | None:
    """The backend module that stores ``base_layer``'s weight and its description ("torchao Int8Tensor"), or
    ``None`` for a weight no quantization backend owns."""
    for backend in QUANTIZED_BACKENDS:
        description = backend.describe(base_layer)
        if description is not None:
            return backend, description
    return None


def composable_reason(base_layer: nn.Module) -> str | None:
    """Why ``base_layer`` must run its own forward (its hooks, or a weight SaRA cannot compute with as a plain dense
    tensor), or ``None`` for the main path. Layers with a reason run the base layer plus the update's contribution."""
    if has_forward_hooks(base_layer):
        return "the base layer has forward hooks (offloading, layerwise casting, ...)"
    return storage_reason(base_layer)


def storage_reason(base_layer: nn.Module) -> str | None:
    """Why the weight of ``base_layer`` is not a plain dense floating tensor SaRA can compute with or write into
    (quantized by a named backend, meta, a tensor subclass, integer or 1-byte storage), or ``None`` when it is."""
    weight = base_layer.weight
    if (  # the common case first (it runs on every forward): a plain float tensor, in no quantized module
        type(weight) in _PLAIN_TENSOR_TYPES
        and weight.dtype in _PLAIN_FLOAT_DTYPES
        and not weight.is_meta
        and ("optimum.quanto" not in sys.modules or quanto_backend.describe(base_layer) is None)
    ):
        return None
    backend = quantized_backend(base_layer)
    if backend is not None:
        return f"the base weight is stored by {backend[1]}"
    weight = base_layer.weight
    if weight.device.type == "meta":
        return "the base weight is on the meta device (offloaded)"
    if type(weight) not in (nn.Parameter, torch.Tensor) or not weight.dtype.is_floating_point:
        return f"the base weight is a {type(weight).__name__} of dtype {weight.dtype} (unknown storage)"
    if weight.dtype.itemsize < 2:
        return f"the base weight is stored in {weight.dtype}"
    return None


def merge_refusal(base_layer: nn.Module) -> str | None:
    """Why a merged weight cannot be written into ``base_layer``'s storage (1-byte floats, meta, unknown tensor types,
    a quantized backend that cannot requantize it), or ``None``: the dry run of :func:`merge_entries_`, so that a merge
    over many layers refuses before it writes any."""
    backend = quantized_backend(base_layer)
    if backend is None:
        return storage_reason(base_layer)
    check = getattr(backend[0], "merge_refusal", None)
    return check(base_layer) if check is not None else None


def logical_weight_shape(base_layer: nn.Module) -> torch.Size:
    """Shape of the weight the layer computes with (packed quantized storage has another shape)."""
    backend = quantized_backend(base_layer)
    return backend[0].logical_shape(base_layer) if backend is not None else base_layer.weight.shape


def keep_canonical_layout(base_layer: nn.Module) -> None:
    """Keep the base weight's layout fixed for the adapter's life (bitsandbytes' CPU repacking; see
    :func:`peft_sara.tuner.quantized.bnb.keep_canonical_layout`)."""
    bnb_backend.keep_canonical_layout(base_layer)


@contextlib.contextmanager
def readable_weight(base_layer: nn.Module) -> Iterator[torch.Tensor]:
    """The base weight as a dense floating tensor of its logical shape, for reading only.

    Plain weights come as they are; quantized weights dequantized by their backend; 1-byte floating storage (fp8)
    upcast to float32; a weight offloaded to the meta device is onloaded through its accelerate hook for the duration.
    """
    hook = getattr(base_layer, "_hf_hook", None)
    onload = base_layer.weight.device.type == "meta" and hook is not None
    if base_layer.weight.device.type == "meta" and not onload:
        raise ValueError(
            f"The weight of this {type(base_layer).__name__} is on the meta device with no accelerate hook to load it "
            "from: SaRA must read the pre-trained weight to select entries. Load the model's weights first."
        )
    if onload:
        hook.pre_forward(base_layer)
    try:
        weight = base_layer.weight.detach()
        backend = quantized_backend(base_layer)
        if backend is not None:
            weight = backend[0].dequantized(base_layer)
        elif weight.dtype.itemsize < 2:
            weight = weight.float()
        yield weight
    finally:
        if onload:
            hook.post_forward(base_layer, None)


@dataclass
class MergeBackup:
    """What :func:`unmerge_entries_` needs to restore a base weight bitwise: the overwritten entries of a plain weight
    (per entry set: its flat indices and their old values), or the whole previous parameter of a quantized one
    (requantizing is lossy, restoring is not)."""

    entries: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    weight: nn.Parameter | None = None


@torch.no_grad()
def merge_entries_(
    base_layer: nn.Module, entries: Sequence[SparseEntries], check_finite: bool, where: str
) -> MergeBackup:
    """Write ``cast(w + scale * delta)`` at each entry set into the base weight; a quantized weight is dequantized,
    patched and requantized by its backend (with a warning: requantization rounds every entry of the layer), or the
    merge is refused where the backend cannot requantize. ``where`` names the adapter and layer in errors. Raises,
    changing nothing, if ``check_finite`` and a written entry is not finite."""
    backend = quantized_backend(base_layer)
    if backend is None:
        reason = storage_reason(base_layer)
        if reason is not None:
            raise ValueError(
                f"Cannot merge {where}: {reason}. Keep the adapter unmerged (it runs through the base layer), or load "
                "the base in a plain float dtype to merge."
            )
        target = base_layer.weight.data  # any strides: entries are addressed by their coordinates
    else:
        with readable_weight(base_layer) as dense:
            target = dense.clone()
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
    module, description = backend
    try:
        requantized = module.requantized(base_layer, target)
    except MergeRefused as refusal:
        raise ValueError(f"Cannot merge {where}: {refusal}") from None
    layer_kind = type(base_layer).__name__
    kind = description if layer_kind in description else f"{description} {layer_kind}"
    collected = _REQUANTIZED.get()
    if collected is not None:
        collected.append(kind)
    else:  # one message per backend (no layer name), so Python's default filter shows it once, not once per layer
        _warn_requantized({kind: 1}, stacklevel=4)
    return MergeBackup(weight=module.replace_weight(base_layer, requantized))


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
        backend, _ = quantized_backend(base_layer)  # a backup of the whole weight is taken only for quantized ones
        backend.replace_weight(base_layer, backup.weight)
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
    "QUANTIZED_BACKENDS",
    "MergeBackup",
    "composable_reason",
    "keep_canonical_layout",
    "logical_weight_shape",
    "merge_entries_",
    "merge_refusal",
    "quantized_backend",
    "readable_weight",
    "storage_reason",
    "unmerge_entries_",
]
