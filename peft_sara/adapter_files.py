"""Adapter folders: where each adapter of a model goes, writing them (atomically) and reading them back.

An adapter folder is PEFT's: ``adapter_config.json`` + ``adapter_model.safetensors`` in the format of
``peft_sara.tuner.file_format``. A model with several adapters keeps ``default`` at the root and every other adapter in a
subfolder named after it (:func:`adapter_subfolder`), as ``PeftModel.save_pretrained`` does.

Every folder written here is written through ``peft_sara.atomic.folder_writer``: a killed save leaves the previous
folder or the new one, whole. A ``PeftModel`` is saved by PEFT's own ``save_pretrained`` into the writer's staging
folder. Calling ``PeftModel.save_pretrained`` directly writes in place (weights, then config): the readers refuse a
folder left with the weights of one save and the config of another (``peft_sara.tuner.reader.check_config_fingerprint``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .atomic import folder_writer, save_safetensors_atomic, write_text_atomic
from .constants import CARD_NAME, CONFIG_NAME, DEFAULT_ADAPTER_NAME, KNOWN_COMPONENTS, PICKLE_NAME, SAFETENSORS_NAME
from .tuner.config_checks import check_config_dict, check_reported_fields, config_from_dict
from .tuner.file_format import InvalidAdapterError, check_legacy_archive
from .tuner.reader import check_config_fingerprint, fingerprint_record

if TYPE_CHECKING:
    from peft import PeftConfig

    from .tuner.config import SaRAConfig

# Reading a folder's files imports no PEFT (`peft-sara inspect` answers in about the time torch takes to import):
# writing and read_sara_config import it where they run.


# ------------------------------------------------------------------------------------------------- naming
def adapter_subfolder(adapter_name: str) -> str:
    """Where an adapter lives inside a saved model folder: the root for ``default``, else a subfolder of its name."""
    return "" if adapter_name == DEFAULT_ADAPTER_NAME else adapter_name


# ------------------------------------------------------------------------------------------------- writing
def write_adapter_config(config: PeftConfig, directory: str | os.PathLike, model: nn.Module | None = None) -> None:
    """``adapter_config.json`` as ``PeftModel.save_pretrained`` writes it, atomically: the config's fields, and for a
    config without ``task_type`` the ``auto_mapping`` of ``model``'s class; sets as sorted lists, so files are
    reproducible."""
    output = config.to_dict()
    for key, value in output.items():
        if isinstance(value, set):
            output[key] = sorted(value)
    if model is not None and getattr(config, "task_type", None) is None:
        output["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
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
    config = copy.deepcopy(peft_config[adapter_name])
    config.inference_mode = True
    if base_model is not None:
        config.base_model_name_or_path = base_model
    # SaRA never adapts embeddings; "auto" would look the base model up on the Hub to compare vocabulary sizes. The
    # state dict comes through SaRA's tuner hook, so it is already in the file format (peft_sara.tuner.file_format).
    from peft.utils import get_peft_model_state_dict

    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    state_dict = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    # The same header PEFT's save_pretrained writes: everything a reader needs is in the tensors and the config.
    with folder_writer(save_directory) as directory:
        save_safetensors_atomic(state_dict, directory / SAFETENSORS_NAME, metadata={"format": "pt"})
        write_adapter_config(config, directory, model)
    return Path(save_directory)


def save_model_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike,
    adapter_names: Sequence[str] | None = None,
    base_model: str | None = None,
) -> Path:
    """Save the SaRA adapters of a ``PeftModel`` or of a model with injected adapters (diffusers' ``add_adapter``).

    The one writer of model adapters: ``default`` goes to ``save_directory``, any other adapter to a subfolder of its
    name. ``base_model`` overrides ``base_model_name_or_path`` in the written configs (the live configs are kept).
    All of it is published as one unit (``peft_sara.atomic.folder_writer``).
    """
    from peft import PeftModel

    directory = Path(save_directory)
    if not isinstance(model, PeftModel):
        names = list(adapter_names) if adapter_names is not None else list(getattr(model, "peft_config", {}))
        with folder_writer(directory) as staging:
            for name in names:
                save_injected_adapter(model, staging / adapter_subfolder(name), name, base_model)
        return directory
    names = list(adapter_names) if adapter_names is not None else list(model.peft_config)
    saved_bases = {name: model.peft_config[name].base_model_name_or_path for name in names}
    try:
        if base_model is not None:
            for name in names:
                model.peft_config[name].base_model_name_or_path = base_model
        # PEFT writes in place: let it write the folder writer's staging folder.
        with folder_writer(directory) as staging:
            if (directory / CARD_NAME).is_file():  # PEFT updates an existing card rather than replacing it
                shutil.copy2(directory / CARD_NAME, staging / CARD_NAME)
            # SaRA never adapts embeddings and its loaders refuse base-embedding tensors: a resized embedding belongs
            # in `modules_to_save`, where it is saved (and checked) with the adapter.
            model.save_pretrained(str(staging), selected_adapters=names, save_embedding_layers=False)
    finally:
        for name, saved in saved_bases.items():
            model.peft_config[name].base_model_name_or_path = saved
    return directory


# ------------------------------------------------------------------------------------------------- reading
def read_sara_config(folder: str | os.PathLike) -> SaRAConfig:
    """Read ``adapter_config.json`` from ``folder`` and check that it describes a well-formed SaRA adapter.

    Raises ``FileNotFoundError`` without the file and :class:`~peft_sara.InvalidAdapterError` (a
    ``ValueError``) for anything else: invalid JSON, a missing or other ``peft_type``, fields of the wrong type.
    """
    path, raw = _read_config_json(folder)
    check_config_dict(raw, f"'{path}'")
    return config_from_dict(raw, f"'{path}'")


def read_reported_config_fields(folder: str | os.PathLike) -> dict[str, Any]:
    """``adapter_config.json``'s content, checked to describe a SaRA adapter and for the fields ``peft-sara inspect``
    reports (``peft_sara.tuner.config_checks.REPORTED_FIELDS``), without importing PEFT; :func:`read_sara_config`
    checks every field and builds the config. Raises as :func:`read_sara_config` does."""
    path, raw = _read_config_json(folder)
    check_reported_fields(raw, f"'{path}'")
    return raw


def _read_config_json(folder: str | os.PathLike) -> tuple[Path, Any]:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist.")
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidAdapterError(f"'{path}' is not valid JSON: {err}") from err


def adapter_component_names(adapter_folder: Path) -> list[str]:
    """Components a SaRA adapter folder has weights for (a root adapter counts as the denoiser, ``""``)."""
    names = [
        child.name
        for child in sorted(adapter_folder.iterdir())
        if child.name in KNOWN_COMPONENTS and (child / CONFIG_NAME).is_file()
    ]
    if not names and (adapter_folder / CONFIG_NAME).is_file():
        return [""]
    if not names:
        raise FileNotFoundError(
            f"No '{CONFIG_NAME}' in '{adapter_folder}' or in its component subfolders: not a SaRA adapter folder."
        )
    return names


def _weights_file(folder: Path) -> Path:
    for name in (SAFETENSORS_NAME, PICKLE_NAME):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"'{folder}' has '{CONFIG_NAME}' but no '{SAFETENSORS_NAME}' (or '{PICKLE_NAME}').")


def _unreadable(path: Path, err: Exception) -> InvalidAdapterError:
    kind = "safetensors" if path.name == SAFETENSORS_NAME else "PyTorch weights"
    return InvalidAdapterError(f"'{path}' is not a readable {kind} file (truncated or corrupted?): {err}")


def _config_fingerprint(folder: Path) -> str | None:
    """The ``config_fingerprint`` of a folder's ``adapter_config.json`` (None without one; an unreadable config is
    its own readers' to refuse)."""
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return raw.get("config_fingerprint") if isinstance(raw, dict) else None


def read_adapter_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter tensors of a folder (safetensors, or a legacy ``adapter_model.bin`` loaded with weights_only, its
    size checked first and its storages memory-mapped: :func:`check_legacy_archive`), refused if they and the
    folder's ``adapter_config.json`` come from two different saves (a half-written ``save_pretrained``).

    An unreadable file raises :class:`~peft_sara.InvalidAdapterError`; a missing one ``FileNotFoundError``.
    """
    weights = _read_weights_file(Path(folder))
    record = fingerprint_record(weights)
    if record is not None and (Path(folder) / CONFIG_NAME).is_file():
        check_config_fingerprint(_config_fingerprint(Path(folder)), record, f"The adapter in '{folder}'")
    return weights


def _read_weights_file(folder: Path) -> dict[str, torch.Tensor]:
    path = _weights_file(Path(folder))
    if path.name != SAFETENSORS_NAME:
        check_legacy_archive(path)
    try:
        if path.name == SAFETENSORS_NAME:
            return load_file(path, device="cpu")
        weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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


__all__ = [
    "adapter_component_names",
    "adapter_subfolder",
    "adapter_weight_keys",
    "read_adapter_weights",
    "read_reported_config_fields",
    "read_sara_config",
    "save_injected_adapter",
    "save_model_adapter",
    "write_adapter_config",
]
