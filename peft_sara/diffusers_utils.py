"""Compatibility imports: this module was split into ``peft_sara.pipelines`` (pipeline load/save),
``peft_sara.save_bridge`` (``save_pretrained`` while adapters are injected), ``peft_sara.resolve`` (folders and Hub
repos) and ``peft_sara.serialization`` (adapter files). Import from those; these names keep working."""

from .layer import sara_adapter_names
from .pipelines import inject_sara_adapter, load_sara_adapter, pipeline_modules, save_sara_adapter
from .save_bridge import base_layers_swapped_in, install_save_bridge
from .serialization import base_model_id as base_model_of
from .serialization import read_sara_config
from .serialization import save_injected_adapter as save_component_adapter

__all__ = [
    "load_sara_adapter",
    "save_sara_adapter",
    "save_component_adapter",
    "inject_sara_adapter",
    "install_save_bridge",
    "base_layers_swapped_in",
    "read_sara_config",
    "pipeline_modules",
    "sara_adapter_names",
    "base_model_of",
]
