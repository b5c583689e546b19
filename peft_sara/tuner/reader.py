"""The one reader of SaRA adapter files: stored tensors in, checked layer entries out, before anything changes.

The file format itself (keys, records, encoding) is described in ``peft_sara.tuner.file_format``. :func:`read_layer`
turns one layer's stored tensors into checked entries; :func:`validate_checkpoint` (PEFT's ``from_pretrained`` /
``load_adapter`` through the tuner's load hook, ``load_sara_adapter``, resume) and :func:`check_checkpoint_file`
(``inspect``, export, hotswap's file checks) call it for every layer. Every cost is bounded by what was read: counts,
shapes and capacities are compared before anything is allocated, index streams decode in bounded pieces, the
effective-weight check is one pass over the entries in the compute dtype. A refusal raises
:class:`~peft_sara.tuner.file_format.InvalidAdapterError` naming the layer:

- form: values are 1-D floating tensors, index streams decode (``peft_sara.tuner.file_format``), one value per index,
  records of the right dtype and shape, format version known. Protects against truncated, hand-edited or foreign files.
- layout (format 2): a matrix, a matrix stored transposed (transformers' ``Conv1D``) or a convolution, consistent with
  the weight shape and, when loading into a model, with its layer: an export never lays an update out wrong.
- checksum of each layer (its encoded entries, weight shape and layout, bound to its name) and of the modules_to_save tensors.
  Protects against corrupted downloads and edits; not against anyone who recomputes them (it is not a signature).
- recorded weight shape against the model's, and every index inside the weight. Protects against an adapter made for
  another base model (SD1.5's 768-wide ``to_k`` on SD2's 1024-wide one).
- no repeated index, no entry both trainable and frozen: each weight entry is stored once.
- every layer the model's adapter has is in the file, every SaRA tensor of the file matches a layer, and every other
  tensor is a modules_to_save copy of the right shape: a file never overwrites a base weight.
- hotswap: a slot holds the adapter's trainable and frozen entries; exports: a layer's dense update costs at most
  a fixed multiple of its stored entries.
- non-finite values, and values that make the effective weight overflow the base dtype (a float32 / bfloat16 /
  float64 base is read only where the values are too large to rule that out; a float16 or 1-byte base always, so there
  any overflowing effective entry is refused: :func:`effective_weight_problem` states the exact guarantee), unless allowed:
  ``allow_non_finite=True`` on peft-sara's loaders, or ``with allow_non_finite_values(): PeftModel.from_pretrained(...)``
  (PEFT's loaders take no argument for it). The ``PEFT_SARA_ALLOW_NON_FINITE`` environment variable is deprecated.
- loading into a merged adapter is refused (its merged weights would keep the old values).
- weights and ``adapter_config.json`` of two different saves (:func:`check_config_fingerprint`, run where a folder's
  two files are read: PEFT's load path, ``peft_sara.adapter_files.read_adapter_weights``). Protects against a
  ``PeftModel.save_pretrained`` killed between writing the weights and the config (PEFT writes both in place).

Not covered: whether the values are any good (a file of zeros loads), and quantized or offloaded base weights, which
are not read for the effective-weight check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors import safe_open
from torch import nn

from .config_checks import check_config_values, check_relative_path
from .file_format import (
    CHECKSUM_NAME,
    CONFIG_FINGERPRINT_NAME,
    FORMAT_VERSION,
    LAYOUT_NAME,
    PEFT_MODEL_PREFIX,
    RECORD_NAMES,
    VALUE_DTYPES,
    WEIGHT_SHAPE_NAME,
    InvalidAdapterError,
    LayerCheckpoint,
    LayerLayout,
    ParsedCheckpoint,
    check_legacy_archive,
    checked_checksum,
    decode_index_gaps,
    entries_checksum,
    normalize_module_name,
    other_tensors_checksum,
    parse_checkpoint,
    sibling_key,
)
from .selection import index_dtype_for

if TYPE_CHECKING:
    from peft import PeftConfig

    from .layer import SaRALayer

# Reading a file (check_checkpoint_file: `peft-sara inspect`, exports) imports no PEFT: the functions that check
# against a model import PEFT, the layer and the kernels where they run.

ALLOW_NON_FINITE_ENV_VAR = "PEFT_SARA_ALLOW_NON_FINITE"
OTHER_MODEL_HINT = "The checkpoint was made for a different model."
# A dense update of a layer (exports, inspect's ranks) may cost this many times the entries its file stores: a small file
# that records a huge weight shape is refused (exports) or its dense statistics skipped (inspect).
MAX_DENSE_PER_STORED_ENTRY = 4096
ALLOW_HINT = (
    "To load it anyway pass `allow_non_finite=True` (peft-sara's loaders), or load inside "
    "`peft_sara.allow_non_finite_values()` (PEFT's `from_pretrained` / `load_adapter`)."
)


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
    """Whether loads accept non-finite values: inside :func:`allow_non_finite_values`, else no.

    The deprecated ``PEFT_SARA_ALLOW_NON_FINITE`` environment variable is still honoured, with a ``FutureWarning``.
    """
    explicit = _allow_non_finite.get()
    if explicit is not None:
        return explicit
    setting = os.environ.get(ALLOW_NON_FINITE_ENV_VAR)
    if setting is None:
        return False
    warnings.warn(
        f"{ALLOW_NON_FINITE_ENV_VAR} is deprecated and will be ignored in a future release: pass "
        "`allow_non_finite=True` to peft-sara's loaders, or load inside `peft_sara.allow_non_finite_values()`.",
        FutureWarning,
        stacklevel=3,
    )
    return setting.strip().lower() in ("1", "true", "yes", "on")


class SlotTooSmall(InvalidAdapterError):
    """A layer holds more entries (trainable and frozen) than the capacity it is read into (a hotswap slot)."""


def _recorded_shape(layer_name: str, tensor: torch.Tensor) -> tuple[int, ...]:
    if tensor.dtype != torch.int64 or tensor.dim() != 1 or not 1 <= tensor.numel() <= 8:
        raise InvalidAdapterError(
            f"SaRA layer '{layer_name}': the recorded weight shape must be 1 to 8 int64, got dtype {tensor.dtype} "
            f"and shape {tuple(tensor.shape)}: the file is corrupted."
        )
    shape = tuple(int(size) for size in tensor)
    if any(size < 0 for size in shape) or math.prod(shape) >= 2**62:
        raise InvalidAdapterError(f"SaRA layer '{layer_name}': the recorded weight shape {shape} is not a shape.")
    return shape


@dataclass
class LayerEntries:
    """A layer's checked trainable and frozen entries, indices decoded (frozen ones empty when the checkpoint has
    none), with the weight shape and layout the file records (``layout`` None: a format-1 file, which kept layouts
    outside the tensors)."""

    indices: torch.Tensor
    values: torch.Tensor
    frozen_indices: torch.Tensor
    frozen_values: torch.Tensor
    weight_shape: tuple[int, ...] = ()
    layout: LayerLayout | None = None


ENTRY_SETS = {
    "trainable": ("sara_index_gaps", "sara_values"),
    "frozen": ("sara_frozen_index_gaps", "sara_frozen_values"),
}


def _check_values(where: str, values: torch.Tensor) -> None:
    if values.dtype not in VALUE_DTYPES or values.dim() != 1:
        raise InvalidAdapterError(
            f"{where}: values must be a 1-D floating tensor (float16/bfloat16/float32/float64), got dtype "
            f"{values.dtype} and shape {tuple(values.shape)}."
        )


def _decoded_entries(where: str, stream: torch.Tensor, values: torch.Tensor, numel: int) -> torch.Tensor:
    """The indices of one entry set, decoded (its count compared with the values' before anything is allocated) into
    the layer's index dtype; the decoder refuses any index outside the weight (they are ascending: the last is the
    largest)."""
    try:
        return decode_index_gaps(stream, dtype=index_dtype_for(numel), count=values.numel(), limit=numel)
    except ValueError as err:
        message = str(err) if str(err).startswith(where) else f"{where}: {err}."
        if "out of range" in message:
            message = f"{message} {OTHER_MODEL_HINT}"
        raise InvalidAdapterError(message) from err


def _largest_magnitude(tensor: torch.Tensor) -> float:
    """``max |tensor|`` (NaN if any entry is NaN, inf if any is infinite) in one pass, without a temporary."""
    low, high = torch.aminmax(tensor)
    low, high = float(low), float(high)
    return math.nan if math.isnan(low) or math.isnan(high) else max(-low, high)


def _non_finite_count(tensor: torch.Tensor) -> int:
    """How many entries of ``tensor`` are NaN or infinite (one pass when there are none)."""
    if tensor.numel() == 0 or math.isfinite(_largest_magnitude(tensor)):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def _effective_weight_readable(layer: SaRALayer) -> bool:
    """Whether :func:`effective_weight_problem` reads the layer's base weight (plain or 1-byte float storage)."""
    from .quantized.storage import OneByteFloat

    backend = layer.storage_backend(layer.get_base_layer())
    return backend is None or isinstance(backend, OneByteFloat)


# Base dtypes with at least float32's range: a file whose scaled values are bounded as below cannot make their
# effective weight overflow unless the base entry is itself beyond half the limit (the base model's own state).
WIDE_BASE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
# max |scale * value| up to this fraction of the per-entry limit proves the check without reading the base weight:
# with |w| <= limit / 2 the sum stays at 3/4 of the limit, with room for the cast's rounding.
VALUE_BOUND_FRACTION = 0.25


def effective_weight_problem(
    layer: SaRALayer, scale: float, entries: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> str | None:
    """Why the weight the layer would compute with, ``cast(w + scale * delta)`` in the base dtype
    (``patched_values``, the formula the forward and merges use), is unusable because of the file's values, or None.

    Unusable: an entry that is not finite, or one so large that a unit input overflows the layer's output
    (``|w'| * fan_in`` beyond the dtype's largest value: 3e38 in float32, 1e5 in float16), i.e. ``|w'|`` above
    ``limit = finfo(dtype).max / fan_in``. Exactly what is guaranteed:

    - base dtype float32, bfloat16 or float64 (at least float32's range): if every ``|scale * delta| <= limit / 4``
      (finite), the base weight is not read and None is returned; for every base entry with ``|w| <= limit / 2``
      (finite) the effective entry is then within ``3/4 limit``. A base entry beyond that, or not finite, is the base
      model's own state, not the file's, and is not looked at. Otherwise (a value beyond the bound, or not finite)
      the entries' base values are gathered and every ``cast(w + scale * delta)`` is checked as below.
    - other base dtypes (float16, 1-byte floats, checked in float32): the base values are always gathered, and every
      effective entry must be finite and within ``limit``, whatever made it so.

    One pass over the values (and, when gathered, over the base entries), in the compute dtype. Quantized, offloaded
    or unknown storage is not read (not checked).
    """
    from .kernels.reference import patched_values

    if not _effective_weight_readable(layer):
        return None
    weight = layer.get_base_layer().weight
    flat = weight.detach().reshape(-1)
    fan_in = max(1, flat.numel() // max(1, int(getattr(layer, "out_features", 1) or 1)))
    # 1-byte storage (fp8, diffusers' layerwise casting) is upcast to compute: checked in float32 (no fp8 isfinite).
    dtype = weight.dtype if weight.dtype.itemsize >= 2 else torch.float32
    limit = torch.finfo(dtype).max / fan_in
    entries = [(indices, values) for indices, values in entries if indices.numel()]
    if weight.dtype in WIDE_BASE_DTYPES:
        magnitudes = [_largest_magnitude(values) * abs(float(scale)) for _, values in entries]
        # (every one compared: Python's max() would skip a NaN); NaN / inf fail the bound and are checked below.
        if all(magnitude <= VALUE_BOUND_FRACTION * limit for magnitude in magnitudes):
            return None
    for indices, values in entries:
        base = flat.index_select(0, indices.to(flat.device)).to(dtype)
        patched = patched_values(base, values.to(flat.device), float(scale))
        largest = _largest_magnitude(patched)  # NaN or inf if any entry is
        if not math.isfinite(largest):
            return f"{int((~torch.isfinite(patched)).sum())} entries of its effective weight are not finite in {dtype}"
        if largest > limit:
            return (
                f"its effective weight reaches {largest:.3g}, so a unit input over its fan-in of {fan_in} overflows "
                f"{dtype} (limit {limit:.3g} per entry)"
            )
    return None


class LayerChecksums:
    """The layers' checksums (:func:`entries_checksum`), hashed in a worker thread while the caller decodes and checks
    (``hashlib`` releases the GIL on large buffers): submitted in reading order, each awaited where :func:`read_layer`
    compares it, before anything of the model changes. A context manager: leaving it (a refusal included) cancels
    what was not hashed yet."""

    def __init__(self, layers: Mapping[str, LayerCheckpoint]) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sara-checksums")
        self._futures = {
            name: self._executor.submit(entries_checksum, name, checkpoint.tensors)
            for name, checkpoint in layers.items()
        }

    def result(self, layer_name: str) -> torch.Tensor:
        return self._futures[layer_name].result()

    def __enter__(self) -> LayerChecksums:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def read_layer(
    layer_name: str,
    checkpoint: LayerCheckpoint,
    allow_non_finite: bool,
    version: int = FORMAT_VERSION,
    layer: SaRALayer | None = None,
    value_dtype: torch.dtype | None = None,
    scale: float = 1.0,
    capacity: int | None = None,
    max_dense_per_entry: int | None = None,
    checksums: LayerChecksums | None = None,
) -> LayerEntries:
    """The one reader of a layer: turn its stored tensors into checked entries, or raise
    :class:`InvalidAdapterError` naming the layer. Every load, hotswap, resume, ``inspect`` and export goes through it.

    Checks, in order, each before anything it guards is allocated: entries and records present; the records' form
    (shape, layout, checksum); the recorded shape and layout against ``layer``'s when loading into one; the values'
    form; ``trainable + frozen <= capacity`` (a hotswap slot); ``weight size <= max_dense_per_entry * stored entries``
    (exports, which build the update densely); the index streams (counts compared with the values' before decoding,
    decoded in bounded pieces, inside the weight), then the checksum; repeated indices, trainable / frozen overlap;
    unless ``allow_non_finite``: finite values in ``value_dtype`` and, with ``layer``, a usable effective weight
    ``cast(w + scale * delta)`` in the base dtype (:func:`effective_weight_problem`). ``checksums``: the layer's
    checksum computed beside the reading (:class:`LayerChecksums`), the same bytes as computed here.
    """
    tensors = checkpoint.tensors
    for name in ("sara_index_gaps", "sara_values") + RECORD_NAMES:
        if name not in tensors:
            raise InvalidAdapterError(
                f"SaRA layer '{layer_name}' lacks its '{name}', which every layer of a SaRA file has: the file is "
                "corrupted or was edited after saving."
            )
    if version >= 2 and LAYOUT_NAME not in tensors:
        raise InvalidAdapterError(
            f"SaRA layer '{layer_name}' lacks its '{LAYOUT_NAME}', which every layer of a format-{version} file has: "
            "the file is corrupted or was edited after saving."
        )
    if ("sara_frozen_index_gaps" in tensors) != ("sara_frozen_values" in tensors):
        raise InvalidAdapterError(f"The checkpoint has only half of the frozen entries of SaRA layer '{layer_name}'.")
    pairs = {what: names for what, names in ENTRY_SETS.items() if names[0] in tensors}
    recorded = _recorded_shape(layer_name, tensors[WEIGHT_SHAPE_NAME])
    checksum = checked_checksum(f"SaRA layer '{layer_name}': the checksum", tensors[CHECKSUM_NAME])
    where = f"SaRA layer '{layer_name}'"
    layout = LayerLayout.from_tensor(tensors[LAYOUT_NAME], recorded, where) if LAYOUT_NAME in tensors else None

    def corrupted() -> bool:
        computed = entries_checksum(layer_name, tensors) if checksums is None else checksums.result(layer_name)
        return not torch.equal(computed, checksum.cpu())

    decoded = {}
    try:
        if layer is not None:
            weight_shape = tuple(layer.weight_shape)
            if recorded != weight_shape:
                raise InvalidAdapterError(
                    f"SaRA layer '{layer_name}' was trained on a weight of shape {recorded}, but this model's weight "
                    f"has shape {weight_shape}: this adapter was made for another base model (e.g. an SD1.5 adapter "
                    "on SD2). Load it into the base model it was trained on."
                )
            own = LayerLayout.of(layer.get_base_layer())
            if layout is not None and (layout.kind, layout.transposed) != (own.kind, own.transposed):
                raise InvalidAdapterError(
                    f"SaRA layer '{layer_name}' was trained on a {_layout_name(layout)}, but this model's layer is a "
                    f"{_layout_name(own)}. {OTHER_MODEL_HINT}"
                )
        for what, (_, value_name) in pairs.items():
            _check_values(f"{where}: the checkpoint's {what} entries", tensors[value_name])
        stored = sum(tensors[value_name].numel() for _, value_name in pairs.values())
        if capacity is not None and stored > capacity:
            raise SlotTooSmall(
                f"{where} has {stored} entries (trainable and frozen), more than the {capacity} its slot holds."
            )
        numel = math.prod(recorded)
        if max_dense_per_entry is not None and numel > max_dense_per_entry * max(stored, 1):
            raise InvalidAdapterError(
                f"{where} records a weight of shape {recorded} ({numel} entries) for {stored} stored entries: more "
                f"than {max_dense_per_entry} times as many, which a dense update of it would cost. The file is "
                "corrupted or hostile."
            )
        for what, (stream_name, value_name) in pairs.items():
            decoded[what] = _decoded_entries(
                f"{where}: the checkpoint's {what} entries", tensors[stream_name], tensors[value_name], numel
            )
    except InvalidAdapterError as err:
        if corrupted():
            raise InvalidAdapterError(
                f"{err} Its checksum does not match either: the file is corrupted or was modified after saving."
            ) from err
        raise
    if corrupted():
        raise InvalidAdapterError(
            f"{where}: the checkpoint's tensors do not match their checksum: the file is corrupted or was modified "
            "after saving. Download or save the adapter again."
        )

    for what, indices in decoded.items():
        flat = indices.numpy()  # decoded on the CPU, ascending: a repeat is two equal neighbours
        if flat.size > 1 and bool((flat[1:] == flat[:-1]).any()):
            repeated = indices[1:][indices[1:] == indices[:-1]]
            raise InvalidAdapterError(
                f"{where}: the checkpoint's {what} indices repeat {repeated.numel()} entries (e.g. index "
                f"{int(repeated[0])}); each entry of the weight may be stored once."
            )
    if "frozen" in decoded and decoded["frozen"].numel():
        overlap = torch.isin(decoded["frozen"], decoded["trainable"])
        if bool(overlap.any()):
            raise InvalidAdapterError(
                f"{where}: {int(overlap.sum())} entries are both trainable and frozen in the checkpoint (e.g. index "
                f"{int(decoded['frozen'][overlap][0])}); each entry may be in one set."
            )
    values = {what: tensors[value_name] for what, (_, value_name) in pairs.items()}
    if value_dtype is not None:
        values = {what: tensor.to(value_dtype) for what, tensor in values.items()}
    if not allow_non_finite:
        # A usable effective weight implies finite values (a NaN or inf value makes its entry NaN or inf, at any
        # scale but 0): the values are checked on their own, for a message that names them, only when that check
        # finds a problem or is not made.
        reads_weight = layer is not None and _effective_weight_readable(layer)
        problem = None
        if reads_weight:
            problem = effective_weight_problem(layer, scale, [(decoded[what], values[what]) for what in decoded])
        if problem is not None or not reads_weight or scale == 0:
            for what, tensor in values.items():
                bad = _non_finite_count(tensor)
                if bad:
                    after = (
                        f" after the cast to {value_dtype}"
                        if value_dtype not in (None, tensors["sara_values"].dtype)
                        else ""
                    )
                    raise InvalidAdapterError(
                        f"{where}: the checkpoint's {what} values hold {bad} non-finite entries (NaN or inf{after}). "
                        f"{ALLOW_HINT}"
                    )
        if problem is not None:
            raise InvalidAdapterError(f"{where}: {problem}. {ALLOW_HINT}")
    trainable = decoded["trainable"]
    return LayerEntries(
        indices=trainable,
        values=values["trainable"],
        frozen_indices=decoded.get("frozen", trainable[:0]),
        frozen_values=values.get("frozen", values["trainable"][:0]),
        weight_shape=recorded,
        layout=layout,
    )


def _layout_name(layout: LayerLayout) -> str:
    if layout.kind == "conv":
        return "convolution"
    return "transposed (in x out, Conv1D) matrix" if layout.transposed else "matrix (nn.Linear)"


def check_checkpoint_file(
    state_dict: Mapping[str, Any], allow_non_finite: bool | None = None, max_dense_per_entry: int | None = None
) -> tuple[ParsedCheckpoint, dict[str, LayerEntries]]:
    """Read a checkpoint file without a model (:func:`read_layer` for every layer, against the recorded shapes and
    layouts) and check its modules_to_save checksum. ``peft-sara inspect`` and exports read files this way;
    ``max_dense_per_entry`` bounds what a layer's dense update may cost (see :func:`read_layer`).

    Returns the parsed checkpoint and each layer's entries by (saved) layer name.
    """
    allow_non_finite = non_finite_allowed() if allow_non_finite is None else allow_non_finite
    parsed = parse_checkpoint(state_dict)
    with LayerChecksums(parsed.layers) as checksums:
        entries = {
            layer_name: read_layer(
                layer_name,
                layer,
                allow_non_finite,
                parsed.version,
                max_dense_per_entry=max_dense_per_entry,
                checksums=checksums,
            )
            for layer_name, layer in parsed.layers.items()
        }
    check_other_checksum(state_dict, parsed, None)
    return parsed, entries


def check_other_checksum(state_dict: Mapping[str, Any], parsed: ParsedCheckpoint, adapter_name: str | None) -> None:
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
            raise InvalidAdapterError(f"The checkpoint's '{key}' holds non-finite values (NaN or inf). {ALLOW_HINT}")


def check_not_merged(
    model: nn.Module, adapter_name: str, layers: Iterable[tuple[str, SaRALayer]] | None = None
) -> None:
    """Refuse to load into an adapter that is merged: the merged weights would keep computing the old values while the
    stored ones (and any save) were the new file's. ``layers``: the model's ``sara_layers`` if the caller has them."""
    if layers is None:
        from .layer import sara_layers

        layers = sara_layers(model)
    merged = [name for name, layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(
            f"SaRA adapter '{adapter_name}' is merged into {len(merged)} layers (e.g. '{merged[0]}'): loading into it "
            "would leave the merged weights computing its old values. Unmerge it first (`unmerge_adapter()` / "
            "`pipe.unfuse_lora()`), or load under another `adapter_name`."
        )


def validate_checkpoint(
    model: nn.Module, adapter_name: str, state_dict: Mapping[str, torch.Tensor], allow_non_finite: bool | None = None
) -> tuple[dict[str, LayerEntries], dict[str, torch.Tensor]]:
    """Validate a SaRA checkpoint against the model's layers of ``adapter_name``; nothing is changed.

    Returns the validated entries by model layer name and the state dict to load, keyed like ``state_dict``: records
    taken out, each layer's entries decoded (``sara_indices`` / ``sara_frozen_indices``, frozen ones empty where the
    checkpoint has none). Raises :class:`InvalidAdapterError` naming the layer.
    """
    from .layer import sara_layers

    allow_non_finite = non_finite_allowed() if allow_non_finite is None else allow_non_finite
    model_layers = list(sara_layers(model))  # one walk over the model's modules for both
    check_not_merged(model, adapter_name, model_layers)
    parsed = parse_checkpoint(state_dict, adapter_name)
    layers = {
        normalize_module_name(name): (name, layer)
        for name, layer in model_layers
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
    check_other_checksum(state_dict, parsed, adapter_name)

    missing = next((name for layer_name, (name, _) in layers.items() if layer_name not in parsed.layers), None)
    if missing is not None:
        raise InvalidAdapterError(f"The checkpoint has no entries for SaRA layer '{missing}'.")
    entries = {}
    # Hashed in the model's layer order (the order they are read in), keyed by the name read_layer is given.
    with LayerChecksums({name: parsed.layers[layer_name] for layer_name, (name, _) in layers.items()}) as checksums:
        for layer_name, (name, layer) in layers.items():
            _, values = layer.trainable_entries(adapter_name)
            scale = float(layer.sara_scaling.get(adapter_name, 1.0))
            entries[name] = read_layer(
                name,
                parsed.layers[layer_name],
                allow_non_finite,
                parsed.version,
                layer=layer,
                value_dtype=values.dtype,
                scale=scale,
                checksums=checksums,
            )

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


# ------------------------------------------------------------------------------------------------- PEFT's load path
def resize_layers_to_entries(model: nn.Module, adapter_name: str, entries: dict[str, LayerEntries]) -> None:
    """Give every layer of ``entries`` (read by :func:`validate_checkpoint`, by model layer name) the size of its
    checkpoint entries, so that ``load_state_dict`` can fill them (after progressive re-selection, or when the layer
    was created without selecting)."""
    for name, layer_entries in entries.items():
        layer = model.get_submodule(name)
        indices, _ = layer.trainable_entries(adapter_name)
        frozen_indices, _ = layer.frozen_entries(adapter_name)
        if layer_entries.indices.shape != indices.shape or layer_entries.frozen_indices.shape != frozen_indices.shape:
            layer.set_trainable_entries(
                adapter_name,
                layer_entries.indices,
                layer_entries.values,
                layer_entries.frozen_indices,
                layer_entries.frozen_values,
                checked=True,
            )


# Arguments of `PeftConfig.from_pretrained` that say where PEFT's loader reads the weights from.
HUB_ARGUMENTS = ("subfolder", "revision", "cache_dir", "token", "use_auth_token", "local_files_only", "force_download")


def check_config_fingerprint(config_fingerprint: Any, record: torch.Tensor | None, where: str) -> None:
    """Refuse weights and an ``adapter_config.json`` of two different saves: the weights' ``sara_config_fingerprint``
    (``record``; None in files of format 1 and 2, which load as before) must equal the config's
    ``config_fingerprint``. PEFT's ``save_pretrained`` writes the weights, then the config, in place: a kill between
    the two leaves new weights beside the old config."""
    if record is None:
        return
    if not isinstance(record, torch.Tensor):
        raise InvalidAdapterError(f"{where}: '{CONFIG_FINGERPRINT_NAME}' is a {type(record).__name__}, not a tensor.")
    recorded = bytes(checked_checksum(f"{where}: '{CONFIG_FINGERPRINT_NAME}'", record).tolist()).hex()
    if config_fingerprint == recorded:
        return
    found = f"'{config_fingerprint[:12]}...'" if isinstance(config_fingerprint, str) else "none"
    raise InvalidAdapterError(
        f"{where}: the weights and adapter_config.json come from two different saves (the weights were saved with "
        f"config fingerprint '{recorded[:12]}...', the config holds {found}). A save that writes them one after the "
        "other in place (PEFT's `save_pretrained`) was interrupted between the two files (a half-written save), or "
        "one file was copied from another save. Save the adapter again (peft-sara's savers publish a folder whole); "
        f'to pair these two files on purpose, set "config_fingerprint": "{recorded}" in adapter_config.json.'
    )


def fingerprint_record(weights: Mapping[str, Any]) -> torch.Tensor | None:
    """The ``sara_config_fingerprint`` of a file's tensors (either key spelling), or None."""
    record = weights.get(CONFIG_FINGERPRINT_NAME)
    return weights.get(PEFT_MODEL_PREFIX + CONFIG_FINGERPRINT_NAME) if record is None else record


def _weights_path(folder: str) -> str:
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(
        f"'{folder}' has an adapter config but no '{SAFETENSORS_WEIGHTS_NAME}' (or '{WEIGHTS_NAME}')."
    )


def _weight_keys(path: str) -> tuple[set[str], torch.Tensor | None]:
    """The tensor names of an adapter weights file and its config fingerprint record, from the safetensors header
    (and that one record) or, for a legacy ``adapter_model.bin``, after its size checks (:func:`check_legacy_archive`),
    memory-mapped."""
    try:
        if not path.endswith(".bin"):
            with safe_open(path, framework="pt") as handle:
                keys = set(handle.keys())
                record = next((handle.get_tensor(key) for key in keys if key.endswith(CONFIG_FINGERPRINT_NAME)), None)
                return keys, record
        check_legacy_archive(Path(path))
        weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return set(weights), fingerprint_record(weights)
    except InvalidAdapterError:
        raise
    except Exception as err:  # safetensors', pickle's and zipfile's errors: all mean "not a weights file"
        raise InvalidAdapterError(f"The weights '{path}' are not a readable adapter file: {err}") from err


def _hub_weights_path(model_id: str, hub_kwargs: dict[str, Any]) -> str:
    """The cached file PEFT's ``load_peft_weights`` reads for a Hub adapter: ``adapter_model.safetensors`` if the repo
    has it, else the legacy ``adapter_model.bin`` (downloaded, not read: its size is checked before anything expands)."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    kwargs = dict(hub_kwargs)
    if "use_auth_token" in kwargs:
        kwargs.setdefault("token", kwargs.pop("use_auth_token"))
    try:
        return hf_hub_download(model_id, SAFETENSORS_WEIGHTS_NAME, **kwargs)
    except EntryNotFoundError:
        return hf_hub_download(model_id, WEIGHTS_NAME, **kwargs)


def _modules_to_save_keys(model: nn.Module, targets: Iterable[str]) -> dict[str, list[str]]:
    """Checkpoint keys PEFT will look up for the modules_to_save of a new adapter, by module (PEFT's suffix match)."""
    from peft.utils import ModulesToSaveWrapper

    from .layer import sara_layers

    inside_layers = {name for name, _ in sara_layers(model)}
    expected = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(f"{layer}.") for layer in inside_layers):
            continue
        if any(name.endswith(target) for target in targets):
            source = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
            expected[name] = [f"{normalize_module_name(name)}.{key}" for key in source.state_dict()]
    return expected


def check_load_source(model: nn.Module, config: PeftConfig, source: dict[str, Any]) -> None:
    """Before SaRA injects an adapter whose config PEFT's ``from_pretrained`` / ``load_adapter`` read from a file
    (``source``: path or repo id and the Hub arguments), check what PEFT would otherwise discover only after the
    injection: the config's field types, a ``subfolder`` inside the adapter, a readable (and, for a legacy ``.bin``,
    bounded) weights file, and the modules_to_save tensors. Called by the tuner's injection, not by a config check."""
    model_id = source["path"]
    hub_kwargs = {key: source[key] for key in HUB_ARGUMENTS if source.get(key) is not None}
    subfolder = hub_kwargs.get("subfolder")
    if subfolder is not None:
        check_relative_path(subfolder, "subfolder")
    where = f"The adapter config of '{model_id}'"
    check_config_values({field.name: getattr(config, field.name) for field in dataclasses.fields(config)}, where)
    folder = os.path.join(model_id, subfolder) if subfolder else model_id
    # A Hub repo: the file PEFT reads right after (cached), checked the same way as a local one, before it expands.
    path = _weights_path(folder) if os.path.isdir(folder) else _hub_weights_path(model_id, hub_kwargs)
    keys, record = _weight_keys(path)
    check_config_fingerprint(getattr(config, "config_fingerprint", None), record, f"The adapter '{model_id}'")
    keys = {normalize_module_name(key) for key in keys}
    for name, module_keys in _modules_to_save_keys(model, getattr(config, "modules_to_save", None) or ()).items():
        missing = [key for key in module_keys if key not in keys]
        if missing:
            raise InvalidAdapterError(
                f"'{model_id}' lacks the modules_to_save tensors of '{name}' that its config asks for: {missing[:3]}."
            )


__all__ = [
    "ALLOW_NON_FINITE_ENV_VAR",
    "LayerChecksums",
    "LayerEntries",
    "allow_non_finite_values",
    "MAX_DENSE_PER_STORED_ENTRY",
    "SlotTooSmall",
    "check_checkpoint_file",
    "check_load_source",
    "resize_layers_to_entries",
    "check_other_checksum",
    "check_not_merged",
    "effective_weight_problem",
    "non_finite_allowed",
    "read_layer",
    "validate_checkpoint",
]
