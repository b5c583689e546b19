"""Checking adapter files before anything changes: configs, SaRA tensors, and the records that make them checkable.

Format 2 (peft-sara >= 0.2) stores, besides each SaRA layer's indices and values, two small tensors per layer and one
per file, all ordinary safetensors entries (PEFT's ``load_peft_weights`` and ``PeftModel.from_pretrained`` read the file
as before; SaRA's load hook takes them out before ``load_state_dict``):

- ``<layer>.sara_weight_shape`` (int64): the shape of the base weight the flat indices address. An adapter made for
  another base model (SD1.5's 768-wide ``to_k`` on SD2's 1024-wide one) is refused with both shapes named.
- ``<layer>.sara_checksum`` (32 uint8): SHA-256 of the layer's saved tensors (name, dtype, shape and bytes), so a
  corrupted or edited file is refused instead of loading different values.
- ``sara_format_version``: :data:`FORMAT_VERSION`.

Files written by peft-sara 0.1.0 carry none of them: what can be checked is (index dtype and range against the model,
duplicates, overlaps, non-finite values) and one warning says that shapes and integrity could not be verified.

Non-finite values are refused unless allowed: ``allow_non_finite=True`` on peft-sara's loaders, the environment
variable ``PEFT_SARA_ALLOW_NON_FINITE=1``, or ``with allow_non_finite_values(): PeftModel.from_pretrained(...)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import math
import os
import types
import typing
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from torch import nn

from .config import SaRAConfig
from .constants import PEFT_TYPE_NAME
from .layer import SaRALayer, sara_layers
from .masks import check_entries

FORMAT_VERSION = 2
FORMAT_VERSION_NAME = "sara_format_version"
# One per file: the checksum of every tensor that is not a SaRA entry (modules_to_save), by saved name.
OTHER_CHECKSUM_NAME = "sara_modules_to_save_checksum"
FILE_RECORD_NAMES = (FORMAT_VERSION_NAME, OTHER_CHECKSUM_NAME)
WEIGHT_SHAPE_NAME = "sara_weight_shape"
CHECKSUM_NAME = "sara_checksum"
ENTRY_NAMES = ("sara_indices", "sara_values", "sara_frozen_indices", "sara_frozen_values")
RECORD_NAMES = (WEIGHT_SHAPE_NAME, CHECKSUM_NAME)
LAYER_TENSOR_NAMES = ENTRY_NAMES + RECORD_NAMES
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CHECKSUM_BYTES = 32
ALLOW_NON_FINITE_ENV_VAR = "PEFT_SARA_ALLOW_NON_FINITE"
PEFT_MODEL_PREFIX = "base_model.model."
OTHER_MODEL_HINT = "The checkpoint was made for a different model."


class InvalidAdapterError(ValueError):
    """An adapter (file, config or state dict) that cannot be loaded as it is: malformed, corrupted, or made for
    another model. Raised before anything of the model changes."""


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


# ------------------------------------------------------------------------------------------------- configs
def _field_annotations() -> dict[str, Any]:
    hints = typing.get_type_hints(SaRAConfig)
    return {config_field.name: hints.get(config_field.name, Any) for config_field in dataclasses.fields(SaRAConfig)}


def _matches(value: Any, annotation: Any) -> bool:
    """Whether a JSON value fits a config field's annotation (unknown annotations accept anything)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin is Union or origin is types.UnionType:
        return any(_matches(value, arg) for arg in args)
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if annotation is type(None):
        return value is None
    if origin in (list, set, tuple, frozenset) or annotation in (list, set, tuple):
        item_annotation = args[0] if args else Any
        return isinstance(value, (list, set, tuple, frozenset)) and all(
            _matches(item, item_annotation) for item in value
        )
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or any(value == member.value for member in annotation)
    return True


def check_config_values(values: Mapping[str, Any], where: str) -> None:
    """Raise :class:`InvalidAdapterError` unless every known ``SaRAConfig`` field in ``values`` has its declared type."""
    annotations = _field_annotations()
    for name, value in values.items():
        if name in annotations and not _matches(value, annotations[name]):
            expected = str(annotations[name]).replace("typing.", "")
            raise InvalidAdapterError(f"{where}: `{name}` must be {expected}, got {value!r}.")


def check_config_dict(raw: Any, where: str) -> None:
    """Check the content of an ``adapter_config.json``: a JSON object describing a SaRA adapter, fields well typed."""
    if not isinstance(raw, dict):
        raise InvalidAdapterError(f"{where} must hold a JSON object, got {type(raw).__name__}.")
    if "peft_type" not in raw:
        raise InvalidAdapterError(f"{where} has no `peft_type`: it is not a PEFT adapter config.")
    peft_type = raw["peft_type"]
    if peft_type != PEFT_TYPE_NAME:
        hint = " Load LoRA adapters with `pipe.load_lora_weights(...)`." if peft_type == "LORA" else ""
        raise InvalidAdapterError(
            f"{where} describes a {peft_type!r} adapter, not a SaRA adapter (peft_type {PEFT_TYPE_NAME!r}). "
            "SaRA adapters load after `import peft_sara`; other methods load with PEFT." + hint
        )
    check_config_values(raw, where)


def config_from_dict(raw: dict[str, Any], where: str) -> SaRAConfig:
    """A ``SaRAConfig`` from a checked ``adapter_config.json`` content (unknown keys are dropped with PEFT's warning)."""
    try:
        config = SaRAConfig.from_peft_type(**raw)
    except (TypeError, ValueError, KeyError) as err:
        raise InvalidAdapterError(f"{where} is not a valid SaRA config: {err}") from err
    if not isinstance(config, SaRAConfig):
        raise InvalidAdapterError(f"{where} is not a SaRA config (it gave a {type(config).__name__}).")
    config.kernel = "auto"  # which kernel runs is the runtime's choice, not the file's (see SaRAConfig.from_pretrained)
    return config


def check_relative_path(value: Any, what: str) -> None:
    """Refuse a ``subfolder`` / ``weight_name`` that would leave the adapter folder: not a string, absolute, a drive,
    or with a ``..`` component."""
    parts = str(value).replace("\\", "/").split("/") if isinstance(value, str) else None
    if (
        parts is None
        or not value
        or os.path.isabs(value)
        or value.startswith(("/", "\\"))
        or ":" in parts[0]
        or ".." in parts
    ):
        raise InvalidAdapterError(
            f"`{what}` must be a relative path inside the adapter folder (no '..', not absolute), got {value!r}."
        )


# ------------------------------------------------------------------------------------------------- key names
def normalize_module_name(name: str) -> str:
    """A module name / key prefix as a checkpoint stores it: without PEFT's ``base_model.model.``, nothing else.

    The one key parser of validation and loading: a key is validated under exactly the name it is loaded into, so a
    checkpoint spelt for a wrapped model (``_orig_mod.``, ``_fsdp_wrapped_module.``) matches no layer of a plain one.
    """
    return name.removeprefix(PEFT_MODEL_PREFIX)


def align_checkpoint_keys(state_dict: Mapping[str, Any], prefixed: bool) -> dict[str, Any]:
    """The checkpoint with every key spelt as the model spells it (with or without ``base_model.model.``).

    Raises :class:`InvalidAdapterError` if two keys name the same tensor once aligned (``lin0.sara_values`` and
    ``base_model.model.lin0.sara_values``): which one would load is not the file's to decide.
    """
    aligned: dict[str, Any] = {}
    spelt: dict[str, str] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise InvalidAdapterError(f"The checkpoint has a non-string key {key!r}.")
        name = normalize_module_name(key)
        target = PEFT_MODEL_PREFIX + name if prefixed else name
        if target in aligned:
            raise InvalidAdapterError(
                f"The checkpoint holds the tensor '{name}' twice, as '{spelt[target]}' and '{key}': it is ambiguous "
                "which one would load. Keep one spelling."
            )
        aligned[target], spelt[target] = value, key
    return aligned


def split_sara_key(key: str, adapter_name: str | None = None) -> tuple[str, str] | None:
    """(normalized layer name, SaRA tensor name) of a state-dict key, or None if it is not a SaRA tensor or record.

    Accepts checkpoint keys (``base_model.model.lin0.sara_values``) and model keys (``lin0.sara_values.default``).
    """
    parts = key.split(".")
    if adapter_name is not None and len(parts) >= 2 and parts[-1] == adapter_name and parts[-2] in LAYER_TENSOR_NAMES:
        parts = parts[:-1]
    if parts[-1] not in LAYER_TENSOR_NAMES + FILE_RECORD_NAMES:
        return None
    return normalize_module_name(".".join(parts[:-1]) + ".").removesuffix("."), parts[-1]


def _sibling_key(key: str, adapter_name: str, name: str) -> str:
    """``key`` (a SaRA tensor's key) with its tensor name replaced by ``name``, adapter suffix kept."""
    parts = key.split(".")
    position = -2 if len(parts) >= 2 and parts[-1] == adapter_name and parts[-2] in LAYER_TENSOR_NAMES else -1
    parts[position] = name
    return ".".join(parts)


# ------------------------------------------------------------------------------------------------- integrity records
def checksum_name(layer_name: str) -> str:
    """The layer name a checksum covers: as saved, without ``base_model.model.`` and CLIP's ``text_model.`` (which
    transformers 5 flattened, so a text-encoder file saved before still verifies after)."""
    return normalize_module_name(layer_name).removeprefix("text_model.")


def tensors_checksum(layer_name: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """SHA-256 (32 uint8) of named tensors and the layer (or file) they belong to: its name, then each tensor's
    name, dtype, shape and bytes in sorted name order. Integrity against accidents, not security: anyone who edits the
    file can recompute it."""
    digest = hashlib.sha256(f"{checksum_name(layer_name)};".encode())
    for name in sorted(tensors):
        data = tensors[name].detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}|{str(data.dtype).removeprefix('torch.')}|{tuple(tensors[name].shape)};".encode())
        digest.update(data.view(torch.uint8).numpy())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)


def entries_checksum(layer_name: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The checksum of a SaRA layer's saved tensors (entries and weight shape), bound to the layer's name."""
    return tensors_checksum(
        layer_name, {name: tensors[name] for name in ENTRY_NAMES + (WEIGHT_SHAPE_NAME,) if name in tensors}
    )


def other_tensor_name(key: str, adapter_name: str | None) -> str:
    """A modules_to_save key as saved: ``head.weight`` for ``base_model.model.head.modules_to_save.<adapter>.weight``
    (PEFT inserts the wrapper path when it loads)."""
    name = normalize_module_name(key)
    return name.replace(f".modules_to_save.{adapter_name}.", ".") if adapter_name else name


def _recordable(tensor: Any) -> bool:
    return type(tensor) in (torch.Tensor, nn.Parameter) and not tensor.is_meta


def add_integrity_records(
    model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Add each SaRA layer's weight shape and checksum, and the format version, to an adapter state dict being saved.

    Keys follow the state dict's own (adapter name included, PEFT removes it). If a layer cannot be found in ``model``
    or a tensor is not a plain tensor (meta, sharded), nothing is added: the file then loads like a 0.1.0 one.
    """
    layers = {
        normalize_module_name(name): layer
        for name, layer in sara_layers(model)
        if layer.present_adapters([adapter_name])
    }
    grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state_dict.items():
        split = split_sara_key(key, adapter_name)
        if split is None or split[1] not in ENTRY_NAMES:
            continue
        grouped.setdefault(split[0], {})[split[1]] = (key, tensor)
    if not grouped:
        return state_dict
    records = {}
    for layer_name, entries in grouped.items():
        layer = layers.get(layer_name)
        if layer is None or "sara_indices" not in entries or not all(_recordable(t) for _, t in entries.values()):
            return state_dict
        index_key = entries["sara_indices"][0]
        tensors = {name: tensor for name, (_, tensor) in entries.items()}
        tensors[WEIGHT_SHAPE_NAME] = torch.tensor(tuple(layer.weight_shape), dtype=torch.int64)
        records[_sibling_key(index_key, adapter_name, WEIGHT_SHAPE_NAME)] = tensors[WEIGHT_SHAPE_NAME]
        records[_sibling_key(index_key, adapter_name, CHECKSUM_NAME)] = entries_checksum(layer_name, tensors)
    prefix = PEFT_MODEL_PREFIX if all(key.startswith(PEFT_MODEL_PREFIX) for key in state_dict) else ""
    records[prefix + FORMAT_VERSION_NAME] = torch.tensor([FORMAT_VERSION], dtype=torch.int64)
    others = {key: tensor for key, tensor in state_dict.items() if split_sara_key(key, adapter_name) is None}
    if not all(_recordable(tensor) for tensor in others.values()):
        return state_dict
    records[prefix + OTHER_CHECKSUM_NAME] = other_tensors_checksum(others, adapter_name)
    return {**state_dict, **records}


def other_tensors_checksum(tensors: Mapping[str, torch.Tensor], adapter_name: str | None) -> torch.Tensor:
    """The checksum of a checkpoint's tensors that are not SaRA entries (its modules_to_save), by saved name."""
    return tensors_checksum("", {other_tensor_name(key, adapter_name): tensor for key, tensor in tensors.items()})


# ------------------------------------------------------------------------------------------------- checkpoints
@dataclass
class LayerCheckpoint:
    """The tensors a checkpoint holds for one SaRA layer, by SaRA tensor name, with their state-dict keys."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)


@dataclass
class ParsedCheckpoint:
    """A SaRA checkpoint split into per-layer tensors, its format version and every other key."""

    layers: dict[str, LayerCheckpoint]
    version: int | None
    record_keys: list[str]
    other_keys: list[str]
    other_checksum: torch.Tensor | None = None


def _read_version(key: str, tensor: torch.Tensor) -> int:
    if tensor.dtype not in INDEX_DTYPES or tensor.numel() != 1:
        raise InvalidAdapterError(
            f"'{key}' must be one integer (the SaRA file format version), got dtype {tensor.dtype} and shape "
            f"{tuple(tensor.shape)}: the file is corrupted."
        )
    version = int(tensor.reshape(-1)[0])
    if version > FORMAT_VERSION:
        raise InvalidAdapterError(
            f"The checkpoint uses SaRA file format {version}, newer than this peft-sara understands "
            f"({FORMAT_VERSION}): upgrade peft-sara (`pip install -U peft-sara`)."
        )
    if version != FORMAT_VERSION:
        raise InvalidAdapterError(
            f"'{key}' holds an unknown SaRA file format version {version}: the file is corrupted."
        )
    return version


def parse_checkpoint(state_dict: Mapping[str, Any], adapter_name: str | None = None) -> ParsedCheckpoint:
    """Group a checkpoint's SaRA tensors by layer; raise :class:`InvalidAdapterError` on non-tensors and repeats."""
    layers: dict[str, LayerCheckpoint] = {}
    version, version_key, record_keys, other_keys, other_checksum = None, None, [], [], None
    for key, tensor in state_dict.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise InvalidAdapterError(f"The checkpoint entry {key!r} is a {type(tensor).__name__}, not a tensor.")
        split = split_sara_key(key, adapter_name)
        if split is None:
            other_keys.append(key)
            continue
        layer_name, name = split
        if name == FORMAT_VERSION_NAME:
            if version_key is not None:
                raise InvalidAdapterError(f"The checkpoint holds two format versions: '{version_key}' and '{key}'.")
            version, version_key = _read_version(key, tensor), key
            record_keys.append(key)
            continue
        if name == OTHER_CHECKSUM_NAME:
            if other_checksum is not None or layer_name:
                raise InvalidAdapterError(
                    f"The checkpoint holds a misplaced or second '{OTHER_CHECKSUM_NAME}': '{key}'."
                )
            other_checksum = _checked_checksum(key, tensor)
            record_keys.append(key)
            continue
        layer = layers.setdefault(layer_name, LayerCheckpoint())
        if name in layer.tensors:
            raise InvalidAdapterError(
                f"The checkpoint holds '{name}' of SaRA layer '{layer_name}' twice: '{layer.keys[name]}' and '{key}'."
            )
        layer.tensors[name], layer.keys[name] = tensor, key
        if name in RECORD_NAMES:
            record_keys.append(key)
    if version is None and any(name in RECORD_NAMES for layer in layers.values() for name in layer.tensors):
        raise InvalidAdapterError(
            f"The checkpoint has SaRA integrity records but no '{FORMAT_VERSION_NAME}': the file is corrupted or was "
            "edited after saving."
        )
    if version is not None and other_checksum is None:
        raise InvalidAdapterError(
            f"The checkpoint has no '{OTHER_CHECKSUM_NAME}', which every format-{FORMAT_VERSION} file has: the file is "
            "corrupted or was edited after saving."
        )
    return ParsedCheckpoint(layers, version, record_keys, other_keys, other_checksum)


def _checked_checksum(where: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype != torch.uint8 or tuple(tensor.shape) != (CHECKSUM_BYTES,):
        raise InvalidAdapterError(
            f"{where} must be {CHECKSUM_BYTES} uint8, got dtype {tensor.dtype} and shape {tuple(tensor.shape)}: the "
            "file is corrupted."
        )
    return tensor


def _recorded_shape(layer_name: str, tensor: torch.Tensor) -> tuple[int, ...]:
    if tensor.dtype not in INDEX_DTYPES or tensor.dim() != 1 or not 1 <= tensor.numel() <= 8:
        raise InvalidAdapterError(
            f"SaRA layer '{layer_name}': the recorded weight shape must be 1 to 8 integers, got dtype {tensor.dtype} "
            f"and shape {tuple(tensor.shape)}: the file is corrupted."
        )
    shape = tuple(int(size) for size in tensor)
    if any(size < 0 for size in shape):
        raise InvalidAdapterError(f"SaRA layer '{layer_name}': the recorded weight shape {shape} is negative.")
    return shape


def _duplicates(indices: torch.Tensor) -> tuple[int, int | None]:
    """(number of repeated entries, one repeated index) of a 1-D index tensor."""
    if indices.numel() < 2:
        return 0, None
    if bool((indices[1:] > indices[:-1]).all()):  # saved selections are ascending: no sort needed
        return 0, None
    ordered = torch.sort(indices.long()).values
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    return repeated.numel(), (int(repeated[0]) if repeated.numel() else None)


@dataclass
class LayerEntries:
    """A layer's validated trainable and frozen entries (frozen ones empty when the checkpoint has none)."""

    indices: torch.Tensor
    values: torch.Tensor
    frozen_indices: torch.Tensor
    frozen_values: torch.Tensor


def check_layer_checkpoint(
    layer_name: str,
    checkpoint: LayerCheckpoint,
    weight_shape: tuple[int, ...] | None,
    value_dtype: torch.dtype | None,
    records_required: bool,
    allow_non_finite: bool,
) -> LayerEntries:
    """Validate one layer's checkpoint tensors, against the model's weight shape and value dtype when given.

    Checks, in order: presence, dtypes (integer indices, floating values), 1-D and equal lengths, the records' form,
    recorded vs model weight shape, index range, checksum, duplicates, trainable/frozen overlap, finiteness.
    """
    tensors = checkpoint.tensors
    for name in ("sara_indices", "sara_values"):
        if name not in tensors:
            missing = "indices" if name == "sara_indices" else "values"
            raise InvalidAdapterError(f"The checkpoint has no trainable {missing} for SaRA layer '{layer_name}'.")
    has_frozen = ("sara_frozen_indices" in tensors, "sara_frozen_values" in tensors)
    if has_frozen[0] != has_frozen[1]:
        missing = "values" if has_frozen[0] else "indices"
        raise InvalidAdapterError(f"The checkpoint has no frozen {missing} for SaRA layer '{layer_name}'.")
    if records_required:
        absent = [name for name in RECORD_NAMES if name not in tensors]
        if absent:
            raise InvalidAdapterError(
                f"SaRA layer '{layer_name}' lacks its {absent} record(s), which every layer of a format-"
                f"{FORMAT_VERSION} file has: the file is corrupted or was edited after saving."
            )
    pairs = {"trainable": ("sara_indices", "sara_values"), "frozen": ("sara_frozen_indices", "sara_frozen_values")}
    pairs = {what: names for what, names in pairs.items() if names[0] in tensors}
    for what, (index_name, value_name) in pairs.items():
        where = f"SaRA layer '{layer_name}': the checkpoint's {what} entries"
        indices, values = tensors[index_name], tensors[value_name]
        if indices.dtype not in INDEX_DTYPES:
            raise InvalidAdapterError(
                f"{where}: indices must be a 1-D integer tensor (int8/16/32/64), got dtype {indices.dtype} and shape "
                f"{tuple(indices.shape)}."
            )
        if values.dtype not in VALUE_DTYPES:
            raise InvalidAdapterError(
                f"{where}: values must be a 1-D floating tensor (float16/bfloat16/float32/float64), got dtype "
                f"{values.dtype} and shape {tuple(values.shape)}."
            )
        try:
            check_entries(indices, values, 2**63 - 1, where)
        except ValueError as err:
            raise InvalidAdapterError(str(err)) from err

    recorded = _recorded_shape(layer_name, tensors[WEIGHT_SHAPE_NAME]) if WEIGHT_SHAPE_NAME in tensors else None
    checksum = tensors.get(CHECKSUM_NAME)
    if checksum is not None:
        _checked_checksum(f"SaRA layer '{layer_name}': the checksum", checksum)

    def corrupted() -> bool:
        return checksum is not None and not torch.equal(entries_checksum(layer_name, tensors), checksum.cpu())

    try:
        if recorded is not None and weight_shape is not None and tuple(recorded) != tuple(weight_shape):
            raise InvalidAdapterError(
                f"SaRA layer '{layer_name}' was trained on a weight of shape {recorded}, but this model's weight has "
                f"shape {tuple(weight_shape)}: this adapter was made for another base model (e.g. an SD1.5 adapter "
                "on SD2). Load it into the base model it was trained on."
            )
        numel = math.prod(weight_shape) if weight_shape is not None else None
        if numel is None and recorded is not None:
            numel = math.prod(recorded)
        if numel is not None:
            for what, (index_name, value_name) in pairs.items():
                where = f"SaRA layer '{layer_name}': the checkpoint's {what} entries"
                try:
                    check_entries(tensors[index_name], tensors[value_name], numel, where, OTHER_MODEL_HINT)
                except ValueError as err:
                    raise InvalidAdapterError(str(err)) from err
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

    for what, (index_name, _) in pairs.items():
        count, example = _duplicates(tensors[index_name])
        if count:
            raise InvalidAdapterError(
                f"SaRA layer '{layer_name}': the checkpoint's {what} indices repeat {count} entries (e.g. index "
                f"{example}); each entry of the weight may be stored once."
            )
    if "frozen" in pairs and tensors["sara_frozen_indices"].numel():
        overlap = torch.isin(tensors["sara_frozen_indices"].long(), tensors["sara_indices"].long())
        if bool(overlap.any()):
            raise InvalidAdapterError(
                f"SaRA layer '{layer_name}': {int(overlap.sum())} entries are both trainable and frozen in the "
                f"checkpoint (e.g. index {int(tensors['sara_frozen_indices'][overlap][0])}); each entry may be in one set."
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
                    f"{ALLOW_NON_FINITE_ENV_VAR}=1, or load inside `peft_sara.validation.allow_non_finite_values()`."
                )
    empty_index = tensors["sara_indices"][:0]
    return LayerEntries(
        indices=tensors["sara_indices"],
        values=tensors["sara_values"],
        frozen_indices=tensors.get("sara_frozen_indices", empty_index),
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
        layer_name: check_layer_checkpoint(
            layer_name,
            layer,
            None,
            None,
            records_required=parsed.version is not None,
            allow_non_finite=allow_non_finite,
        )
        for layer_name, layer in parsed.layers.items()
    }
    if parsed.other_checksum is not None:
        others = {key: state_dict[key] for key in parsed.other_keys}
        if not torch.equal(other_tensors_checksum(others, None), parsed.other_checksum.cpu()):
            raise InvalidAdapterError(
                "The checkpoint's modules_to_save tensors do not match their checksum: the file is corrupted or was "
                "modified after saving. Download or save the adapter again."
            )
    return parsed, entries


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
    weight = getattr(layer.get_base_layer(), "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point or weight.is_meta:
        return None
    flat = weight.detach().reshape(-1)
    fan_in = max(1, flat.numel() // max(1, int(getattr(layer, "out_features", 1) or 1)))
    limit = torch.finfo(weight.dtype).max / fan_in
    for indices, values in entries:
        if indices.numel() == 0:
            continue
        base = flat.index_select(0, indices.to(device=flat.device, dtype=torch.long))
        patched = (base.double() + scale * values.to(device=flat.device, dtype=torch.float64)).to(weight.dtype)
        finite = torch.isfinite(patched)
        if not bool(finite.all()):
            return f"{int((~finite).sum())} entries of its effective weight are not finite in {weight.dtype}"
        largest = float(patched.abs().max())
        if largest > limit:
            return (
                f"its effective weight reaches {largest:.3g}, so a unit input over its fan-in of {fan_in} overflows "
                f"{weight.dtype} (limit {limit:.3g} per entry)"
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
            "`peft_sara.validation.allow_non_finite_values()`."
        )


def validate_checkpoint(
    model: nn.Module, adapter_name: str, state_dict: Mapping[str, torch.Tensor], allow_non_finite: bool | None = None
) -> tuple[dict[str, LayerEntries], dict[str, torch.Tensor]]:
    """Validate a SaRA checkpoint against the model's layers of ``adapter_name``; nothing is changed.

    Returns the validated entries by model layer name and the state dict to load: records and format version taken
    out, empty frozen entries added where the checkpoint has none. Raises :class:`InvalidAdapterError` naming the
    layer, and warns once when the file (0.1.0) records no shapes or checksums.
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
    if parsed.other_checksum is not None:
        others = {key: state_dict[key] for key in parsed.other_keys}
        if not torch.equal(other_tensors_checksum(others, adapter_name), parsed.other_checksum.cpu()):
            raise InvalidAdapterError(
                "The checkpoint's modules_to_save tensors do not match their checksum: the file is corrupted or was "
                "modified after saving. Download or save the adapter again."
            )

    entries, unverified = {}, 0
    for layer_name, (name, layer) in layers.items():
        checkpoint = parsed.layers.get(layer_name)
        if checkpoint is None:
            raise InvalidAdapterError(f"The checkpoint has no trainable indices for SaRA layer '{name}'.")
        _, values = layer.trainable_entries(adapter_name)
        entries[name] = check_layer_checkpoint(
            name,
            checkpoint,
            tuple(layer.weight_shape),
            values.dtype,
            records_required=parsed.version is not None,
            allow_non_finite=allow_non_finite,
        )
        if not allow_non_finite:
            check_effective_weight(name, layer, adapter_name, entries[name])
        unverified += WEIGHT_SHAPE_NAME not in checkpoint.tensors
    if unverified:
        warnings.warn(
            f"The checkpoint of SaRA adapter '{adapter_name}' was written by peft-sara 0.1.0 and records no weight "
            f"shapes or checksums: for its {unverified} layers only the index ranges, duplicates and values could be "
            "checked, not that it was made for this base model or that the file is intact. Save it again to record "
            "them.",
            stacklevel=3,
        )

    to_load = {key: value for key, value in state_dict.items() if key not in set(parsed.record_keys)}
    for layer_name, (name, _) in layers.items():
        checkpoint = parsed.layers[layer_name]
        if "sara_frozen_indices" not in checkpoint.tensors:
            index_key = checkpoint.keys["sara_indices"]
            to_load[_sibling_key(index_key, adapter_name, "sara_frozen_indices")] = entries[name].frozen_indices
            to_load[_sibling_key(index_key, adapter_name, "sara_frozen_values")] = entries[name].frozen_values
    return entries, to_load


__all__ = [
    "FORMAT_VERSION",
    "ALLOW_NON_FINITE_ENV_VAR",
    "InvalidAdapterError",
    "allow_non_finite_values",
    "non_finite_allowed",
    "check_config_dict",
    "check_config_values",
    "check_relative_path",
    "config_from_dict",
    "add_integrity_records",
    "entries_checksum",
    "tensors_checksum",
    "align_checkpoint_keys",
    "check_not_merged",
    "effective_weight_problem",
    "parse_checkpoint",
    "check_layer_checkpoint",
    "validate_checkpoint",
    "check_checkpoint_file",
]
