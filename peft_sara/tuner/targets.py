"""SaRA's default targets: one structural rule for every diffusers denoiser and transformers text encoder.

The rule: adapt every layer SaRA can wrap (``nn.Linear``, ungrouped ``nn.Conv1d/2d/3d``, transformers' ``Conv1D``)
inside the model's repeated blocks, except modulation, norms and embeddings. The repeated blocks are the outermost
``nn.ModuleList`` s that hold a block class the model declares (diffusers' ``_repeated_blocks`` / ``_no_split_modules``,
transformers' ``_no_split_modules``), or, for a model that declares none, the outermost ``nn.ModuleList`` s of layers.
Everything outside them (patch / time / text embedders, top-level modulation, the output head) stays frozen.

The rule reads class attributes and the module tree only: it imports neither diffusers nor transformers, so it covers
classes released after this code. The result is a list of full module names, which PEFT records (condensed to the
shortest unambiguous suffixes) in ``adapter_config.json``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn

from .layer import LAYER_CLASSES

# Inside a block, a layer is left out when an attribute on its path names, or a module on its path is of a class that
# names, modulation (adaLN / `*_mod` / `*modulation*` / scale-shift tables), a norm (adaLN's own `norm1.linear`) or an
# embedding (a timestep / patch embedder nested in a block).
EXCLUDED_ATTRIBUTE = re.compile(r"norm|embed|adaln|scale_shift|(^|_)mod(ulation)?(_|$)|modulation", re.IGNORECASE)
EXCLUDED_CLASS = re.compile(r"Norm|Embed|Modulation")
VISION_TOWER = re.compile(r"(^|\.)(vision\w*|visual)(\.|$)")
# Declared block classes live in these class attributes (diffusers: both; transformers: `_no_split_modules`).
BLOCK_CLASS_ATTRIBUTES = ("_repeated_blocks", "_no_split_modules")


@dataclass(frozen=True)
class BlockLayer:
    """A layer SaRA can wrap: its name, its (base) module, whether a PEFT tuner layer wraps it now, and the path from
    the model root as (attribute, class name) pairs."""

    name: str
    module: nn.Module
    wrapped: bool
    path: tuple[tuple[str, str], ...]


def _can_wrap(module: nn.Module) -> bool:
    return getattr(module, "weight", None) is not None and any(matches(module) for matches, _ in LAYER_CLASSES)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model PEFT's module names are relative to: a ``PeftModel``'s base model, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def wrappable_layers(model: nn.Module) -> list[BlockLayer]:
    """Every layer of ``model`` SaRA can wrap, in module order; a PEFT tuner layer counts as its base layer, under the
    tuner layer's name."""

    def walk(module: nn.Module, prefix: str, path: tuple[tuple[str, str], ...]) -> Iterator[BlockLayer]:
        for attribute, child in module.named_children():
            name = f"{prefix}.{attribute}" if prefix else attribute
            child_path = (*path, (attribute, type(child).__name__))
            if isinstance(child, BaseTunerLayer):
                base = child.get_base_layer()
                if _can_wrap(base):
                    yield BlockLayer(name, base, True, child_path)
            elif _can_wrap(child):
                yield BlockLayer(name, child, False, child_path)
            else:
                yield from walk(child, name, child_path)

    return list(walk(_unwrap(model), "", ()))


def declared_block_classes(model: nn.Module) -> set[str]:
    """The block class names ``model`` declares in ``_repeated_blocks`` / ``_no_split_modules``."""
    model = _unwrap(model)
    names: set[str] = set()
    for attribute in BLOCK_CLASS_ATTRIBUTES:
        names.update(getattr(model, attribute, None) or ())
    return names


def block_lists(model: nn.Module) -> list[str]:
    """Names of the outermost ``nn.ModuleList`` s holding ``model``'s repeated blocks (see the module docstring)."""
    model = _unwrap(model)
    module_lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    declared = declared_block_classes(model)
    chosen = [
        name
        for name, module_list in module_lists
        if any(type(sub).__name__ in declared for element in module_list for sub in element.modules())
    ]
    if not chosen:  # nothing declared (or declared classes outside any list): the lists of layers
        chosen = [
            name
            for name, module_list in module_lists
            if any(sum(map(_can_wrap, element.modules())) >= 2 for element in module_list)
        ]
    # A vision-language text encoder (Qwen2.5-VL, Mistral 3, Gemma 3) keeps its vision tower frozen: pipelines prompt it
    # through its language model.
    chosen = [name for name in chosen if not VISION_TOWER.search(name)]
    return [name for name in chosen if not any(name.startswith(f"{outer}.") for outer in chosen)]


def _excluded_inside_block(layer: BlockLayer, depth: int) -> bool:
    if getattr(layer.module, "groups", 1) != 1:  # grouped (depthwise) convolutions: few weights, left frozen
        return True
    inside = layer.path[depth:]
    return any(EXCLUDED_ATTRIBUTE.search(attribute) for attribute, _ in inside) or any(
        EXCLUDED_CLASS.search(class_name) for _, class_name in inside[:-1]
    )


def _in_blocks(layers: Sequence[BlockLayer], lists: Sequence[str]) -> list[tuple[BlockLayer, int]]:
    """The layers inside the block lists, each with the path depth of its block (the list's element)."""
    inside = []
    for layer in layers:
        for list_name in lists:
            if layer.name.startswith(f"{list_name}."):
                inside.append((layer, list_name.count(".") + 2))
                break
    return inside


def default_targets(model: nn.Module) -> list[str] | None:
    """The full names of the modules SaRA adapts in ``model`` by default, or None when ``model`` has no repeated
    blocks (pass ``target_modules`` then)."""
    lists = block_lists(model)
    targets = [
        layer.name
        for layer, depth in _in_blocks(wrappable_layers(model), lists)
        if not _excluded_inside_block(layer, depth)
    ]
    return targets or None


@dataclass(frozen=True)
class Coverage:
    """Which share of the Linear / Conv weights inside the repeated blocks an adapter set adapts."""

    adapted_layers: int
    block_layers: int
    adapted_parameters: int
    block_parameters: int
    adapted_outside_blocks: int
    left_out: tuple[str, ...]  # block layers not adapted, digits folded to `N` (`transformer_blocks.N.norm1.linear`)

    @property
    def parameter_share(self) -> float:
        return self.adapted_parameters / self.block_parameters if self.block_parameters else 0.0

    def __str__(self) -> str:
        text = (
            f"adapts {self.adapted_layers} of {self.block_layers} Linear/Conv weights inside the repeated blocks "
            f"({self.parameter_share:.1%} of their parameters)"
        )
        if self.adapted_outside_blocks:
            text += f", and {self.adapted_outside_blocks} outside them"
        return text


def coverage(model: nn.Module, targets: Sequence[str] | str | Any | None = None) -> Coverage:
    """How much of ``model``'s repeated blocks an adapter covers, by layers and by weight parameters.

    ``targets``: a PEFT config (its ``target_modules``, ``exclude_modules`` and ``layers_to_transform``; SaRA's defaults
    where ``target_modules`` is None) or a ``target_modules`` value, matched as PEFT matches them. Without it: the
    layers a PEFT tuner layer wraps now, or else SaRA's defaults.
    """
    layers = wrappable_layers(model)
    if targets is not None:
        config = targets if hasattr(targets, "target_modules") else SimpleNamespace(target_modules=targets)
        target_modules = config.target_modules if config.target_modules is not None else default_targets(model) or []
        config = SimpleNamespace(
            target_modules=target_modules,
            exclude_modules=getattr(config, "exclude_modules", None),
            layers_to_transform=getattr(config, "layers_to_transform", None),
            layers_pattern=getattr(config, "layers_pattern", None),
        )
        adapted = {layer.name for layer in layers if check_target_module_exists(config, layer.name)}
    elif any(layer.wrapped for layer in layers):
        adapted = {layer.name for layer in layers if layer.wrapped}
    else:
        adapted = set(default_targets(model) or ())
    inside = [layer for layer, _ in _in_blocks(layers, block_lists(model))]
    inside_names = {layer.name for layer in inside}
    left_out = sorted({re.sub(r"\.\d+(?=\.|$)", ".N", layer.name) for layer in inside if layer.name not in adapted})
    return Coverage(
        adapted_layers=sum(layer.name in adapted for layer in inside),
        block_layers=len(inside),
        adapted_parameters=sum(layer.module.weight.numel() for layer in inside if layer.name in adapted),
        block_parameters=sum(layer.module.weight.numel() for layer in inside),
        adapted_outside_blocks=len(adapted - inside_names),
        left_out=tuple(left_out),
    )


__all__ = ["BlockLayer", "Coverage", "block_lists", "coverage", "declared_block_classes", "default_targets"]
