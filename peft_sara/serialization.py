"""Adapter files: what is saved, writing an adapter folder, reading one, and checking it against the live model.

An adapter folder is PEFT's: ``adapter_config.json`` + ``adapter_model.safetensors`` (indices and values of every
SaRA layer, frozen entries after re-selection). A model with several adapters keeps ``default`` at the root and every
other adapter in a subfolder named after it (:func:`adapter_subfolder`), as ``PeftModel.save_pretrained`` does.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from .config import SaRAConfig
from .constants import CONFIG_NAME, DEFAULT_ADAPTER_NAME, PEFT_TYPE_NAME, PICKLE_NAME, SAFETENSORS_NAME
from .layer import SaRALayer
from .masks import check_entries

VALUE_KEYS = ("sara_values", "sara_frozen_values")
INDEX_KEYS = ("sara_indices", "sara_frozen_indices")


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
    config.save_pretrained(str(directory))
    # SaRA never adapts embeddings; "auto" would look the base model up on the Hub to compare vocabulary sizes.
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    state_dict = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    save_file(state_dict, directory / SAFETENSORS_NAME, metadata={"format": "pt"})
    return directory


def save_model_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike,
    adapter_names: Sequence[str] | None = None,
    base_model: str | None = None,
) -> Path:
    """Save the SaRA adapters of a ``PeftModel`` or of a model with injected adapters (diffusers' ``add_adapter``).

    The one writer of model adapters: ``default`` goes to ``save_directory``, any other adapter to a subfolder of its
    name. ``base_model`` overrides ``base_model_name_or_path`` in the written configs (the live configs are kept).
    """
    directory = Path(save_directory)
    if not isinstance(model, PeftModel):
        names = list(adapter_names) if adapter_names is not None else list(getattr(model, "peft_config", {}))
        for name in names:
            save_injected_adapter(model, directory / adapter_subfolder(name), name, base_model)
        return directory
    names = list(adapter_names) if adapter_names is not None else list(model.peft_config)
    saved_bases = {name: model.peft_config[name].base_model_name_or_path for name in names}
    inner = model.get_base_model()
    # PEFT's "auto" looks the base model up on the Hub to compare vocabulary sizes; pointless without a vocabulary.
    has_vocab = getattr(getattr(inner, "config", None), "vocab_size", None) is not None
    try:
        if base_model is not None:
            for name in names:
                model.peft_config[name].base_model_name_or_path = base_model
        model.save_pretrained(
            str(directory), selected_adapters=names, save_embedding_layers="auto" if has_vocab else False
        )
    finally:
        for name, saved in saved_bases.items():
            model.peft_config[name].base_model_name_or_path = saved
    return directory


# ------------------------------------------------------------------------------------------------- reading
def read_sara_config(folder: str | os.PathLike) -> SaRAConfig:
    """Read ``adapter_config.json`` from ``folder`` and check that it describes a SaRA adapter."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist.")
    with open(path, encoding="utf-8") as file:
        raw = json.load(file)
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != PEFT_TYPE_NAME:
        hint = " Load LoRA adapters with `pipe.load_lora_weights(...)`." if peft_type == "LORA" else ""
        raise ValueError(
            f"'{path}' describes a {raw.get('peft_type')!r} adapter, not a SaRA adapter (peft_type {PEFT_TYPE_NAME!r})."
            + hint
        )
    return SaRAConfig.from_pretrained(str(folder))


def read_adapter_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter tensors of a folder (safetensors, or a legacy ``adapter_model.bin`` loaded with weights_only)."""
    folder = Path(folder)
    if (folder / SAFETENSORS_NAME).is_file():
        return load_file(folder / SAFETENSORS_NAME, device="cpu")
    if (folder / PICKLE_NAME).is_file():
        return torch.load(folder / PICKLE_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"'{folder}' has '{CONFIG_NAME}' but no '{SAFETENSORS_NAME}' (or '{PICKLE_NAME}').")


# ------------------------------------------------------------------------------------------------- state dicts
def prepare_for_saving(state_dict: dict[str, torch.Tensor], save_dtype: str | None) -> dict[str, torch.Tensor]:
    """Drop empty frozen-entry tensors (nothing re-selected yet) and cast the deltas to ``save_dtype``."""
    state_dict = {
        key: value for key, value in state_dict.items() if not (value.numel() == 0 and ".sara_frozen_" in f".{key}")
    }
    if save_dtype is None:
        return state_dict
    dtype = getattr(torch, save_dtype)
    return {
        key: value.to(dtype) if any(f".{name}" in key for name in VALUE_KEYS) else value
        for key, value in state_dict.items()
    }


def _layer_keys(module_name: str, adapter_name: str) -> dict[str, str]:
    prefix = f"{module_name}." if module_name else ""
    return {name: f"{prefix}{name}.{adapter_name}" for name in INDEX_KEYS + VALUE_KEYS}


def _check_pair(layer_name: str, what: str, indices: torch.Tensor | None, values: torch.Tensor | None, numel: int):
    if indices is None or values is None:
        missing = "indices" if indices is None else "values"
        raise ValueError(f"The checkpoint has no {what} {missing} for SaRA layer '{layer_name}'.")
    where = f"SaRA layer '{layer_name}': the checkpoint's {what} entries"
    check_entries(indices, values, numel, where, "The checkpoint was made for a different model.")


def fit_layers_to_checkpoint(
    model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Validate a (model-keyed) SaRA checkpoint against the live model, then resize layers to its trainable sets.

    Every tensor is checked (presence, dtype, shape, index range) before any layer changes, and errors name the
    layer. Layers whose current trainable set differs in size from the checkpoint's (after progressive
    re-selection, or when the base weights select differently) are resized so ``load_state_dict`` can fill them.
    """
    plans = []
    expected_keys = set()
    for module_name, layer in model.named_modules():
        if not isinstance(layer, SaRALayer) or adapter_name not in layer.sara_values:
            continue
        keys = _layer_keys(module_name, adapter_name)
        expected_keys.update(keys.values())
        numel = layer.get_base_layer().weight.numel()
        trainable = (state_dict.get(keys["sara_indices"]), state_dict.get(keys["sara_values"]))
        _check_pair(module_name, "trainable", *trainable, numel)
        frozen = (state_dict.get(keys["sara_frozen_indices"]), state_dict.get(keys["sara_frozen_values"]))
        if frozen == (None, None):  # saved before any re-selection: no frozen entries
            frozen = (torch.zeros(0, dtype=torch.int64), torch.zeros(0))
            state_dict[keys["sara_frozen_indices"]], state_dict[keys["sara_frozen_values"]] = frozen
        _check_pair(module_name, "frozen", *frozen, numel)
        plans.append((layer, trainable, frozen))

    unexpected = sorted(
        key
        for key in state_dict
        if any(f".{name}" in key or key.startswith(name) for name in INDEX_KEYS + VALUE_KEYS)
        and key not in expected_keys
    )
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise ValueError(
            f"The checkpoint has SaRA entries for {len(unexpected)} tensors that match no SaRA layer of this model "
            f"(adapter '{adapter_name}'): {shown}. Was it trained with other `target_modules` or another model?"
        )

    for layer, (indices, values), (frozen_indices, frozen_values) in plans:
        current = (layer.sara_indices[adapter_name], layer.sara_frozen_indices[adapter_name])
        if indices.shape != current[0].shape or frozen_indices.shape != current[1].shape:
            layer.set_trainable_entries(adapter_name, indices, values, frozen_indices, frozen_values)
    return state_dict
