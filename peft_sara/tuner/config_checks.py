"""Checking an ``adapter_config.json`` before it is used: a JSON object describing a SaRA adapter, every known field of
its declared type, and paths (``subfolder``, ``weight_name``) that stay inside the adapter folder.

Protects against: a LoRA or other method's config given to a SaRA loader, hand-edited configs whose fields have the
wrong type (which would otherwise fail deep inside injection, after the model changed), and path traversal through
``subfolder`` / ``weight_name``. It does not check that the targets exist in a model: injection does.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from .file_format import InvalidAdapterError
from .names import PEFT_TYPE_NAME

if TYPE_CHECKING:
    from .config import SaRAConfig


def _field_annotations() -> dict[str, Any]:
    from .config import SaRAConfig  # imports PEFT: only the field checks need it, not the path and kind checks

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


def check_config_kind(raw: Any, where: str) -> None:
    """Check that an ``adapter_config.json``'s content is a JSON object describing a SaRA adapter (imports no PEFT)."""
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


def check_config_dict(raw: Any, where: str) -> None:
    """Check the content of an ``adapter_config.json``: a JSON object describing a SaRA adapter, fields well typed."""
    check_config_kind(raw, where)
    check_config_values(raw, where)


def config_from_dict(raw: dict[str, Any], where: str) -> SaRAConfig:
    """A ``SaRAConfig`` from a checked ``adapter_config.json`` content (unknown keys are dropped with PEFT's warning)."""
    from .config import SaRAConfig

    try:
        config = SaRAConfig.from_peft_type(**raw)
    except (TypeError, ValueError, KeyError) as err:
        raise InvalidAdapterError(f"{where} is not a valid SaRA config: {err}") from err
    if not isinstance(config, SaRAConfig):
        raise InvalidAdapterError(f"{where} is not a SaRA config (it gave a {type(config).__name__}).")
    config.kernel = "auto"  # which kernel runs is the runtime's choice, not the file's (see SaRAConfig.from_pretrained)
    return config


# The fields `peft-sara inspect` reports, with SaRAConfig's annotations (a test keeps them equal): it checks them
# without importing PEFT, which the other fields' annotations need.
REPORTED_FIELDS: dict[str, Any] = {
    "threshold": float | None,
    "trainable_fraction": float | None,
    "base_model_name_or_path": Optional[str],  # noqa: UP045 (PEFT's annotation, spelled as the error message shows it)
}


def check_reported_fields(raw: Any, where: str) -> None:
    """:func:`check_config_kind`, and :data:`REPORTED_FIELDS` of its declared type (imports no PEFT)."""
    check_config_kind(raw, where)
    for name, annotation in REPORTED_FIELDS.items():
        if name in raw and not _matches(raw[name], annotation):
            raise InvalidAdapterError(
                f"{where}: `{name}` must be {str(annotation).replace('typing.', '')}, got {raw[name]!r}."
            )


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


__all__ = [
    "REPORTED_FIELDS",
    "check_config_dict",
    "check_config_kind",
    "check_reported_fields",
    "check_config_values",
    "check_relative_path",
    "config_from_dict",
]
