"""Checking a SaRA checkpoint before anything of the model changes: what is validated, and why.

The file format itself (keys, records, encoding) is described in ``peft_sara.file_format``. Every SaRA load runs these
checks before it writes a value, and raises :class:`~peft_sara.file_format.InvalidAdapterError` naming the layer:

- form: values are 1-D floating tensors, index streams decode (``peft_sara.index_encoding``), one value per index,
  records of the right dtype and shape, format version known. Protects against truncated, hand-edited or foreign files.
- checksum of each layer (its encoded entries and weight shape, bound to its name) and of the modules_to_save tensors.
  Protects against corrupted downloads and edits; not against anyone who recomputes them (it is not a signature).
- recorded weight shape against the model's, and every index inside the weight. Protects against an adapter made for
  another base model (SD1.5's 768-wide ``to_k`` on SD2's 1024-wide one).
- no repeated index, no entry both trainable and frozen: each weight entry is stored once.
- every layer the model's adapter has is in the file, every SaRA tensor of the file matches a layer, and every other
  tensor is a modules_to_save copy of the right shape: a file never overwrites a base weight.
- non-finite values, and values whose effective weight overflows the base dtype, unless allowed:
  ``allow_non_finite=True`` on peft-sara's loaders, ``PEFT_SARA_ALLOW_NON_FINITE=1``, or
  ``with allow_non_finite_values(): PeftModel.from_pretrained(...)``.
- loading into a merged adapter is refused (its merged weights would keep the old values).

Not covered: whether the values are any good (a file of zeros loads), and quantized or offloaded base weights, which
are not read for the effective-weight check.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .file_format import (
    CHECKSUM_NAME,
    RECORD_NAMES,
    VALUE_DTYPES,
    WEIGHT_SHAPE_NAME,
    InvalidAdapterError,
    LayerCheckpoint,
    ParsedCheckpoint,
    checked_checksum,
    entries_checksum,
    normalize_module_name,
    other_tensors_checksum,
    parse_checkpoint,
    sibling_key,
)
from .index_encoding import decode_index_gaps
from .tuner.base_weight import quantized_backend
from .tuner.layer import SaRALayer, sara_layers
from .tuner.selection import check_entries, index_dtype_for

ALLOW_NON_FINITE_ENV_VAR = "PEFT_SARA_ALLOW_NON_FINITE"
OTHER_MODEL_HINT = "The checkpoint was made for a different model."


# ------------------------------------------------------------------------------------------------- non-finite values
_allow_non_finite: ContextVar[bool | None] = ContextVar("peft_sara_allow_non_finite", default=None)


@contextlib.contextmanager
def allow_non_finite_values(allow: bool = True) -> Iterator[None]:
    """Within the context, SaRA loads (``PeftModel.from_pretrained`` included) accept NaN / inf values if ``allow``."""
    token = _allow_non_finite.set(allow)
    try:
        yield
    finally:
        _allow_non_finite.reset(token)


def non_finite_allowed() -> bool:
    """Whether loads accept non-finite values: :func:`allow_non_finite_values`, else ``PEFT_SARA_ALLOW_NON_FINITE``."""
    explicit = _allow_non_finite.get()
    if explicit is not None:
        return explicit
    return os.environ.get(ALLOW_NON_FINITE_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def _recorded_shape(layer_name: str, tensor: torch.Tensor) -> tuple[int, ...]:
    if tensor.dtype != torch.int64 or tensor.dim() != 1 or not 1 <= tensor.numel() <= 8:
        raise InvalidAdapterError(
            f"SaRA layer '{layer_name}': the recorded weight shape must be 1 to 8 int64, got dtype {tensor.dtype} "
            f"and shape {tuple(tensor.shape)}: the file is corrupted."
        )
    shape = tuple(int(size) for size in tensor)
    if any(size < 0 for size in shape):
        raise InvalidAdapterError(f"SaRA layer '{layer_name}': the recorded weight shape {shape} is negative.")
    return shape


@dataclass
class LayerEntries:
    """A layer's validated trainable and frozen entries, indices decoded (frozen ones empty when the checkpoint has
    none)."""

    indices: torch.Tensor
    values: torch.Tensor
    frozen_indices: torch.Tensor
    frozen_values: torch.Tensor


ENTRY_SETS = {
    "trainable": ("sara_index_gaps", "sara_values"),
    "frozen": ("sara_frozen_index_gaps", "sara_frozen_values"),
}


def _decoded_entries(where: str, stream: torch.Tensor, values: torch.Tensor, numel: int) -> torch.Tensor:
    """The indices of one entry set, decoded and checked against the values and the weight's size."""
    if values.dtype not in VALUE_DTYPES or values.dim() != 1:
        raise InvalidAdapterError(
            f"{where}: values must be a 1-D floating tensor (float16/bfloat16/float32/float64), got dtype "
            f"{values.dtype} and shape {tuple(values.shape)}."
        )
    try:
        indices = decode_index_gaps(stream)
        check_entries(indices, values, numel, where, OTHER_MODEL_HINT)
    except ValueError as err:
        raise InvalidAdapterError(err if str(err).startswith(where) else f"{where}: {err}.") from err
    return indices.to(index_dtype_for(numel))


def check_layer_checkpoint(
    layer_name: str,
    checkpoint: LayerCheckpoint,
    weight_shape: tuple[int, ...] | None,
    value_dtype: torch.dtype | None,
    allow_non_finite: bool,
) -> LayerEntries:
    """Validate one layer's stored tensors and decode its entries, against the model's weight shape and value dtype
    when given (``None``: against the recorded shape only).

    Checks, in order: presence of entries and records, the records' form, recorded vs model weight shape, the index
    streams and values (decodable, one value per index, inside the weight), the checksum, repeated indices,
    trainable/frozen overlap, finiteness.
    """
    tensors = checkpoint.tensors
    for name in ("sara_index_gaps", "sara_values") + RECORD_NAMES:
        if name not in tensors:
            raise InvalidAdapterError(
                f"SaRA layer '{layer_name}' lacks its '{name}', which every layer of a SaRA file has: the file is "
                "corrupted or was edited after saving."
            )
    if ("sara_frozen_index_gaps" in tensors) != ("sara_frozen_values" in tensors):
        raise InvalidAdapterError(f"The checkpoint has only half of the frozen entries of SaRA layer '{layer_name}'.")
    pairs = {what: names for what, names in ENTRY_SETS.items() if names[0] in tensors}
    recorded = _recorded_shape(layer_name, tensors[WEIGHT_SHAPE_NAME])
    checksum = checked_checksum(f"SaRA layer '{layer_name}': the checksum", tensors[CHECKSUM_NAME])

    def corrupted() -> bool:
        return not torch.equal(entries_checksum(layer_name, tensors), checksum.cpu())

    decoded = {}
    try:
        if weight_shape is not None and tuple(recorded) != tuple(weight_shape):
            raise InvalidAdapterError(
                f"SaRA layer '{layer_name}' was trained on a weight of shape {recorded}, but this model's weight has "
                f"shape {tuple(weight_shape)}: this adapter was made for another base model (e.g. an SD1.5 adapter "
                "on SD2). Load it into the base model it was trained on."
            )
        for what, (stream_name, value_name) in pairs.items():
            where = f"SaRA layer '{layer_name}': the checkpoint's {what} entries"
            decoded[what] = _decoded_entries(where, tensors[stream_name], tensors[value_name], math.prod(recorded))
    except InvalidAdapterError as err:
        if corrupted():
            raise InvalidAdapterError(
                f"{err} Its checksum does not match either: the file is corrupted or was modified after saving."
            ) from err
        raise
    if corrupted():
        raise InvalidAdapterError(
            f"SaRA layer '{layer_name}': the checkpoint's tensors do not match their checksum: the file is corrupted "
            "or was modified after saving. Download or save the adapter again."
        )

    for what, indices in decoded.items():
        repeated = indices[1:][indices[1:] == indices[:-1]]  # decoded indices are ascending
        if repeated.numel():
            raise InvalidAdapterError(
                f"SaRA layer '{layer_name}': the checkpoint's {what} indices repeat {repeated.numel()} entries (e.g. "
                f"index {int(repeated[0])}); each entry of the weight may be stored once."
            )
    if "frozen" in decoded and decoded["frozen"].numel():
        overlap = torch.isin(decoded["frozen"], decoded["trainable"])
        if bool(overlap.any()):
            raise InvalidAdapterError(
                f"SaRA layer '{layer_name}': {int(overlap.sum())} entries are both trainable and frozen in the "
                f"checkpoint (e.g. index {int(decoded['frozen'][overlap][0])}); each entry may be in one set."
            )
    if not allow_non_finite:
        for what, (_, value_name) in pairs.items():
            values = tensors[value_name]
            cast = values.to(value_dtype) if value_dtype is not None else values
            bad = int((~torch.isfinite(cast)).sum())
            if bad:
                after = (
                    f" after the cast to {value_dtype}"
                    if value_dtype is not None and value_dtype != values.dtype
                    else ""
                )
                raise InvalidAdapterError(
                    f"SaRA layer '{layer_name}': the checkpoint's {what} values hold {bad} non-finite entries (NaN or "
                    f"inf{after}). To load them anyway pass `allow_non_finite=True` (peft-sara's loaders), set "
                    f"{ALLOW_NON_FINITE_ENV_VAR}=1, or load inside `peft_sara.allow_non_finite_values()`."
                )
    trainable = decoded["trainable"]
    return LayerEntries(
        indices=trainable,
        values=tensors["sara_values"],
        frozen_indices=decoded.get("frozen", trainable[:0]),
        frozen_values=tensors.get("sara_frozen_values", tensors["sara_values"][:0]),
    )


def check_checkpoint_file(
    state_dict: Mapping[str, Any], allow_non_finite: bool | None = None
) -> tuple[ParsedCheckpoint, dict[str, LayerEntries]]:
    """Validate what a checkpoint file says about itself, without a model: every tensor's type, each layer's records
    and checksum, indices against the recorded weight shape, duplicates, overlaps, finiteness, the modules_to_save
    checksum. Loaders run it before touching the model; ``peft-sara inspect`` runs it before computing anything.

    Returns the parsed checkpoint and each layer's entries by (saved) layer name.
    """
    allow_non_finite = non_finite_allowed() if allow_non_finite is None else allow_non_finite
    parsed = parse_checkpoint(state_dict)
    entries = {
        layer_name: check_layer_checkpoint(layer_name, layer, None, None, allow_non_finite)
        for layer_name, layer in parsed.layers.items()
    }
    _check_other_checksum(state_dict, parsed, None)
    return parsed, entries


def _check_other_checksum(state_dict: Mapping[str, Any], parsed: ParsedCheckpoint, adapter_name: str | None) -> None:
    others = {key: state_dict[key] for key in parsed.other_keys}
    if not torch.equal(other_tensors_checksum(others, adapter_name), parsed.other_checksum.cpu()):
        raise InvalidAdapterError(
            "The checkpoint's modules_to_save tensors do not match their checksum: the file is corrupted or was "
            "modified after saving. Download or save the adapter again."
        )


def _allowed_other_keys(model: nn.Module, adapter_name: str) -> set[str]:
    """State-dict keys a SaRA checkpoint may hold besides SaRA tensors: the copies of the modules its config lists in
    ``modules_to_save`` (PEFT wrapped them when it injected the adapter). Never a base weight, embeddings included."""
    return {key for key in model.state_dict() if f".modules_to_save.{adapter_name}." in f".{key}"}


def _check_other_tensors(
    model: nn.Module, adapter_name: str, state_dict: Mapping[str, torch.Tensor], keys: list[str], allow_non_finite: bool
) -> None:
    if not keys:
        return
    allowed = _allowed_other_keys(model, adapter_name)
    rejected = sorted(key for key in keys if key not in allowed)
    if rejected:
        shown = ", ".join(rejected[:5]) + (" ..." if len(rejected) > 5 else "")
        raise InvalidAdapterError(
            f"The checkpoint has {len(rejected)} tensors that are neither SaRA entries nor modules_to_save of adapter "
            f"'{adapter_name}': {shown}. Loading them would overwrite other weights of the model; was the file made "
            "for another model or PEFT method?"
        )
    model_state = model.state_dict()
    for key in keys:
        tensor, expected = state_dict[key], model_state[key]
        dtype_fits = (
            tensor.dtype in VALUE_DTYPES if expected.dtype.is_floating_point else tensor.dtype == expected.dtype
        )
        if tuple(tensor.shape) != tuple(expected.shape) or not dtype_fits:
            raise InvalidAdapterError(
                f"The checkpoint's '{key}' has shape {tuple(tensor.shape)} and dtype {tensor.dtype}, the model's "
                f"{tuple(expected.shape)} and {expected.dtype}. {OTHER_MODEL_HINT}"
            )
        if not allow_non_finite and tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise InvalidAdapterError(
                f"The checkpoint's '{key}' holds non-finite values (NaN or inf). To load them anyway set "
                f"{ALLOW_NON_FINITE_ENV_VAR}=1 or pass `allow_non_finite=True`."
            )


def check_not_merged(model: nn.Module, adapter_name: str) -> None:
    """Refuse to load into an adapter that is merged: the merged weights would keep computing the old values while the
    stored ones (and any save) were the new file's."""
    merged = [name for name, layer in sara_layers(model) if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(
            f"SaRA adapter '{adapter_name}' is merged into {len(merged)} layers (e.g. '{merged[0]}'): loading into it "
            "would leave the merged weights computing its old values. Unmerge it first (`unmerge_adapter()` / "
            "`pipe.unfuse_lora()`), or load under another `adapter_name`."
        )


def effective_weight_problem(
    layer: SaRALayer, scale: float, entries: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> str | None:
    """Why the weight the layer would compute with, ``cast(w + scale * delta)`` in the base dtype, is unusable, or None.

    Unusable: an entry that is not finite, or one so large that a unit input overflows the layer's output
    (``|w'| * fan_in`` beyond the dtype's largest value: 3e38 in float32, 1e5 in float16). Quantized or offloaded
    base weights are not read (not checked).
    """
    base_layer = layer.get_base_layer()
    weight = getattr(base_layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point or weight.is_meta:
        return None
    if quantized_backend(base_layer) is not None:  # torchao / quanto tensors report a float dtype
        return None
    flat = weight.detach().reshape(-1)
    fan_in = max(1, flat.numel() // max(1, int(getattr(layer, "out_features", 1) or 1)))
    # 1-byte storage (fp8, diffusers' layerwise casting) is upcast to compute: checked in float32 (no fp8 isfinite).
    dtype = weight.dtype if weight.dtype.itemsize >= 2 else torch.float32
    limit = torch.finfo(dtype).max / fan_in
    for indices, values in entries:
        if indices.numel() == 0:
            continue
        base = flat.index_select(0, indices.to(device=flat.device, dtype=torch.long))
        patched = (base.double() + scale * values.to(device=flat.device, dtype=torch.float64)).to(dtype)
        finite = torch.isfinite(patched)
        if not bool(finite.all()):
            return f"{int((~finite).sum())} entries of its effective weight are not finite in {dtype}"
        largest = float(patched.abs().max())
        if largest > limit:
            return (
                f"its effective weight reaches {largest:.3g}, so a unit input over its fan-in of {fan_in} overflows "
                f"{dtype} (limit {limit:.3g} per entry)"
            )
    return None


def check_effective_weight(layer_name: str, layer: SaRALayer, adapter_name: str, entries: LayerEntries) -> None:
    """Raise :class:`InvalidAdapterError` if ``entries`` would give ``layer`` an unusable weight (see
    :func:`effective_weight_problem`), at the adapter's current scale."""
    scale = float(layer.sara_scaling.get(adapter_name, 1.0))
    problem = effective_weight_problem(
        layer, scale, [(entries.indices, entries.values), (entries.frozen_indices, entries.frozen_values)]
    )
    if problem is not None:
        raise InvalidAdapterError(
            f"SaRA layer '{layer_name}': {problem}. To load it anyway pass `allow_non_finite=True` (peft-sara's "
            f"loaders), set {ALLOW_NON_FINITE_ENV_VAR}=1, or load inside "
            "`peft_sara.allow_non_finite_values()`."
        )


def validate_checkpoint(
    model: nn.Module, adapter_name: str, state_dict: Mapping[str, torch.Tensor], allow_non_finite: bool | None = None
) -> tuple[dict[str, LayerEntries], dict[str, torch.Tensor]]:
    """Validate a SaRA checkpoint against the model's layers of ``adapter_name``; nothing is changed.

    Returns the validated entries by model layer name and the state dict to load, keyed like ``state_dict``: records
    taken out, each layer's entries decoded (``sara_indices`` / ``sara_frozen_indices``, frozen ones empty where the
    checkpoint has none). Raises :class:`InvalidAdapterError` naming the layer.
    """
    allow_non_finite = non_finite_allowed() if allow_non_finite is None else allow_non_finite
    check_not_merged(model, adapter_name)
    parsed = parse_checkpoint(state_dict, adapter_name)
    layers = {
        normalize_module_name(name): (name, layer)
        for name, layer in sara_layers(model)
        if layer.present_adapters([adapter_name])
    }
    unexpected = sorted(
        layer.keys[name]
        for layer_name, layer in parsed.layers.items()
        if layer_name not in layers
        for name in layer.keys
    )
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise InvalidAdapterError(
            f"The checkpoint has SaRA entries for {len(unexpected)} tensors that match no SaRA layer of this model "
            f"(adapter '{adapter_name}'): {shown}. Was it trained with other `target_modules` or another model?"
        )
    _check_other_tensors(model, adapter_name, state_dict, parsed.other_keys, allow_non_finite)
    _check_other_checksum(state_dict, parsed, adapter_name)

    entries = {}
    for layer_name, (name, layer) in layers.items():
        checkpoint = parsed.layers.get(layer_name)
        if checkpoint is None:
            raise InvalidAdapterError(f"The checkpoint has no entries for SaRA layer '{name}'.")
        _, values = layer.trainable_entries(adapter_name)
        entries[name] = check_layer_checkpoint(
            name, checkpoint, tuple(layer.weight_shape), values.dtype, allow_non_finite
        )
        if not allow_non_finite:
            check_effective_weight(name, layer, adapter_name, entries[name])

    stored = {key for layer in parsed.layers.values() for key in layer.keys.values()}
    to_load = {key: value for key, value in state_dict.items() if key not in stored and key not in parsed.record_keys}
    for layer_name, (name, _) in layers.items():
        values_key = parsed.layers[layer_name].keys["sara_values"]
        layer_entries = entries[name]
        to_load[values_key] = layer_entries.values
        to_load[sibling_key(values_key, adapter_name, "sara_indices")] = layer_entries.indices
        to_load[sibling_key(values_key, adapter_name, "sara_frozen_indices")] = layer_entries.frozen_indices
        to_load[sibling_key(values_key, adapter_name, "sara_frozen_values")] = layer_entries.frozen_values
    return entries, to_load


__all__ = [
    "ALLOW_NON_FINITE_ENV_VAR",
    "LayerEntries",
    "allow_non_finite_values",
    "check_checkpoint_file",
    "check_effective_weight",
    "check_layer_checkpoint",
    "check_not_merged",
    "effective_weight_problem",
    "non_finite_allowed",
    "validate_checkpoint",
]
