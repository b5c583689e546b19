"""Reading and rewriting a base layer's weight whatever its storage: plain, bitsandbytes 4-bit / 8-bit, fp8
(diffusers' layerwise casting) or offloaded to the meta device by accelerate.

SaRA selects entries by magnitude and merges by writing entries, so it needs the weight as a dense floating tensor of
the layer's logical shape; :func:`readable_weight` provides one (dequantized or onloaded for the duration), and
:func:`requantized_like` turns a merged dense weight back into the base layer's quantized parameter type.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type
from torch import nn

from .functional import SparseEntries, unreadable_storage_reason
from .kernels.reference import patched_values

try:  # optional: only needed for quantized base layers
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # see keep_canonical_layout
except ImportError:  # pragma: no cover - bitsandbytes is installed in CI
    bnb = _convert_weight_packed_for_cpu_inverse = None


def quantization_of(weight: torch.Tensor) -> str | None:
    """``"4bit"`` / ``"8bit"`` for bitsandbytes parameters, ``None`` for anything else."""
    return get_bnb_param_type(weight) or None


def logical_weight_shape(base_layer: nn.Module) -> torch.Size:
    """Shape of the weight the layer computes with (a 4-bit parameter stores it packed)."""
    weight = base_layer.weight
    if quantization_of(weight) == "4bit":
        return torch.Size(weight.quant_state.shape)
    return weight.shape


def keep_canonical_layout(base_layer: nn.Module) -> None:
    """Keep a bitsandbytes 4-bit weight in its canonical (CUDA / checkpoint) layout for the adapter's life.

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight on the first no-grad eval forward into a CPU layout
    with bfloat16 block scales (``packing_format_for_cpu``): the dequantized weight then differs from the one SaRA
    selected from, and the repack fails for ``in_features`` below the block size. SaRA turns the repack off on the
    layers it adapts (the layer's ``support_avx512bf16_for_cpu`` switch) and unpacks a weight that was already packed,
    so selection, re-selection, merge and unmerge see the same weight on every x86 CPU.
    """
    if not hasattr(base_layer, "support_avx512bf16_for_cpu"):
        return
    base_layer.support_avx512bf16_for_cpu = False
    weight = base_layer.weight
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def _dequantized(weight: torch.Tensor, state) -> torch.Tensor:
    """A bitsandbytes weight as a dense float tensor (a packed CPU 4-bit layout is unpacked on a copy first)."""
    quant_state = getattr(weight, "quant_state", None)
    if getattr(quant_state, "packing_format_for_cpu", False):
        data, quant_state = _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.copy(quant_state))
        return bnb.functional.dequantize_4bit(data, quant_state)
    return dequantize_bnb_weight(weight, state=state)


@contextlib.contextmanager
def readable_weight(base_layer: nn.Module) -> Iterator[torch.Tensor]:
    """The base weight as a dense floating tensor of its logical shape, for reading only.

    Plain weights come as they are; bitsandbytes weights dequantized; 1-byte floating storage (fp8) upcast to float32;
    a weight offloaded to the meta device is onloaded through its accelerate hook for the duration.
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
        kind = quantization_of(base_layer.weight)
        if kind is not None:
            weight = _dequantized(base_layer.weight, getattr(base_layer, "state", None))
        elif weight.dtype.itemsize < 2:
            weight = weight.float()
        yield weight
    finally:
        if onload:
            hook.post_forward(base_layer, None)


def requantized_like(base_layer: nn.Module, dense_weight: torch.Tensor) -> nn.Parameter:
    """A new parameter of the base weight's bitsandbytes type holding ``dense_weight`` quantized (rounding applies)."""
    weight = base_layer.weight
    kind = quantization_of(weight)
    if kind == "4bit":
        settings = {name: value for name, value in vars(weight).items() if not name.startswith("_")}
        settings.update(data=None, bnb_quantized=False, requires_grad=False, quant_state=None)
        settings.pop("data")
        return bnb.nn.Params4bit(dense_weight.to("cpu"), **settings).to(weight.device)
    if kind == "8bit":
        return bnb.nn.Int8Params(
            dense_weight.to("cpu"), requires_grad=False, has_fp16_weights=weight.has_fp16_weights
        ).to(weight.device)
    raise TypeError(f"{type(weight).__name__} is not a bitsandbytes parameter.")


def replace_weight(base_layer: nn.Module, weight: nn.Parameter) -> nn.Parameter:
    """Install ``weight`` as the base layer's weight and return the previous one, intact: a bitsandbytes 8-bit layer
    moves its scales from the weight into ``layer.state`` on the first forward, so they go back onto the old weight and
    the state is reset to be re-initialised from the new one."""
    previous = base_layer.weight
    state = getattr(base_layer, "state", None)
    if quantization_of(previous) == "8bit" and state is not None:
        if previous.SCB is None and state.SCB is not None:
            previous.CB, previous.SCB = state.CB, state.SCB
        state.CB = state.SCB = None
    base_layer.weight = weight
    return previous


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
    """Write ``cast(w + scale * delta)`` at each entry set into the base weight; a bitsandbytes weight is dequantized,
    patched and requantized (with a warning: requantization rounds every entry of the layer). ``where`` names the
    adapter and layer in errors. Raises, changing nothing, if ``check_finite`` and a written entry is not finite."""
    weight = base_layer.weight
    kind = quantization_of(weight)
    if kind is None:
        reason = unreadable_storage_reason(weight)
        if reason is not None:
            raise ValueError(
                f"Cannot merge {where}: {reason}. Keep the adapter unmerged (it runs through the base layer), or load "
                "the base in a plain float dtype to merge."
            )
        target = weight.data  # any strides: entries are addressed by their coordinates
    else:
        with readable_weight(base_layer) as dense:
            target = dense.clone()
    backup = MergeBackup()
    for entry in entries:
        coordinates = torch.unravel_index(entry.indices.long(), target.shape)
        saved = target[coordinates]
        target.index_put_(coordinates, patched_values(saved, entry.values.detach(), float(entry.scale)))
        backup.entries.append((entry.indices, saved))
    if check_finite and not all(
        torch.isfinite(target[torch.unravel_index(indices.long(), target.shape)]).all() for indices, _ in backup.entries
    ):
        if kind is None:
            unmerge_entries_(base_layer, backup)
        raise ValueError(f"NaNs or infs detected while merging {where}: the adapter seems to be broken.")
    if kind is not None:
        warnings.warn(
            f"Merging {where} into a bitsandbytes {kind} weight requantizes the whole layer, which rounds every "
            "entry; generations may change slightly. Unmerging restores the original quantized weight exactly.",
            UserWarning,
            stacklevel=3,
        )
        requantized = requantized_like(base_layer, target)
        backup = MergeBackup(weight=replace_weight(base_layer, requantized))
    return backup


@torch.no_grad()
def unmerge_entries_(base_layer: nn.Module, backup: MergeBackup) -> None:
    """Undo :func:`merge_entries_` bitwise."""
    if backup.weight is not None:
        replace_weight(base_layer, backup.weight)
        return
    weight = base_layer.weight.data
    for indices, saved in reversed(backup.entries):
        weight.index_put_(torch.unravel_index(indices.long(), weight.shape), saved)


__all__ = [
    "MergeBackup",
    "keep_canonical_layout",
    "logical_weight_shape",
    "merge_entries_",
    "quantization_of",
    "readable_weight",
    "replace_weight",
    "requantized_like",
    "unmerge_entries_",
]
