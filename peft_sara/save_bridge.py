"""Keep ``model.save_pretrained`` (and so ``pipe.save_pretrained``) writing a plain, loadable model while SaRA layers are
injected.

Without it, a diffusers model would save ``...base_layer.weight`` and ``sara_*`` keys that ``from_pretrained`` cannot
load, and a transformers text encoder with ``_hf_peft_config_loaded`` would save only the adapter, through a method
that refuses ``peft<0.22``. Each adapted model's ``save_pretrained`` is wrapped (on the instance) so that it saves
with the tuner layers temporarily swapped for their base layers: the saved model is the base model, with fused
adapters baked in if they are fused. Save the adapter itself with ``peft_sara.save_sara_adapter``.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .tuner.layer import sara_layers


@contextlib.contextmanager
def base_layers_swapped_in(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily replace every PEFT tuner layer of ``module`` by its base layer (and hide the adapter flag).

    Inside the context, ``module.state_dict()`` has the keys of the plain model: the base weights, or the fused weights
    for layers whose adapters are merged. Everything is put back on exit.
    """
    swapped = []
    for name, layer in list(module.named_modules()):
        if isinstance(layer, BaseTunerLayer) and hasattr(layer, "base_layer") and name:
            parent_name, _, child_name = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            if getattr(parent, child_name, None) is layer:
                swapped.append((parent, child_name, layer))
    flag = module.__dict__.get("_hf_peft_config_loaded", None)
    try:
        for parent, child_name, layer in swapped:
            setattr(parent, child_name, layer.get_base_layer())
        if flag is not None:
            module._hf_peft_config_loaded = False
        yield module
    finally:
        for parent, child_name, layer in reversed(swapped):
            setattr(parent, child_name, layer)
        if flag is not None:
            module._hf_peft_config_loaded = flag


class _SaveWithBaseLayers:
    """``save_pretrained`` of one module, run with its tuner layers swapped for their base layers.

    Stored as an instance attribute, so it shadows the class method for that module only. It holds the module
    rather than a bound method, so that ``copy.deepcopy`` of the module yields a bridge to the copy, and it exposes the
    original signature, which ``DiffusionPipeline.save_pretrained`` inspects to choose its keyword arguments.
    """

    _sara_save_bridge = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(type(self.module).save_pretrained.__get__(self.module))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        layers = [layer for _, layer in sara_layers(module)]
        unfused = sorted(
            {name for layer in layers for name in layer.sara_values}
            - {name for layer in layers for name in layer.merged_adapters}
        )
        if unfused:
            warnings.warn(
                f"{type(module).__name__}.save_pretrained saves the base weights without the unfused SaRA adapter(s) "
                f"{unfused}: save those with `peft_sara.save_sara_adapter(pipe, ...)`, or fuse them first to bake "
                "them into the weights.",
                stacklevel=2,
            )
        with base_layers_swapped_in(module):
            return type(module).save_pretrained(module, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> _SaveWithBaseLayers:
        # While the module itself is deep-copied, `memo` already maps it to its copy.
        return _SaveWithBaseLayers(memo.get(id(self.module), self.module))


def install_save_bridge(module: nn.Module) -> None:
    """Make ``module.save_pretrained`` write the plain (base, or fused) model while tuner layers are injected."""
    if not hasattr(type(module), "save_pretrained") or getattr(module.save_pretrained, "_sara_save_bridge", False):
        return
    module.save_pretrained = _SaveWithBaseLayers(module)


__all__ = ["base_layers_swapped_in", "install_save_bridge"]
