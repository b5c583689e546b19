"""Adapter files: what is saved, writing an adapter folder, reading one, and checking it against the live model.

An adapter folder is PEFT's: ``adapter_config.json`` + ``adapter_model.safetensors`` (indices and values of every
SaRA layer, frozen entries after re-selection, and the records of ``peft_sara.validation``: weight shapes, checksums,
format version). A model with several adapters keeps ``default`` at the root and every other adapter in a subfolder
named after it (:func:`adapter_subfolder`), as ``PeftModel.save_pretrained`` does.

Every file written here is written atomically (``peft_sara.atomic``): a killed save leaves the previous file. A
``PeftModel`` is saved by PEFT's own ``save_pretrained`` into a staging folder whose files are then published one by
one, atomically, weights before config before card. Calling ``PeftModel.save_pretrained`` directly writes in place.

Loading through PEFT (``PeftModel.from_pretrained`` / ``load_adapter``) injects the adapter before it reads the
weights. SaRA's tuner therefore checks the source before injection (:func:`check_peft_load_source`: config field types,
a readable weights file, modules_to_save tensors) and validates the checkpoint in its load hook
(:func:`fit_layers_to_checkpoint`); when that fails, the adapter PEFT just created is taken out again
(:func:`remove_adapter`), so ``peft_config``, the layers, the weights and other adapters are as before the call.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from peft.utils import ModulesToSaveWrapper, get_peft_model_state_dict, load_peft_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .atomic import atomic_write, save_safetensors_atomic, write_text_atomic
from .config import SaRAConfig
from .constants import CARD_NAME, CONFIG_NAME, DEFAULT_ADAPTER_NAME, PICKLE_NAME, SAFETENSORS_NAME
from .layer import sara_layers
from .layouts import layouts_metadata
from .validation import (
    InvalidAdapterError,
    add_integrity_records,
    check_config_dict,
    check_config_values,
    check_relative_path,
    config_from_dict,
    normalize_module_name,
    validate_checkpoint,
)

VALUE_KEYS = ("sara_values", "sara_frozen_values")
INDEX_KEYS = ("sara_indices", "sara_frozen_indices")
# Order in which a staged save is published: a folder whose config is new has new weights.
PUBLISH_ORDER = (SAFETENSORS_NAME, PICKLE_NAME, CONFIG_NAME, CARD_NAME)


# ------------------------------------------------------------------------------------------------- naming
def adapter_subfolder(adapter_name: str) -> str:
    """Where an adapter lives inside a saved model folder: the root for ``default``, else a subfolder of its name."""
    return "" if adapter_name == DEFAULT_ADAPTER_NAME else adapter_name


def base_model_id(model_or_pipeline: Any) -> str | None:
    """The Hub id / path a model or pipeline was loaded from, if it knows it (``name_or_path`` or the config's)."""
    config = getattr(model_or_pipeline, "config", None)
    for candidate in (
        getattr(model_or_pipeline, "name_or_path", None),
        getattr(config, "_name_or_path", None),
        getattr(config, "name_or_path", None),
    ):
        if isinstance(candidate, (str, os.PathLike)) and str(candidate):
            return str(candidate)
    return None


# ------------------------------------------------------------------------------------------------- writing
def write_adapter_config(config: PeftConfig, directory: str | os.PathLike) -> None:
    """``config.save_pretrained(directory)``, written atomically (sets as sorted lists, so files are reproducible)."""
    output = config.to_dict()
    for key, value in output.items():
        if isinstance(value, set):
            output[key] = sorted(value)
    write_text_atomic(Path(directory) / CONFIG_NAME, json.dumps(output, indent=2, sort_keys=True))


def save_injected_adapter(
    model: nn.Module, save_directory: str | os.PathLike, adapter_name: str, base_model: str | None = None
) -> Path:
    """Write one adapter of a model with injected SaRA layers (``adapter_config.json`` + weights) to a folder."""
    peft_config = getattr(model, "peft_config", None) or {}
    if adapter_name not in peft_config:
        raise ValueError(
            f"{type(model).__name__} has no adapter config for '{adapter_name}' (it has {sorted(peft_config)}). "
            "Inject adapters with `add_adapter` or `peft_sara.load_sara_adapter` so their configs are recorded."
        )
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(peft_config[adapter_name])
    config.inference_mode = True
    if base_model is not None:
        config.base_model_name_or_path = base_model
    # SaRA never adapts embeddings; "auto" would look the base model up on the Hub to compare vocabulary sizes.
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    state_dict = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    metadata = {"format": "pt", **layouts_metadata(model, adapter_name)}  # what exports need without the base
    save_safetensors_atomic(state_dict, directory / SAFETENSORS_NAME, metadata=metadata)
    write_adapter_config(config, directory)
    return directory


def _publish_order(relative: Path) -> tuple[int, str]:
    rank = PUBLISH_ORDER.index(relative.name) if relative.name in PUBLISH_ORDER else len(PUBLISH_ORDER)
    return rank, str(relative)


def publish_staged_files(staging: Path, directory: Path) -> None:
    """Copy every file of ``staging`` into ``directory`` (same relative paths), each atomically."""
    files = sorted((path.relative_to(staging) for path in staging.rglob("*") if path.is_file()), key=_publish_order)
    for relative in files:
        with open(staging / relative, "rb") as source, atomic_write(directory / relative) as destination:
            shutil.copyfileobj(source, destination, 1 << 20)


def save_model_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike,
    adapter_names: Sequence[str] | None = None,
    base_model: str | None = None,
) -> Path:
    """Save the SaRA adapters of a ``PeftModel`` or of a model with injected adapters (diffusers' ``add_adapter``).

    The one writer of model adapters: ``default`` goes to ``save_directory``, any other adapter to a subfolder of its
    name. ``base_model`` overrides ``base_model_name_or_path`` in the written configs (the live configs are kept).
    Every file is replaced atomically.
    """
    directory = Path(save_directory)
    if not isinstance(model, PeftModel):
        names = list(adapter_names) if adapter_names is not None else list(getattr(model, "peft_config", {}))
        for name in names:
            save_injected_adapter(model, directory / adapter_subfolder(name), name, base_model)
        return directory
    names = list(adapter_names) if adapter_names is not None else list(model.peft_config)
    saved_bases = {name: model.peft_config[name].base_model_name_or_path for name in names}
    directory.mkdir(parents=True, exist_ok=True)
    try:
        if base_model is not None:
            for name in names:
                model.peft_config[name].base_model_name_or_path = base_model
        # PEFT writes in place: let it write a staging folder beside the target, then publish file by file.
        with tempfile.TemporaryDirectory(prefix=".tmp-save-", dir=directory) as staging:
            if (directory / CARD_NAME).is_file():  # PEFT updates an existing card rather than replacing it
                shutil.copy2(directory / CARD_NAME, Path(staging) / CARD_NAME)
            # SaRA never adapts embeddings and its loaders refuse base-embedding tensors: a resized embedding belongs
            # in `modules_to_save`, where it is saved (and checked) with the adapter.
            model.save_pretrained(staging, selected_adapters=names, save_embedding_layers=False)
            publish_staged_files(Path(staging), directory)
    finally:
        for name, saved in saved_bases.items():
            model.peft_config[name].base_model_name_or_path = saved
    return directory


# ------------------------------------------------------------------------------------------------- reading
def read_sara_config(folder: str | os.PathLike) -> SaRAConfig:
    """Read ``adapter_config.json`` from ``folder`` and check that it describes a well-formed SaRA adapter.

    Raises ``FileNotFoundError`` without the file and :class:`~peft_sara.validation.InvalidAdapterError` (a
    ``ValueError``) for anything else: invalid JSON, a missing or other ``peft_type``, fields of the wrong type.
    """
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist.")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidAdapterError(f"'{path}' is not valid JSON: {err}") from err
    check_config_dict(raw, f"'{path}'")
    return config_from_dict(raw, f"'{path}'")


def _weights_file(folder: Path) -> Path:
    for name in (SAFETENSORS_NAME, PICKLE_NAME):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"'{folder}' has '{CONFIG_NAME}' but no '{SAFETENSORS_NAME}' (or '{PICKLE_NAME}').")


def _unreadable(path: Path, err: Exception) -> InvalidAdapterError:
    kind = "safetensors" if path.name == SAFETENSORS_NAME else "PyTorch weights"
    return InvalidAdapterError(f"'{path}' is not a readable {kind} file (truncated or corrupted?): {err}")


def read_adapter_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter tensors of a folder (safetensors, or a legacy ``adapter_model.bin`` loaded with weights_only).

    An unreadable file raises :class:`~peft_sara.validation.InvalidAdapterError`; a missing one ``FileNotFoundError``.
    """
    path = _weights_file(Path(folder))
    try:
        if path.name == SAFETENSORS_NAME:
            return load_file(path, device="cpu")
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors', pickle's and zipfile's errors: all mean "not a weights file"
        raise _unreadable(path, err) from err
    if not isinstance(weights, dict):
        raise InvalidAdapterError(f"'{path}' holds a {type(weights).__name__}, not a dict of tensors.")
    return weights


def adapter_weight_keys(folder: str | os.PathLike) -> list[str]:
    """The tensor names of a folder's adapter weights, reading only the safetensors header (it checks the layout)."""
    path = _weights_file(Path(folder))
    if path.name != SAFETENSORS_NAME:
        return list(read_adapter_weights(folder))
    try:
        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, err) from err


# ------------------------------------------------------------------------------------------------- state dicts
def prepare_for_saving(
    model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor], save_dtype: str | None
) -> dict[str, torch.Tensor]:
    """Drop empty frozen-entry tensors (nothing re-selected yet), cast the deltas to ``save_dtype`` and add the
    integrity records (weight shapes, checksums, format version) of ``peft_sara.validation``."""
    state_dict = {
        key: value for key, value in state_dict.items() if not (value.numel() == 0 and ".sara_frozen_" in f".{key}")
    }
    if save_dtype is not None:
        dtype = getattr(torch, save_dtype)
        state_dict = {
            key: value.to(dtype) if any(f".{name}" in key for name in VALUE_KEYS) else value
            for key, value in state_dict.items()
        }
    return add_integrity_records(model, adapter_name, state_dict)


def fit_layers_to_checkpoint(
    model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Validate a (model-keyed) SaRA checkpoint against the live model, then resize layers to its trainable sets.

    Everything is checked before any layer changes (``peft_sara.validation.validate_checkpoint``), and errors name the
    layer. Layers whose current trainable set differs in size from the checkpoint's (after progressive re-selection,
    or when the base weights select differently) are resized so ``load_state_dict`` can fill them. Returns the state
    dict to load (records taken out).
    """
    entries, to_load = validate_checkpoint(model, adapter_name, state_dict)
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
            )
    return to_load


# ------------------------------------------------------------------------------------------------- PEFT's load path
# Arguments of `PeftConfig.from_pretrained` that say where PEFT's loader reads the weights from.
HUB_ARGUMENTS = ("subfolder", "revision", "cache_dir", "token", "use_auth_token", "local_files_only", "force_download")


def _modules_to_save_keys(model: nn.Module, targets: Iterable[str]) -> dict[str, list[str]]:
    """Checkpoint keys PEFT will look up for the modules_to_save of a new adapter, by module (PEFT's suffix match)."""
    inside_layers = {name for name, _ in sara_layers(model)}
    expected = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(f"{layer}.") for layer in inside_layers):
            continue
        if any(name.endswith(target) for target in targets):
            source = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
            expected[name] = [f"{normalize_module_name(name)}.{key}" for key in source.state_dict()]
    return expected


def check_peft_load_source(model: nn.Module, config: PeftConfig) -> None:
    """Before SaRA injects an adapter whose config PEFT's ``from_pretrained`` / ``load_adapter`` read from a file
    (``SaRAConfig.loaded_from``), check what PEFT would otherwise discover only after the injection: the config's
    field types, a ``subfolder`` inside the adapter, a readable weights file, and the modules_to_save tensors.
    Does nothing for configs built in code (``get_peft_model``, ``add_adapter``)."""
    source = getattr(config, "loaded_from", None)
    if source is None:
        return
    model_id = source["path"]
    hub_kwargs = {key: source[key] for key in HUB_ARGUMENTS if source.get(key) is not None}
    subfolder = hub_kwargs.get("subfolder")
    if subfolder is not None:
        check_relative_path(subfolder, "subfolder")
    where = f"The adapter config of '{model_id}'"
    check_config_values({field.name: getattr(config, field.name) for field in dataclasses.fields(config)}, where)
    folder = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(folder):
        keys = {normalize_module_name(key) for key in adapter_weight_keys(folder)}
    else:  # a Hub repo: PEFT reads the same (cached) file right after
        try:
            weights = load_peft_weights(model_id, device="cpu", **hub_kwargs)
        except SafetensorError as err:
            raise InvalidAdapterError(
                f"The weights of '{model_id}' are not a readable safetensors file: {err}"
            ) from err
        keys = {normalize_module_name(key) for key in weights}
    for name, module_keys in _modules_to_save_keys(model, getattr(config, "modules_to_save", None) or ()).items():
        missing = [key for key in module_keys if key not in keys]
        if missing:
            raise InvalidAdapterError(
                f"'{model_id}' lacks the modules_to_save tensors of '{name}' that its config asks for: {missing[:3]}."
            )


__all__ = [
    "adapter_subfolder",
    "base_model_id",
    "write_adapter_config",
    "save_injected_adapter",
    "save_model_adapter",
    "publish_staged_files",
    "read_sara_config",
    "read_adapter_weights",
    "adapter_weight_keys",
    "prepare_for_saving",
    "fit_layers_to_checkpoint",
    "check_peft_load_source",
    "InvalidAdapterError",
]
