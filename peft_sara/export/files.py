"""Exporting from an adapter's files alone, without the base model.

A SaRA file holds, per layer, the flat indices and values of the update and the shape of the weight they address
(``peft_sara.file_format``), and the layers' layouts (``peft_sara.layouts``): that is all a LoRA or ``.diff`` export
needs. The base model is needed only where the file cannot say how to lay the update out, and
:func:`read_adapter_files` then names the layer and the reason:

- a file without layout records (saved by ``PeftModel.save_pretrained`` itself, or by another tool) for a component
  that is not a diffusers denoiser: there a 2-D weight may be ``nn.Linear`` or transformers' ``Conv1D`` (stored
  transposed), and a text encoder's module path in other tools' files depends on its class.

Denoiser components (``unet``, ``transformer``, ``prior``, ...) without records are laid out from the shapes:
diffusers has no ``Conv1D``; a kernel larger than 1 x 1 is then taken to be undilated, and a warning says so.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapter_files import read_adapter_weights, read_sara_config
from ..checkpoint_checks import check_layer_checkpoint
from ..constants import SAFETENSORS_NAME
from ..file_format import WEIGHT_SHAPE_NAME, LayerCheckpoint, parse_checkpoint
from ..layouts import LayerLayout, read_layouts
from ..pipelines import DENOISER_COMPONENTS
from ..resolve import resolve_adapter_folder
from ..tuner.layer import SparseUpdate
from .sources import (
    ComponentUpdates,
    ExportLayer,
    ExportSource,
    adapter_component_names,
    component_name_of,
    file_name_prefix,
    live_source,
)

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


def _update_reader(checkpoint: LayerCheckpoint, shape: tuple[int, ...], name: str):
    def read() -> SparseUpdate:
        entries = check_layer_checkpoint(name, checkpoint, shape, None, allow_non_finite=True)
        return SparseUpdate(
            indices=torch.cat([entries.indices, entries.frozen_indices]).long(),
            values=torch.cat([entries.values, entries.frozen_values]).float(),
            scale=1.0,
            weight_shape=torch.Size(shape),
        )

    return read


def _layout(
    name: str, shape: tuple[int, ...], recorded: dict[str, LayerLayout] | None, component: str, where: Path
) -> LayerLayout:
    if recorded is not None:
        if name not in recorded:
            raise BaseModelRequired(
                f"'{where}' records no layout for layer '{name}': the file was edited after saving."
            )
        return recorded[name]
    if component not in DENOISER_COMPONENTS:
        raise BaseModelRequired(
            f"Layer '{component}.{name}' (weight {shape}) needs the base model: '{where}' records no layer layouts "
            "(it was saved by `PeftModel.save_pretrained` itself or another tool) and outside a diffusers denoiser a "
            "2-D weight may be nn.Linear (out x in) or transformers' Conv1D (in x out), and a text encoder's module "
            "path depends on its class. Pass the base model, or save the adapter with `peft_sara.save_sara_adapter`.",
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
    default it comes from the model class the file records. Raises :class:`BaseModelRequired` (see the module
    docstring) where the files cannot tell how to lay a layer out.
    """
    folder = resolve_adapter_folder(adapter, subfolder, revision, token, None, False)
    components, guessed = {}, []
    names = adapter_component_names(folder)
    for name in names:
        component_folder = folder / name if name else folder
        config = read_sara_config(component_folder)
        weights_file = component_folder / SAFETENSORS_NAME
        recorded, model_class = read_layouts(weights_file) if weights_file.is_file() else (None, None)
        component_name = name or component or (component_name_of(model_class) if model_class else None)
        if component_name is None:
            unknown = f"'{component_folder}' records no model class, so which pipeline component it adapts is unknown"
            raise BaseModelRequired(
                f"{unknown}: pass `component=` (e.g. 'unet') or the base model.",
                f"{unknown}: name it with --component (e.g. --component unet), or pass --base FOLDER.",
            )
        parsed = parse_checkpoint(read_adapter_weights(component_folder))
        layers = {}
        for layer_name, checkpoint in sorted(parsed.layers.items()):
            shape = tuple(int(size) for size in checkpoint.tensors[WEIGHT_SHAPE_NAME])
            layout = _layout(layer_name, shape, recorded, component_name, weights_file)
            if not layout.recorded and any(size > 1 for size in shape[2:]):  # dilation matters beyond 1 x 1
                guessed.append(f"{component_name}.{layer_name}")
            layers[layer_name] = ExportLayer(layout, _update_reader(checkpoint, shape, layer_name))
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
