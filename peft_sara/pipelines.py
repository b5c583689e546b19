"""Loading and saving SaRA adapters for the components of a diffusers ``DiffusionPipeline``.

An adapter for a pipeline is a folder (or a Hub repo) with one PEFT adapter per adapted component::

    README.md                           # model card (see ``peft_sara.hub``)
    unet/adapter_config.json            # or transformer/ for DiT pipelines
    unet/adapter_model.safetensors
    text_encoder/adapter_config.json    # optional, likewise text_encoder_2/, ...
    text_encoder/adapter_model.safetensors

A single-model adapter (``adapter_config.json`` at the root, as ``PeftModel.save_pretrained`` writes it) is accepted
for the denoiser (``unet`` or ``transformer``).

Loading injects SaRA layers in place, so components stay diffusers ``ModelMixin`` / transformers ``PreTrainedModel``
instances and the pipeline's own adapter API drives them like LoRA adapters: ``pipe.set_adapters([...], weights)``,
``pipe.fuse_lora()`` / ``unfuse_lora()``, ``pipe.disable_lora()`` / ``enable_lora()``, ``pipe.unload_lora_weights()``,
``pipe.delete_adapters(...)`` and ``cross_attention_kwargs={"scale": s}`` / ``joint_attention_kwargs``.

Injection goes through public API only (``peft_sara.injection``): a diffusers model's own ``add_adapter``, PEFT's
``inject_adapter_in_model`` for transformers text encoders (transformers 5.x's ``add_adapter`` refuses ``peft<0.22``).

Saving follows diffusers' LoRA conventions: ``pipe.save_pretrained`` saves the components as they are, so with an
unfused adapter injected it writes the tuner layers' keys (``...base_layer.weight``, ``...sara_values...``), which
``from_pretrained`` does not load (it warns and initializes those weights anew). Save the adapter with
:func:`save_sara_adapter`, or a merged model with ``pipe.fuse_lora(); pipe.unload_lora_weights(); pipe.save_pretrained(d)``
(or ``peft_sara.conversion.save_merged``, which leaves the pipeline as it was).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .adapter_files import read_adapter_weights, read_sara_config, save_injected_adapter
from .atomic import folder_writer, write_text_atomic
from .cards import sara_model_card
from .constants import CARD_NAME, CONFIG_NAME, DENOISER_COMPONENTS, KNOWN_COMPONENTS, SAFETENSORS_NAME
from .hotswap import plan_hotswap, swap_state_dicts, unclaimed_slot
from .injection import adapter_names_in_use, inject_sara_adapter
from .resolve import resolve_adapter_folder
from .tuner.base_weight import one_merge_warning
from .tuner.config_checks import check_relative_path
from .tuner.file_format import InvalidAdapterError
from .tuner.layer import count_entries, sara_adapter_names, sara_layers
from .tuner.model import base_model_id
from .tuner.names import PREFIX
from .tuner.reader import allow_non_finite_values
from .tuner.transaction import all_or_nothing

logger = logging.getLogger(__name__)

# Components a root (single-model) adapter is loaded into, in order of preference.


def pipeline_modules(pipe: Any) -> dict[str, nn.Module]:
    """The ``nn.Module`` components of a pipeline, by name (``unet``, ``transformer``, ``text_encoder``, ...)."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        raise TypeError(f"Expected a diffusers DiffusionPipeline, got {type(pipe).__name__} (it has no `components`).")
    return {name: module for name, module in components.items() if isinstance(module, nn.Module)}


def _component_folders(folder: Path, pipe_modules: dict[str, nn.Module], components: Sequence[str] | None):
    """Map component name -> adapter folder, following the layout described in the module docstring."""
    # Only subfolders named like pipeline components count (training output folders also hold checkpoint-*/).
    component_like = set(pipe_modules) | set(components or ()) | set(KNOWN_COMPONENTS)
    found = {
        child.name: child
        for child in sorted(folder.iterdir())
        if (child / CONFIG_NAME).is_file() and child.name in component_like
    }
    if not found and (folder / CONFIG_NAME).is_file():
        wanted = list(components) if components else [name for name in DENOISER_COMPONENTS if name in pipe_modules]
        if not wanted:
            raise ValueError(
                f"'{folder}' holds a single-model adapter, which is loaded into the denoiser, but the pipeline has none "
                f"of {DENOISER_COMPONENTS}. Pass `components=[...]` to choose one of {sorted(pipe_modules)}."
            )
        if len(wanted) > 1:
            raise ValueError(
                f"'{folder}' holds a single-model adapter; pass exactly one component to load it into, got {wanted}."
            )
        found = {wanted[0]: folder}
    elif not found:
        injected = _models_saved_with_sara_layers(folder)
        if injected:
            raise FileNotFoundError(
                f"'{folder}' holds no SaRA adapter but a model saved with `save_pretrained` while an unfused SaRA "
                f"adapter was injected ({', '.join(injected)}): as with LoRA, its weights are the tuner layers' "
                "(`...base_layer.weight`, `...sara_values...`), which `from_pretrained` does not load. Save the adapter "
                "with `peft_sara.save_sara_adapter(pipe, ...)`, or a merged model with `pipe.fuse_lora(); "
                "pipe.unload_lora_weights(); pipe.save_pretrained(...)` (or `peft_sara.conversion.save_merged`)."
            )
        listing = sorted(child.name for child in folder.iterdir()) if folder.is_dir() else []
        lora_hint = (
            " This looks like a LoRA file: load it with `pipe.load_lora_weights(...)`."
            if any(name.endswith(".safetensors") for name in listing)
            else ""
        )
        raise FileNotFoundError(
            f"No '{CONFIG_NAME}' in '{folder}' or in its component subfolders (found: {listing}). A pipeline adapter "
            "has one subfolder per component (unet/, text_encoder/, ...), each with adapter_config.json and "
            f"adapter_model.safetensors.{lora_hint}"
        )

    if components:
        missing = [name for name in components if name not in found]
        if missing:
            raise ValueError(f"The adapter in '{folder}' has no weights for {missing}; it has {sorted(found)}.")
        found = {name: found[name] for name in components}
    absent = [name for name in found if name not in pipe_modules]
    if absent:
        raise ValueError(
            f"The adapter has weights for {absent}, which this pipeline does not have (its model components"
            f": {sorted(pipe_modules)}). Pass `components=[...]` to load only some of them."
        )
    return found


def _models_saved_with_sara_layers(folder: Path) -> list[str]:
    """The model weight files in ``folder`` or its subfolders (a saved pipeline) that hold SaRA layers' keys: what
    ``save_pretrained`` writes with an unfused adapter injected. Only safetensors headers are read."""
    found = []
    for path in sorted([*folder.glob("*.safetensors"), *folder.glob("*/*.safetensors")]):
        try:
            with safe_open(path, framework="pt") as handle:
                keys = list(handle.keys())
                # The base weights under `.base_layer.` beside the adapter's: a model, not an adapter file.
                if any(f".{PREFIX}" in key for key in keys) and any(".base_layer." in key for key in keys):
                    found.append(str(path.relative_to(folder)))
        except Exception:  # noqa: BLE001 - not a readable safetensors file: not what this looks for
            continue
    return found


# ------------------------------------------------------------------------------------------------- injection
def _align_text_model_prefix(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept text-encoder checkpoints written before / after transformers flattened ``CLIPTextModel.text_model``."""
    has_text_model = hasattr(module, "text_model")
    saved_with_prefix = any(key.startswith("text_model.") for key in state_dict)
    if saved_with_prefix and not has_text_model:
        return {key.removeprefix("text_model."): value for key, value in state_dict.items()}
    if has_text_model and state_dict and not saved_with_prefix and type(module).__name__.startswith("CLIPText"):
        return {f"text_model.{key}": value for key, value in state_dict.items()}
    return state_dict


# ------------------------------------------------------------------------------------------------- diffusers-style arguments
def _components_for_prefix(prefix: str | None, components: Sequence[str] | None) -> Sequence[str] | None:
    """``prefix=`` as diffusers' loaders take it: the one component to load (``"unet"``, ``"text_encoder"``, ...)."""
    if prefix is None:
        return components
    if components is not None and list(components) != [prefix]:
        raise ValueError(f"Pass either `prefix={prefix!r}` or `components={list(components)}`, not both.")
    return [prefix]


def _read_component_weights(folder: Path, weight_name: str | None) -> dict[str, torch.Tensor]:
    """The adapter tensors of one component folder, from ``weight_name`` when given (diffusers' argument)."""
    if weight_name is None or weight_name == SAFETENSORS_NAME:
        return read_adapter_weights(folder)
    check_relative_path(weight_name, "weight_name")
    path = folder / weight_name
    if not weight_name.endswith(".safetensors"):
        raise ValueError(f"`weight_name` must name a .safetensors file, got {weight_name!r}.")
    if not path.is_file():
        raise FileNotFoundError(
            f"'{folder}' has no '{weight_name}'. SaRA adapters keep their weights in '{SAFETENSORS_NAME}' next to "
            f"'{CONFIG_NAME}'; LoRA exports of them (pytorch_lora_weights.safetensors, kohya files) load with "
            "`pipe.load_lora_weights` instead."
        )
    try:
        return load_file(path, device="cpu")
    except Exception as err:  # safetensors raises its own error types for truncated / foreign files
        raise InvalidAdapterError(f"'{path}' is not a readable safetensors file: {err}") from err


def default_adapter_name(modules: Sequence[nn.Module]) -> str:
    """The name diffusers gives an adapter loaded without one (``load_lora_weights(adapter_name=None)``):
    ``default_<n>``, ``n`` the number of adapters the components already hold (an unclaimed hotswap slot, which the
    load fills, does not count), moved on while a component has that name. diffusers counts per component; counting
    over the whole pipeline keeps two unnamed loads into different components apart."""
    taken = set()
    for module in modules:
        names = adapter_names_in_use(module)
        slot = unclaimed_slot(module)
        taken |= names - ({slot.name} if slot is not None else set())
    index = len(taken)
    while f"default_{index}" in taken:
        index += 1
    return f"default_{index}"


# ------------------------------------------------------------------------------------------------- public API
def load_sara_adapter(
    pipe: Any,
    pretrained_model_name_or_path: str | os.PathLike,
    adapter_name: str | None = None,
    subfolder: str | None = None,
    components: Sequence[str] | None = None,
    fuse: bool = False,
    scale: float = 1.0,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    allow_non_finite: bool | None = None,
    weight_name: str | None = None,
    prefix: str | None = None,
    hotswap: bool = False,
) -> str:
    """Load a SaRA adapter into a diffusers pipeline's components, in place, and make it the active adapter.

    Every file is checked before it is used (``peft_sara.tuner.reader``): config, weight shapes recorded in the file
    against the pipeline's, checksums, index ranges, duplicates, non-finite values. If anything fails, the components
    are left exactly as they were.

    Args:
        pipe: A ``DiffusionPipeline`` (its ``unet`` / ``transformer`` / ``text_encoder*`` are adapted).
        pretrained_model_name_or_path: A local folder or a Hub repo id. Repo ids are resolved with
            ``huggingface_hub.snapshot_download`` (only the adapter files are fetched), which honours the cache,
            ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT``.
        adapter_name: Name of the adapter in the pipeline. Default: diffusers' ``default_<n>`` (``default_0`` for the
            first adapter), as ``load_lora_weights`` names one.
        subfolder: Folder inside the repo / folder that holds the adapter.
        components: Load only these components (default: every component the adapter has). For a single-model
            adapter at the root, the one component to load it into (default: the denoiser).
        fuse: Merge the adapter into the weights right away (undo with ``pipe.unfuse_lora()``).
        scale: Strength of the adapter (1.0 = as trained); change later with ``pipe.set_adapters``.
        revision: Branch, tag or commit of the Hub repo.
        token: Hub token for private repos.
        cache_dir: Hub cache to use instead of the default one.
        local_files_only: Only look in the Hub cache (like ``HF_HUB_OFFLINE=1``).
        allow_non_finite: Accept NaN / inf values, and values whose effective weight overflows (refused by default).
            ``None``: refused, unless inside :func:`peft_sara.allow_non_finite_values`.
        weight_name: Name of the weights file in each adapter folder, as in diffusers' ``load_lora_weights``
            (default: ``adapter_model.safetensors``, PEFT's name). Only ``.safetensors`` files.
        prefix: The one component to load, as diffusers' ``load_lora_adapter(prefix=...)`` takes it (``"unet"``,
            ``"text_encoder"``, ...); the same as ``components=[prefix]``.
        hotswap: Replace the entries of the existing adapter ``adapter_name`` in place (a slot reserved by
            :func:`peft_sara.enable_sara_hotswap`), so a compiled model keeps its graph (``peft_sara.hotswap``).
            Without it, a component holding an unclaimed slot loads into that slot all the same (diffusers' sequence:
            ``enable_sara_hotswap``, a plain first load, compile, then ``hotswap=True``).

    Returns:
        The adapter name, for ``pipe.set_adapters([...])`` and friends.

    Raises:
        FileNotFoundError: the folder / repo lacks the adapter files.
        ValueError: the adapter is not a SaRA adapter, targets a component the pipeline lacks, its name is taken, or
            its weights do not fit the model (nothing stays injected in that case). Problems of the files themselves
            raise :class:`peft_sara.InvalidAdapterError`, a ``ValueError``.
    """
    components = _components_for_prefix(prefix, components)
    pipe_modules = pipeline_modules(pipe)
    folder = resolve_adapter_folder(
        pretrained_model_name_or_path, subfolder, revision, token, cache_dir, local_files_only, weight_name
    )
    component_folders = _component_folders(folder, pipe_modules, components)
    if adapter_name is None and not hotswap:
        adapter_name = default_adapter_name(list(pipe_modules.values()))
    plan, slots = [], []
    for component, component_folder in component_folders.items():
        config = read_sara_config(component_folder)
        config.inference_mode = True
        module = pipe_modules[component]
        slot = unclaimed_slot(module)
        into_slot = hotswap or slot is not None
        taken = adapter_name in adapter_names_in_use(module) and not (slot and slot.name == adapter_name)
        if not hotswap and taken:
            raise ValueError(
                f"pipe.{component} already has an adapter named '{adapter_name}': pass another `adapter_name`, or "
                "remove it first with `pipe.delete_adapters(...)`."
            )
        state_dict = _read_component_weights(component_folder, weight_name)
        if into_slot:
            slots.append((f"pipe.{component}", module, _align_text_model_prefix(module, state_dict)))
        else:
            plan.append((component, module, config, state_dict))

    if hotswap:
        if fuse:
            raise ValueError("`hotswap=True` replaces an unfused adapter in place; fuse it afterwards if needed.")
        return swap_state_dicts(slots, adapter_name, scale, allow_non_finite)
    # A plain load into components with an unclaimed hotswap slot fills the slot (checked here, before any change).
    slot_plan = plan_hotswap(slots, adapter_name, scale, allow_non_finite)

    # Each file is read once, by the tuner's load hook (peft_sara.tuner.reader), against its component before any value
    # is written; a refusal in a later component undoes the earlier ones (all_or_nothing).
    def non_finite() -> Any:
        return allow_non_finite_values(allow_non_finite) if allow_non_finite is not None else nullcontext()

    modules = [module for _, module, *_ in plan] + [module for _, module, _ in slots]
    with slot_plan.exclusive(), non_finite(), all_or_nothing(*modules) as state:  # slots: no forward mid-write
        state.keep_values(slot_plan.tensors())
        for component, module, config, state_dict in plan:
            # The file names the entries; the transaction above covers the module.
            inject_sara_adapter(module, config, adapter_name, low_cpu_mem_usage=True, enclosing_transaction=True)
            state_dict = _align_text_model_prefix(module, state_dict)
            try:
                result = set_peft_model_state_dict(module, state_dict, adapter_name=adapter_name)
            except InvalidAdapterError as err:
                raise InvalidAdapterError(f"The adapter for pipe.{component}: {err}") from err
            except KeyError as err:  # PEFT looks modules_to_save tensors up without checking they exist
                raise InvalidAdapterError(
                    f"The adapter for pipe.{component} lacks the tensor {err} that its config asks for."
                ) from err
            unexpected = [key for key in result.unexpected_keys if PREFIX in key or adapter_name in key]
            if unexpected:
                raise InvalidAdapterError(
                    f"The adapter for pipe.{component} has {len(unexpected)} tensors that match no layer of "
                    f"{type(module).__name__}, e.g. {unexpected[:3]}. Was it made for another model?"
                )
        slot_plan.apply()
        layers = []
        if scale != 1.0 or fuse:  # (a walk over every module of the components: only when there is something to do)
            layers = [
                layer
                for module in modules
                for _, layer in sara_layers(module)
                if layer.present_adapters([adapter_name])
            ]
        for layer in layers:
            if scale != 1.0:
                layer.set_scale(adapter_name, scale)
        loaded = [component for component, *_ in plan] + [label.removeprefix("pipe.") for label, *_ in slots]
        if fuse:
            _check_fusable(pipe_modules, loaded, adapter_name)
            state.keep_values(layer.get_base_layer().weight for layer in layers)
            _fuse(pipe, loaded, layers, adapter_name)
    logger.info("Loaded SaRA adapter '%s' into %s.", adapter_name, loaded)
    return adapter_name


def _check_fusable(pipe_modules: dict[str, nn.Module], components: list[str], adapter_name: str) -> None:
    """Raise ``ValueError`` if any layer of any of ``components`` would refuse to merge ``adapter_name`` (tied weights,
    storage that cannot take a merged weight): checked for all components before the first one fuses."""
    for component in components:
        for name, layer in sara_layers(pipe_modules[component]):
            refusal = layer.merge_refusal([adapter_name], False, f"pipe.{component}.{name}")
            if refusal is not None:
                raise ValueError(f"{refusal} Nothing was loaded (`fuse=True`).")


def _fuse(pipe: Any, components: list[str], layers: list, adapter_name: str) -> None:
    """Fuse ``adapter_name`` into ``components`` through diffusers' ``pipe.fuse_lora``, which keeps its own record of
    fused adapters (``pipe.fused_loras``, ``pipe.unfuse_lora()``); layer by layer for a pipeline without LoRA API."""
    with one_merge_warning():
        if not hasattr(pipe, "fuse_lora"):
            for layer in layers:
                layer.merge(adapter_names=[adapter_name])
            return
        try:
            pipe.fuse_lora(components=components, adapter_names=[adapter_name])
        except ValueError as err:
            raise ValueError(
                f"`fuse=True` fuses with `pipe.fuse_lora(components={components})`, which refused: {err} Nothing was "
                "loaded; load without `fuse=True` and merge what you need (`peft_sara.conversion.save_merged`)."
            ) from err


def _single_adapter_name(modules: dict[str, nn.Module]) -> str:
    names = sorted({name for module in modules.values() for name in sara_adapter_names(module)})
    if len(names) != 1:
        raise ValueError(
            "Pass `adapter_name=`: the pipeline has "
            + (f"several SaRA adapters: {names}." if names else "no SaRA adapter.")
        )
    return names[0]


def save_sara_adapter(
    pipe: Any,
    save_directory: str | os.PathLike,
    adapter_name: str | None = None,
    components: Sequence[str] | None = None,
    base_model: str | None = None,
    repo_id: str | None = None,
    model_card: bool = True,
) -> Path:
    """Save a SaRA adapter of a pipeline as one subfolder per adapted component, plus a model card.

    Args:
        pipe: The ``DiffusionPipeline`` holding the adapter.
        save_directory: Folder to write (created if needed).
        adapter_name: Which adapter; may be omitted when the pipeline holds exactly one.
        components: Save only these components (default: every component that has the adapter).
        base_model: Hub id of the base pipeline, written to ``adapter_config.json`` and the card. Default: the path /
            id the pipeline was loaded from.
        repo_id: Hub repo the adapter is meant for, used in the card's usage snippet.
        model_card: Write ``README.md`` (see ``peft_sara.hub.sara_model_card``).

    Returns:
        The folder written.
    """
    pipe_modules = pipeline_modules(pipe)
    adapter_name = adapter_name or _single_adapter_name(pipe_modules)
    adapted = {name: module for name, module in pipe_modules.items() if adapter_name in sara_adapter_names(module)}
    if components is not None:
        missing = [name for name in components if name not in adapted]
        if missing:
            raise ValueError(f"SaRA adapter '{adapter_name}' is not in {missing}; it adapts {sorted(adapted)}.")
        adapted = {name: adapted[name] for name in components}
    if not adapted:
        raise ValueError(f"No component of the pipeline has a SaRA adapter named '{adapter_name}'.")

    base_model = base_model or base_model_id(pipe)
    with folder_writer(save_directory) as directory:  # every component and the card, published as one unit
        for name, module in adapted.items():
            save_injected_adapter(module, directory / name, adapter_name, base_model)
        if model_card:
            configs = {name: module.peft_config[adapter_name] for name, module in adapted.items()}
            sizes = {name: count_entries(module, adapter_name) for name, module in adapted.items()}
            card = sara_model_card(
                base_model=base_model,
                configs=configs,
                trainable_entries=sizes,
                repo_id=repo_id,
                adapter_name=adapter_name,
                pipeline_class=type(pipe).__name__,
            )
            write_text_atomic(directory / CARD_NAME, str(card))
    return Path(save_directory)


__all__ = [
    "load_sara_adapter",
    "save_sara_adapter",
    "inject_sara_adapter",
    "pipeline_modules",
]  # inject_sara_adapter: peft_sara.injection
