"""``SaRAModel``: injects SaRA layers through PEFT's ``BaseTuner`` machinery."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .base_weight import one_merge_warning
from .config import SaRAConfig
from .file_format import (
    LAYER_ENTRY_NAMES,
    PEFT_MODEL_PREFIX,
    align_checkpoint_keys,
    encode_adapter_state_dict,
    normalize_module_name,
    split_sara_key,
)
from .layer import MergeGroup, SaRALayer, dispatch_sara_layer, sara_layers
from .names import KERNELS, PREFIX, SARA_TAGS
from .reader import check_load_source, effective_weight_problem, resize_layers_to_entries, validate_checkpoint
from .targets import default_targets
from .transaction import ModelState, all_or_nothing, covered


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


def default_target_modules(model: nn.Module) -> list[str] | None:
    """SaRA's default targets for ``model``: the full names of the layers its structural rule picks (every Linear /
    Conv inside the repeated blocks, no modulation, norm or embedding; see :mod:`peft_sara.tuner.targets`), or None
    when the model has no repeated blocks."""
    return default_targets(model)


def _weight_identity(weight: torch.Tensor) -> tuple:
    """What two tied weights have in common: the same memory (device, address, shape) where the tensor owns a storage;
    the same Parameter object for tensor subclasses without one (torchao, optimum-quanto), whose ``data_ptr()`` is 0
    for every weight."""
    address = weight.data_ptr()
    if address == 0:
        return ("object", id(weight))
    return ("memory", weight.device, address, weight.shape)


def mark_tied_layers(model: nn.Module) -> dict[tuple, list[str]]:
    """Record on each SaRA layer the other SaRA layers whose base weight shares its storage (tied weights); merging
    such a layer is refused. Returns the groups of tied layer names (by storage)."""
    groups: dict[tuple, list[str]] = {}
    layers = dict(sara_layers(model))
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        if weight.device.type != "meta":
            groups.setdefault(_weight_identity(weight), []).append(name)
    for names in groups.values():
        for name in names:
            layers[name].sara_tied_layers = [other for other in names if other != name]
    group = MergeGroup(layers)  # a merge of any layer checks all of them first
    for layer in layers.values():
        layer.sara_merge_group = group
    return {key: names for key, names in groups.items() if len(names) > 1}


def modules_to_save_copies(model: nn.Module, adapter_name: str, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Exactly the tensors PEFT's ``get_peft_model_state_dict`` saves beside the SaRA entries, after the tuner's hook:
    each auxiliary wrapper's (modules_to_save) ``adapter_state_dict``."""
    copies = {}
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            name = name.removeprefix("_fsdp_wrapped_module.")
            own = {k.removeprefix(f"{name}."): v for k, v in state_dict.items() if k.startswith(f"{name}.")}
            copies.update({f"{name}.{k}": v for k, v in module.adapter_state_dict(adapter_name, own).items()})
    return copies


class SaRAModel(BaseTuner):
    """SaRA tuner: fine-tunes only the smallest-magnitude pre-trained weights, as a sparse update.

    Paper: "SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse Low-Rank Adaptation", ICLR 2025.

    Example:
        ```py
        >>> import peft_sara
        >>> from peft import get_peft_model
        >>> model = get_peft_model(unet, peft_sara.SaRAConfig(threshold=2e-3))
        >>> model.print_trainable_parameters()
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = SaRALayer
    target_module_mapping: dict[str, list[str]] = {}  # defaults come from the structural rule, not a table

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str, **kwargs: Any) -> None:
        # Adapters injected from a config read from a file, whose weights PEFT's loader has not set yet, with the state
        # of the model before their injection: a refused checkpoint undoes the injection (see
        # `_remap_adapter_state_dict_for_load`). Set before BaseTuner injects the first adapter.
        self._sara_pending_loads: dict[str, ModelState] = {}
        # Whether the injection in progress selects entries (False: a load, see `inject_adapter`).
        self._sara_select_entries = True
        # While BaseTuner's constructor injects the first adapter: a failure discards this tuner (see `inject_adapter`).
        self._sara_constructing = True
        try:
            super().__init__(model, peft_config, adapter_name, **kwargs)
        finally:
            self._sara_constructing = False

    # ----------------------------------------------------------------------------------------- injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's injection, all or nothing: if it fails on any module (a non-supported target, a merged layer), the
        model is restored exactly (modules, adapters, ``requires_grad``, tags) before the error propagates.

        An injection for a load selects nothing: the checkpoint names the entries (the load sizes the layers to them).
        That is an adapter whose config PEFT's ``from_pretrained`` / ``load_adapter`` read from the adapter's folder
        (``SaRAConfig.loaded_from``), or an injection PEFT runs with ``low_cpu_mem_usage=True`` (``inject_adapter_in_model``,
        ``add_adapter``, ``load_adapter``; PEFT's contract: the weights are replaced before use), or one whose config has
        the instance attribute ``entries_follow = True`` (the same promise where the caller cannot pass
        ``low_cpu_mem_usage``, e.g. diffusers' ``add_adapter``; ``load_sara_adapter`` and ``enable_sara_hotswap`` inject
        so). Such an adapter refuses to run until a checkpoint sets its entries.
        ``get_peft_model`` with a config built in code always selects: its entries exist right away.
        """
        config = self.peft_config.get(adapter_name)
        source = getattr(config, "loaded_from", None)
        if source is not None:  # PEFT's from_pretrained / load_adapter injects before reading the weights: check first
            check_load_source(model, config, source)
        entries_follow = kwargs.get("low_cpu_mem_usage") or getattr(config, "entries_follow", False)
        self._sara_select_entries = not (entries_follow or source is not None)
        # Inside a transaction that captured the model already (load_sara_adapter's) and lets errors through, the
        # injection needs no capture of its own, unless it must be undone later (a pending load) or this tuner
        # outlives a failure (it is not being constructed, and was not captured).
        enclosed = source is None and covered(model) and (self._sara_constructing or covered(self))
        try:
            with contextlib.nullcontext() if enclosed else all_or_nothing(self, model) as state:
                super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            self._sara_select_entries = True
        if source is not None:
            self._sara_pending_loads[adapter_name] = state
            del config.loaded_from  # a copy of this config injected elsewhere is not a pending load

    def _pre_injection_hook(self, model: nn.Module, config: SaRAConfig, adapter_name: str) -> None:
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = base_model_id(model)
        # Saved with the config (PEFT writes every field): which model, so which pipeline component, this adapts.
        config.base_model_class = type(model).__name__

    def _post_injection_hook(self, model: nn.Module, config: SaRAConfig, adapter_name: str) -> None:
        # Tagged once injected, so that a refused injection leaves the model's tags as they were.
        tags = list(getattr(model, "model_tags", None) or [])
        for tag in SARA_TAGS:
            if tag not in tags:
                tags.append(tag)
        with contextlib.suppress(AttributeError, TypeError):
            model.model_tags = tags
        mark_tied_layers(model)

    def _check_new_adapter_config(self, config: SaRAConfig) -> None:
        super()._check_new_adapter_config(config)
        # PEFT's language-model wrappers read generation methods right after injecting, out of the tuner's reach.
        if str(getattr(config, "task_type", None) or "") in ("CAUSAL_LM", "SEQ_2_SEQ_LM") and not hasattr(
            self.model, "prepare_inputs_for_generation"
        ):
            raise ValueError(
                f"The SaRA config has `task_type={config.task_type!r}`, which needs a language model, but "
                f"{type(self.model).__name__} cannot generate. Remove `task_type` from the adapter config."
            )
        # One layer runs all its active adapters through one kernel: a new adapter takes the model's (see
        # `set_sara_kernel`); only a (deprecated) explicit `SaRAConfig(kernel=...)` can disagree, and is refused.
        others = {getattr(other, "kernel", "auto") for other in self.peft_config.values() if other is not config}
        if getattr(config, "kernel", "auto") == "auto" and len(others) == 1:
            config.kernel = next(iter(others))
        kernels_in_use = sorted(others | {getattr(config, "kernel", "auto")})
        if len(kernels_in_use) > 1:
            raise ValueError(
                f"All SaRA adapters of a model must use the same `kernel`, got {kernels_in_use}. Choose it at run time "
                "for the whole model with `peft_sara.set_sara_kernel(model, kernel)` (or PEFT_SARA_KERNEL) instead."
            )

    def _prepare_adapter_config(self, peft_config: SaRAConfig, model_config: dict) -> SaRAConfig:
        if peft_config.target_modules is None:
            defaults = default_target_modules(self.model)
            if defaults is None:
                raise ValueError(
                    f"SaRA has no default `target_modules` for {type(self.model).__name__}: it has no repeated blocks "
                    "(an nn.ModuleList of layers) to adapt. Pass `target_modules` (a list of module names or "
                    "suffixes, or a regex) in SaRAConfig."
                )
            peft_config.target_modules = set(defaults)
        return peft_config

    @staticmethod
    def _create_new_module(config: SaRAConfig, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
        return dispatch_sara_layer(target, adapter_name, config, **kwargs)

    def _create_and_replace(
        self,
        config: SaRAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must be provided to create a SaRA layer.")
        select_entries = self._sara_select_entries
        if isinstance(target, SaRALayer):
            target.update_layer(adapter_name, config, select_entries=select_entries)
            return
        new_module = self._create_new_module(config, adapter_name, target, select_entries=select_entries)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(new_module, SaRALayer) and new_module.get_base_layer().weight.device.type == "meta":
            # Offloaded base (accelerate): PEFT would move the adapter to the meta device, losing its values; it stays
            # on the device its selection was read on (the hook's execution device).
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "SaRA does not support `adapter_names=` (mixed-adapter batches) yet: call `set_adapter(...)` and run "
                "one forward per adapter instead."
            )
        yield

    # ----------------------------------------------------------------------------------------- merging
    def _check_mergeable(self, adapter_names: list[str] | None, safe_merge: bool) -> None:
        """Dry run over all layers before any is merged, so a refusal leaves every weight untouched: tied layers and
        storage that cannot take a merged weight (fp8, torchao, GGUF K-quants) refuse, and with ``safe_merge`` a
        broken adapter does (non-finite, or overflowing its dtype, in any layer)."""
        for name, layer in self.sara_layers():
            names = list(adapter_names if adapter_names is not None else layer.active_adapters)
            refusal = layer.merge_refusal(names, False, name)
            if refusal is not None:
                raise ValueError(refusal + " Nothing was merged.")
            adapters = [adapter for adapter in layer.present_adapters(names) if adapter not in layer.merged_adapters]
            for adapter in adapters if safe_merge else ():
                update = layer.get_sparse_update(adapter)
                problem = effective_weight_problem(layer, update.scale, [(update.indices, update.values)])
                if problem is not None:
                    raise ValueError(
                        f"NaNs or infs detected while merging adapter '{adapter}' into layer '{name}' ({problem}): "
                        "the adapter seems to be broken. Nothing was merged."
                    )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_names, safe_merge)
        with one_merge_warning():
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self, merge=True, progressbar=False, safe_merge=False, adapter_names=None, **kwargs
    ):
        if merge:
            self._check_mergeable(adapter_names, safe_merge)
        with one_merge_warning():
            return super()._unload_and_optionally_merge(
                merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names, **kwargs
            )

    # ----------------------------------------------------------------------------------------- state dicts
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # Every save (PEFT's save_pretrained included) writes the file format of peft_sara.tuner.file_format.
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # PEFT adds the modules_to_save copies after this hook: the file's checksum covers them all the same.
        copies = modules_to_save_copies(model, adapter_name, state_dict)
        # The config written beside the weights carries the same fingerprint (SaRAConfig.to_dict): see file_format.
        fingerprint = config.settings_fingerprint() if isinstance(config, SaRAConfig) else None
        return encode_adapter_state_dict(
            model, adapter_name, selected, getattr(config, "save_dtype", None), copies, fingerprint
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # Adapters saved from a model with injected layers (diffusers' add_adapter, load_sara_adapter) have keys
        # without PEFT's "base_model.model." prefix; accept them in a PeftModel too (one spelling per tensor).
        tuner = getattr(model, "base_model", None) if isinstance(model, PeftModel) else None
        pending = tuner._sara_pending_loads.pop(adapter_name, None) if isinstance(tuner, SaRAModel) else None
        try:
            # (a parameter name starts with "base_model." only under a child of that name: no walk without one)
            prefixed = "base_model" in model._modules and any(
                name.startswith(PEFT_MODEL_PREFIX) for name, _ in model.named_parameters()
            )
            state_dict = align_checkpoint_keys(state_dict, prefixed)
            # Checked and decoded (indices back to the layers' int tensors) before anything of the model changes.
            entries, state_dict = validate_checkpoint(model, adapter_name, state_dict)
            remapped, others = _sara_model_keys(entries, adapter_name, state_dict)
            if others:  # modules_to_save copies: PEFT's mapping (built from the whole model's state dict)
                remapped.update(super()._remap_adapter_state_dict_for_load(model, config, adapter_name, others))
            resize_layers_to_entries(model, adapter_name, entries)
            return remapped
        except Exception:
            if pending is not None:  # PEFT's from_pretrained / load_adapter created this adapter: take it out again
                pending.restore()
                tuner.peft_config.pop(adapter_name, None)
            raise

    # ----------------------------------------------------------------------------------------- helpers
    def set_kernel(self, kernel: str) -> None:
        """Run every SaRA layer of the model through ``kernel`` (see :func:`set_sara_kernel`)."""
        set_sara_kernel(self.model, kernel)

    def sara_layers(self) -> Iterator[tuple[str, SaRALayer]]:
        """(name, layer) for every SaRA layer of the model."""
        return sara_layers(self.model)


def _sara_model_keys(
    entries: dict[str, Any], adapter_name: str, state_dict: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The validated SaRA tensors under the keys the model's state dict has for them (``<layer>.<tensor>.<adapter>``,
    the layer's name in the model: what PEFT's remap maps them to), and the other tensors, unmapped. Built from the
    validated layers, without PEFT's walk over the whole model's state dict."""
    layers = {normalize_module_name(name): name for name in entries}
    mapped, others = {}, {}
    for key, value in state_dict.items():
        split = split_sara_key(key)
        if split is not None and split[0] in layers and split[1] in LAYER_ENTRY_NAMES:
            mapped[f"{layers[split[0]]}.{split[1]}.{adapter_name}"] = value
        else:
            others[key] = value
    return mapped, others


def set_sara_kernel(model: nn.Module, kernel: str) -> None:
    """Choose the masked-weight kernel of every SaRA layer of ``model`` (a ``PeftModel``, or a model with injected
    adapters), for every adapter: ``"auto"`` (Triton on CUDA when it imports, PyTorch elsewhere), ``"triton"`` or
    ``"reference"``. A runtime choice, never saved with the adapter; ``PEFT_SARA_KERNEL`` overrides it."""
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}, got {kernel!r}.")
    for _, layer in sara_layers(model):
        for adapter_name in layer.sara_kernel:
            layer.sara_kernel[adapter_name] = kernel
    for config in (getattr(model, "peft_config", None) or {}).values():
        if isinstance(config, SaRAConfig):
            config.kernel = kernel  # adapters added later start with it too


__all__ = ["SaRAModel", "set_sara_kernel", "base_model_id", "default_target_modules", "mark_tied_layers"]
