"""SaRA inside PEFT's load path (``PeftModel.from_pretrained`` / ``load_adapter``, ``set_peft_model_state_dict``).

PEFT injects an adapter before it reads the weights. SaRA's tuner therefore checks the source before injection
(:func:`check_peft_load_source`: config field types, a readable weights file, modules_to_save tensors), and its load
hook (``SaRAModel._remap_adapter_state_dict_for_load``) checks and decodes the checkpoint
(``peft_sara.tuner.reader.validate_checkpoint``) and then sizes the layers to it (:func:`resize_layers_to_entries`)
before ``load_state_dict`` writes any value. When that fails, the adapter PEFT just created is taken out again
(``peft_sara.transaction``), so ``peft_config``, the layers, the weights and other adapters are as before the call.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from peft import PeftConfig
from peft.utils import ModulesToSaveWrapper, load_peft_weights
from safetensors import SafetensorError
from torch import nn

from .adapter_files import adapter_weight_keys
from .config_checks import check_config_values, check_relative_path
from .tuner.file_format import InvalidAdapterError, normalize_module_name
from .tuner.layer import sara_layers
from .tuner.reader import LayerEntries


def resize_layers_to_entries(model: nn.Module, adapter_name: str, entries: dict[str, LayerEntries]) -> None:
    """Give every layer of ``entries`` (validated, by model layer name) the size of its checkpoint entries.

    Layers whose current trainable or frozen set differs in size from the checkpoint's (after progressive
    re-selection, or when the base weights select differently) take the checkpoint's entries, so that
    ``load_state_dict`` can fill them.
    """
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


__all__ = ["check_peft_load_source", "resize_layers_to_entries"]
