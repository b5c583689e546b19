"""Where an export reads from, resolved once into an :class:`ExportSource`: the SaRA layers of a pipeline, a
``PeftModel`` or a model with an injected adapter (:func:`live_source`), or an adapter's files alone
(:mod:`peft_sara.export.files`), as per-layer updates and layouts (:class:`ComponentUpdates`); and, for the command
line, base models and adapters loaded from folders (or Hub ids)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline
from diffusers.utils import deprecation_utils
from peft import PeftModel
from torch import nn

from ..adapter_files import adapter_component_names, read_sara_config
from ..constants import CONFIG_NAME
from ..pipelines import DENOISER_COMPONENTS, load_sara_adapter, pipeline_modules
from ..resolve import resolve_adapter_folder
from ..tuner.file_format import LayerLayout
from ..tuner.layer import SaRALayer, SparseUpdate, sara_adapter_names, sara_layers

MODEL_INDEX_NAME = "model_index.json"
MODEL_CONFIG_NAME = "config.json"


def is_pipeline(obj: Any) -> bool:
    """Whether ``obj`` is a diffusers pipeline (or anything else with a ``components`` dict that is not a module)."""
    return isinstance(getattr(obj, "components", None), dict) and not isinstance(obj, nn.Module)


def component_name_of(model: nn.Module | str) -> str:
    """The pipeline component a single model (or model class name) plays: ``unet``, ``transformer``,
    ``text_encoder``, or ``model`` when the class does not tell (pass ``component=`` to the exporters then)."""
    name = model if isinstance(model, str) else type(model.get_base_model() if isinstance(model, PeftModel) else model)
    name = name if isinstance(name, str) else name.__name__
    if "UNet" in name:
        return "unet"
    if "Transformer" in name and "Text" not in name:
        return "transformer"
    if "Text" in name:
        return "text_encoder"
    return "model"


def adapted_components(source: Any, component: str | None = None) -> dict[str, nn.Module]:
    """The modules holding SaRA layers, by component name (a single model counts as ``component``)."""
    if is_pipeline(source):
        modules = {name: module for name, module in pipeline_modules(source).items() if any(sara_layers(module))}
    elif isinstance(source, nn.Module):
        inner = source.get_base_model() if isinstance(source, PeftModel) else source
        modules = {component or component_name_of(inner): inner} if any(sara_layers(inner)) else {}
    else:
        raise TypeError(
            f"Expected a DiffusionPipeline, a PeftModel or a model with a SaRA adapter, got {type(source).__name__}."
        )
    if not modules:
        raise ValueError(f"{type(source).__name__} has no SaRA layers: load or add a SaRA adapter first.")
    return modules


def single_adapter_name(modules: dict[str, nn.Module], adapter_name: str | None) -> str:
    """``adapter_name``, checked to exist, or the one SaRA adapter the modules hold."""
    names = sorted({name for module in modules.values() for name in sara_adapter_names(module)})
    if adapter_name is not None:
        if adapter_name not in names:
            raise ValueError(f"No SaRA adapter named '{adapter_name}'; the model has {names}.")
        return adapter_name
    if len(names) != 1:
        raise ValueError(f"Pass `adapter_name=`: the model has several SaRA adapters: {names}.")
    return names[0]


def adapter_layers(module: nn.Module, adapter_name: str) -> Iterator[tuple[str, SaRALayer]]:
    """(module name, layer) of the SaRA layers of ``module`` that hold ``adapter_name``."""
    for name, layer in sara_layers(module):
        if layer.present_adapters([adapter_name]):
            yield name, layer


def file_name_prefix(model_class: str | None, layer_names: Sequence[str], has_text_model: bool = False) -> str:
    """What other tools' files put before our module names: ``text_model.`` for CLIP text encoders, whose
    ``text_model`` transformers 5 flattened away (files made with older versions keep it), else nothing."""
    flattened = not has_text_model and not any(name.startswith("text_model.") for name in layer_names)
    return "text_model." if (model_class or "").startswith("CLIPText") and flattened else ""


@dataclass
class ExportLayer:
    """One layer as an export sees it: its layout and a reader of its whole update (called once, when exported)."""

    layout: LayerLayout
    read_update: Callable[[], SparseUpdate]


@dataclass
class ComponentUpdates:
    """One component's adapted layers by module name, the prefix other tools' files add to those names, and the
    base model the adapter records."""

    layers: dict[str, ExportLayer] = field(default_factory=dict)
    file_prefix: str = ""
    base_model: str | None = None


@dataclass
class ExportSource:
    """What an export reads, resolved once from what its caller passed
    (:func:`peft_sara.export.files.resolve_export_source`): the adapter's name, the exported components' layers,
    whether the adapter is one model's (its files at a folder's root) rather than a pipeline's, and, when the adapter
    is live in a model, that model and every component module holding SaRA layers (what a merge bakes in)."""

    adapter_name: str
    components: dict[str, ComponentUpdates]
    single_model: bool
    model: Any = None  # the pipeline or model holding the adapter; None for an adapter's files alone
    modules: dict[str, nn.Module] = field(default_factory=dict)  # every adapted component module (live only)

    @property
    def base_model(self) -> str | None:
        """The base model the first component that records one names."""
        return next((parts.base_model for parts in self.components.values() if parts.base_model), None)

    def layers(self) -> list[tuple[str, str, ExportLayer]]:
        """(component, module name, layer) of every exported layer, in order."""
        return [(c, name, layer) for c, parts in self.components.items() for name, layer in parts.layers.items()]


def live_source(
    source: Any, adapter_name: str | None = None, component: str | None = None, components: Sequence[str] | None = None
) -> ExportSource:
    """The :class:`ExportSource` of an adapter in a pipeline, ``PeftModel`` or adapted model; ``components`` chooses
    some of a pipeline's components."""
    modules = adapted_components(source, component)
    chosen = modules
    if components is not None and is_pipeline(source):
        missing = [name for name in components if name not in modules]
        if missing:
            raise ValueError(f"No SaRA adapter in pipe.{missing[0]}; adapted components: {sorted(modules)}.")
        chosen = {name: modules[name] for name in components}
        if not chosen:
            raise ValueError(f"{type(source).__name__} has no SaRA layers: load or add a SaRA adapter first.")
    adapter_name = single_adapter_name(chosen, adapter_name)
    updates = {}
    for component_name, module in chosen.items():
        config = (getattr(module, "peft_config", None) or {}).get(adapter_name)
        layers = {
            name: ExportLayer(
                LayerLayout.of(layer.get_base_layer()), lambda layer=layer: layer.get_sparse_update(adapter_name)
            )
            for name, layer in adapter_layers(module, adapter_name)
        }
        prefix = file_name_prefix(type(module).__name__, list(layers), hasattr(module, "text_model"))
        updates[component_name] = ComponentUpdates(layers, prefix, getattr(config, "base_model_name_or_path", None))
    return ExportSource(adapter_name, updates, single_model=not is_pipeline(source), model=source, modules=modules)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, with an error naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot read '{path}' as JSON: {err}") from err


def model_class_for(folder: Path) -> type:
    """The diffusers / transformers class of a saved model folder (its ``config.json``)."""
    config = read_json(folder / MODEL_CONFIG_NAME)
    if "_class_name" in config:
        cls = getattr(diffusers, config["_class_name"], None)
    else:
        architectures = config.get("architectures") or [None]
        cls = getattr(transformers, architectures[0] or "", None)
    if cls is None:
        raise ValueError(
            f"'{folder / MODEL_CONFIG_NAME}' names no diffusers `_class_name` or transformers `architectures` that "
            "this installation knows."
        )
    return cls


def dtype_kwargs(cls: type, dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` keyword that sets ``dtype`` for a diffusers or transformers class: ``dtype`` where the
    library renamed it (it warns about ``torch_dtype`` there), ``torch_dtype`` on older releases; ``{}`` for ``None``."""
    if dtype is None:
        return {}
    if cls.__module__.startswith("transformers"):
        renamed = tuple(int(part) for part in transformers.__version__.split(".")[:2]) >= (4, 56)
    else:  # diffusers: `torch_dtype` goes through `_resolve_dtype`, which warns, since `dtype` exists
        renamed = hasattr(deprecation_utils, "_resolve_dtype")
    return {"dtype" if renamed else "torch_dtype": dtype}


def load_model_folder(folder: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> nn.Module:
    """A model saved with ``save_pretrained`` (a UNet, a transformer, a text encoder, ...), in eval mode."""
    folder = Path(folder)
    if not (folder / MODEL_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"'{folder}' holds no '{MODEL_CONFIG_NAME}': pass a model folder or a pipeline folder.")
    cls = model_class_for(folder)
    return cls.from_pretrained(str(folder), **dtype_kwargs(cls, torch_dtype)).eval()


def load_pipeline_folder(folder: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> Any:
    """A diffusers pipeline saved with ``save_pretrained`` (a folder with ``model_index.json``)."""
    return DiffusionPipeline.from_pretrained(str(folder), **dtype_kwargs(DiffusionPipeline, torch_dtype))


def is_pipeline_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a saved diffusers pipeline."""
    return (Path(folder) / MODEL_INDEX_NAME).is_file()


@dataclass
class Components:
    """Some components of a pipeline, loaded on their own: what ``load_sara_adapter`` needs (``components``)."""

    components: dict[str, nn.Module]


def load_adapted(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    whole_pipeline: bool = False,
    torch_dtype: torch.dtype | None = None,
    adapter_name: str = "sara",
) -> Any:
    """Load a base model (a pipeline folder or a model folder) with a SaRA adapter (a folder or a Hub id).

    For a pipeline base, only the components the adapter has are loaded (no VAE, no scheduler) unless
    ``whole_pipeline``; the result then has a ``components`` dict, as a pipeline has. A model base comes back as a
    ``PeftModel``.
    """
    folder = resolve_adapter_folder(adapter, subfolder, revision, token, None, False)
    if not Path(base).is_dir():
        raise FileNotFoundError(
            f"The base model '{base}' is not a local folder: pass a saved pipeline or model folder."
        )
    if not is_pipeline_folder(base):
        model = load_model_folder(base, torch_dtype)
        adapter_folder = folder if (folder / CONFIG_NAME).is_file() else folder / _only_component(folder)
        read_sara_config(adapter_folder)  # a clear error for LoRA / non-SaRA folders before PEFT's own
        return PeftModel.from_pretrained(model, str(adapter_folder), adapter_name=adapter_name).eval()
    if whole_pipeline:
        target = load_pipeline_folder(base, torch_dtype)
    else:
        names = adapter_component_names(folder)
        if names == [""]:
            names = [name for name in DENOISER_COMPONENTS if (Path(base) / name / MODEL_CONFIG_NAME).is_file()][:1]
        missing = [name for name in names if not (Path(base) / name / MODEL_CONFIG_NAME).is_file()]
        if missing or not names:
            raise ValueError(
                f"The adapter has weights for {missing or names}, which the pipeline in '{base}' does not have."
            )
        target = Components({name: load_model_folder(Path(base) / name, torch_dtype) for name in names})
    load_sara_adapter(target, folder, adapter_name=adapter_name)
    return target


def _only_component(folder: Path) -> str:
    names = adapter_component_names(folder)
    if len(names) != 1:
        raise ValueError(
            f"'{folder}' is a pipeline adapter with components {names}; pass the pipeline folder as the base, or the "
            "one component's adapter subfolder."
        )
    return names[0]


__all__ = [
    "ComponentUpdates",
    "ExportLayer",
    "ExportSource",
    "live_source",
    "file_name_prefix",
    "Components",
    "adapted_components",
    "adapter_layers",
    "component_name_of",
    "dtype_kwargs",
    "is_pipeline",
    "is_pipeline_folder",
    "load_adapted",
    "load_model_folder",
    "load_pipeline_folder",
    "single_adapter_name",
]
