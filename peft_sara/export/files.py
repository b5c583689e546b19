"""Exporting from an adapter's files alone, without the base model.

A SaRA file holds, per layer, the flat indices and values of the update, the shape of the weight they address and its
layout (``peft_sara.tuner.file_format``), and its ``adapter_config.json`` names the class of the model it was injected
into (``base_model_class``): that is all a LoRA or ``.diff`` export needs, whichever writer saved the folder
(``PeftModel.save_pretrained``, ``save_sara_adapter``, the Hub push). Each file is read once, by the one reader
(``peft_sara.tuner.reader``), with every check a load runs and a bound on what a dense update may cost.

Files of format 1 (peft-sara up to dc2a78b) kept layouts and the model class in safetensors metadata, which only
peft-sara's own writers added; they are read from there (each record checked against its layer's shape), else from
PEFT's ``auto_mapping`` in the config. Where a format-1 file records no layouts, the base model is needed except for a
diffusers denoiser (``unet``, ``transformer``, ...), whose layers are laid out from their shapes (diffusers has no
``Conv1D``; a kernel larger than 1 x 1 is then taken to be undilated, and a warning says so);
:func:`read_adapter_files` otherwise raises :class:`BaseModelRequired` naming the layer and the reason.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..adapter_files import adapter_component_names, read_adapter_weights, read_sara_config
from ..constants import CONFIG_NAME, SAFETENSORS_NAME
from ..pipelines import DENOISER_COMPONENTS
from ..resolve import resolve_adapter_folder
from ..tuner.file_format import InvalidAdapterError, LayerLayout
from ..tuner.layer import SparseUpdate
from ..tuner.reader import MAX_DENSE_PER_STORED_ENTRY, LayerEntries, check_checkpoint_file
from .sources import (
    ComponentUpdates,
    ExportLayer,
    ExportSource,
    component_name_of,
    file_name_prefix,
    live_source,
)

# Format 1's safetensors metadata (read only; nothing writes it any more).
LEGACY_LAYOUTS_KEY = "peft_sara_layouts"
LEGACY_MODEL_CLASS_KEY = "peft_sara_model_class"

ADAPTER_FROM_FILES = "sara"  # the adapter name exports of files report


class BaseModelRequired(ValueError):
    """An export from files alone cannot lay out a layer: the message names the layer and why; pass the base model.
    ``cli_message`` says the same in ``peft-sara export``'s terms (its flags instead of Python arguments)."""

    def __init__(self, message: str, cli_message: str | None = None) -> None:
        super().__init__(message)
        self.cli_message = cli_message or message


@dataclass
class AdapterFiles:
    """A SaRA adapter read from its folder, ready to export (:func:`peft_sara.conversion.export_adapter` takes it in
    place of a model): per component, each layer's update and layout. ``single_model``: the adapter is one model's
    (its files at the root of the folder), not a pipeline's (one subfolder per component)."""

    folder: Path
    components: dict[str, ComponentUpdates]
    single_model: bool


def _update_reader(entries: LayerEntries):
    def read() -> SparseUpdate:
        return SparseUpdate(
            indices=torch.cat([entries.indices, entries.frozen_indices]).long(),
            values=torch.cat([entries.values, entries.frozen_values]).float(),
            scale=1.0,
            weight_shape=torch.Size(entries.weight_shape),
        )

    return read


def _legacy_metadata(weights_file: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The layout records and model class a format-1 file keeps in its safetensors metadata (None where absent)."""
    if not weights_file.is_file() or weights_file.name != SAFETENSORS_NAME:
        return None, None
    try:
        with safe_open(str(weights_file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        raw = metadata.get(LEGACY_LAYOUTS_KEY)
        records = json.loads(raw) if raw else None
    except (SafetensorError, OSError, ValueError) as err:
        raise InvalidAdapterError(f"'{weights_file}': unreadable layout records: {err}") from err
    if records is not None and not isinstance(records, dict):
        raise InvalidAdapterError(f"'{weights_file}': the layout records are not a JSON object.")
    return records, metadata.get(LEGACY_MODEL_CLASS_KEY)


def _recorded_model_class(folder: Path, config_class: str | None) -> str | None:
    """The model class the adapter's config names: ``base_model_class`` (set at injection), else PEFT's
    ``auto_mapping`` (written by ``PeftModel.save_pretrained`` for configs without ``task_type``)."""
    if config_class:
        return config_class
    try:
        mapping = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")).get("auto_mapping")
    except (OSError, ValueError, AttributeError):
        return None
    value = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    return value if isinstance(value, str) and value else None


def _layout(
    name: str,
    entries: LayerEntries,
    records: dict[str, Any] | None,
    component: str,
    where: Path,
) -> LayerLayout:
    shape = entries.weight_shape
    if entries.layout is not None:  # format 2: recorded in the tensors, checked by the reader
        return entries.layout
    if records is not None:
        if name not in records:
            raise BaseModelRequired(
                f"'{where}' records no layout for layer '{name}': the file was edited after saving."
            )
        layout = LayerLayout.from_record(records[name], shape, f"'{where}', layer '{name}'")
        if layout.transposed and component in DENOISER_COMPONENTS:
            raise InvalidAdapterError(
                f"'{where}' records layer '{component}.{name}' as stored transposed (transformers' Conv1D), which no "
                "diffusers denoiser has: the file's layout records were edited."
            )
        return layout
    if component not in DENOISER_COMPONENTS:
        raise BaseModelRequired(
            f"Layer '{component}.{name}' (weight {shape}) needs the base model: '{where}' records no layer layouts "
            "(format 1, saved by `PeftModel.save_pretrained` or another tool) and outside a diffusers denoiser a 2-D "
            "weight may be nn.Linear (out x in) or transformers' Conv1D (in x out). Pass the base model, or load the "
            "adapter and save it again with this peft-sara.",
            f"Layer '{component}.{name}' (weight {shape}) needs the base model: '{where}' records no layer layouts, and "
            "outside a diffusers denoiser a 2-D weight may be nn.Linear or transformers' Conv1D.",
        )
    return LayerLayout.from_shape(shape)


def read_adapter_files(
    adapter: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    component: str | None = None,
) -> AdapterFiles:
    """Read a SaRA adapter folder (or Hub id) for export without its base model.

    ``component`` names the part of a pipeline a root adapter (no ``unet/``-style subfolders) was made for; by
    default it comes from the model class the adapter records. Every file is read once and checked as a load checks
    it; a layer whose dense update would cost more than ``MAX_DENSE_PER_STORED_ENTRY`` times its stored entries is
    refused. Raises :class:`BaseModelRequired` (see the module docstring) where the files cannot tell how to lay a
    layer out.
    """
    folder = resolve_adapter_folder(adapter, subfolder, revision, token, None, False)
    components, guessed = {}, []
    names = adapter_component_names(folder)
    for name in names:
        component_folder = folder / name if name else folder
        config = read_sara_config(component_folder)
        weights_file = component_folder / SAFETENSORS_NAME
        records, legacy_class = _legacy_metadata(weights_file)
        model_class = _recorded_model_class(component_folder, getattr(config, "base_model_class", None)) or legacy_class
        guessed_component = component_name_of(model_class) if model_class else None
        if guessed_component == "model":  # a class that names no pipeline component
            guessed_component = None
        component_name = name or component or guessed_component
        if component_name is None:
            recorded = f"records the model class '{model_class}'" if model_class else "records no model class"
            unknown = f"'{component_folder}' {recorded}, so which pipeline component it adapts is unknown"
            raise BaseModelRequired(
                f"{unknown}: pass `component=` (e.g. 'unet') or the base model.",
                f"{unknown}: name it with --component (e.g. --component unet), or pass --base FOLDER.",
            )
        parsed, entries = check_checkpoint_file(
            read_adapter_weights(component_folder),
            allow_non_finite=True,
            max_dense_per_entry=MAX_DENSE_PER_STORED_ENTRY,
        )
        layers = {}
        for layer_name in sorted(parsed.layers):
            layer_entries = entries[layer_name]
            layout = _layout(layer_name, layer_entries, records, component_name, weights_file)
            if not layout.recorded and any(size > 1 for size in layer_entries.weight_shape[2:]):
                guessed.append(f"{component_name}.{layer_name}")  # dilation matters beyond 1 x 1
            layers[layer_name] = ExportLayer(layout, _update_reader(layer_entries))
        prefix = file_name_prefix(model_class, list(layers))
        components[component_name] = ComponentUpdates(layers, prefix, config.base_model_name_or_path)
    if guessed:
        warnings.warn(
            f"'{folder}' records no layer layouts: {len(guessed)} convolutions (e.g. '{guessed[0]}') are exported as "
            "undilated, ungrouped ones, which their shapes cannot confirm. Pass the base model if any is dilated.",
            stacklevel=2,
        )
    return AdapterFiles(folder, components, single_model=names == [""])


def resolve_export_source(
    source: Any, adapter_name: str | None = None, component: str | None = None, components: Sequence[str] | None = None
) -> ExportSource:
    """What an export reads, resolved once: from :class:`AdapterFiles`, a pipeline, a ``PeftModel`` or a model with an
    injected adapter; ``components`` chooses some of a pipeline's (or a pipeline adapter's) components."""
    if not isinstance(source, AdapterFiles):
        return live_source(source, adapter_name, component, components)
    missing = [name for name in components or () if name not in source.components]
    if missing:
        raise ValueError(f"'{source.folder}' has no adapter for {missing}; it has {sorted(source.components)}.")
    chosen = {name: source.components[name] for name in components} if components else source.components
    return ExportSource(adapter_name or ADAPTER_FROM_FILES, chosen, source.single_model)


__all__ = ["ADAPTER_FROM_FILES", "AdapterFiles", "BaseModelRequired", "read_adapter_files", "resolve_export_source"]
