"""Hotswapping SaRA adapters: replace an adapter's entries in place, so a compiled model keeps its graph.

As diffusers does for LoRA (``enable_lora_hotswap(target_rank=...)`` then ``load_lora_weights(..., hotswap=True)``)::

    peft_sara.enable_sara_hotswap(pipe, max_fraction=0.1, target_modules=[...])   # before the first load
    pipe.unet = torch.compile(pipe.unet, fullgraph=True)
    peft_sara.load_sara_adapter(pipe, "adapter_a", adapter_name="default", hotswap=True)
    peft_sara.load_sara_adapter(pipe, "adapter_b", adapter_name="default", hotswap=True)   # no recompile

:func:`enable_sara_hotswap` injects an inert adapter slot into every layer an adapter may touch, with a fixed capacity
of ``ceil(max_fraction * numel)`` entries per layer (a compiled graph bakes the sizes of the values Parameter and the
index buffer in). A swap writes the new adapter's entries into that capacity in place: same tensors, same shapes, the
live count and scale as 0-d tensors, the frozen entries in the layer's dynamic-size buffers. Layers the new adapter
does not touch get an inert (zero) update. Nothing changes before every file has been checked against every layer;
an adapter that does not fit raises an error naming the layer, and leaves the current adapter as it was.

Concurrency: every forward of a module holding a slot takes a shared lock (a forward pre-hook and an always-called
forward hook), and a swap writes under the exclusive side: a swap waits for the forwards in flight and new forwards
wait for the swap, so each forward computes with one adapter whole (checking the files happens before, outside the
lock). Inside a compiled graph the hooks do nothing: around a compiled model, or to keep one adapter over a whole
multi-step generation, hold :func:`hotswap_guard` (the shared side) yourself.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer, cast_adapter_dtype
from torch import nn

from .adapter_files import read_adapter_weights, read_sara_config
from .checkpoint_checks import LayerEntries, check_checkpoint_file, check_layer_checkpoint, non_finite_allowed
from .file_format import InvalidAdapterError, normalize_module_name
from .resolve import resolve_adapter_folder
from .save_bridge import install_save_bridge
from .transaction import all_or_nothing
from .tuner.config import SaRAConfig
from .tuner.layer import SaRALayer, sara_layers

# Pipeline components a slot goes into when `components` is not given (the first one the pipeline has).
DENOISERS = ("unet", "transformer", "prior", "decoder")


def _unwrap(module: nn.Module) -> nn.Module:
    """The model behind a ``torch.compile`` wrapper (its layers are the compiled model's)."""
    return getattr(module, "_orig_mod", module)


def _targets(pipe_or_model: Any, components: Sequence[str] | None) -> dict[str, nn.Module]:
    """``{label: module}``: the chosen components of a pipeline, or the model itself."""
    if isinstance(pipe_or_model, nn.Module):
        if components is not None:
            raise ValueError("`components` applies to pipelines only; pass the model alone.")
        return {type(_unwrap(pipe_or_model)).__name__: _unwrap(pipe_or_model)}
    modules = {
        name: module
        for name, module in getattr(pipe_or_model, "components", {}).items()
        if isinstance(module, nn.Module)
    }
    if not modules:
        raise TypeError(f"Expected a diffusers pipeline or an nn.Module, got {type(pipe_or_model).__name__}.")
    names = list(components) if components else [name for name in DENOISERS if name in modules][:1]
    missing = [name for name in names if name not in modules]
    if missing or not names:
        raise ValueError(f"The pipeline has no component {missing or list(DENOISERS)}; it has {sorted(modules)}.")
    return {f"pipe.{name}": _unwrap(modules[name]) for name in names}


class ForwardLock:
    """Readers / writer lock of a module with a hotswap slot: forwards share it, a swap holds it alone (writers first,
    so a stream of forwards cannot starve a swap). Re-entrant for a thread's nested forwards; a thread that holds the
    shared side and asks for the exclusive one is refused (it would wait for itself)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._local = threading.local()

    def _held(self) -> int:
        return getattr(self._local, "depth", 0)

    def acquire_shared(self) -> None:
        depth = self._held()
        if depth == 0:
            with self._condition:
                while self._writer or self._waiting_writers:
                    self._condition.wait()
                self._readers += 1
        self._local.depth = depth + 1

    def release_shared(self) -> None:
        depth = self._held()
        if depth == 0:  # an always-called hook after a pre-hook that never ran
            return
        self._local.depth = depth - 1
        if depth == 1:
            with self._condition:
                self._readers -= 1
                if self._readers == 0:
                    self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        if self._held():
            raise RuntimeError(
                "This thread is inside a forward (or a `hotswap_guard`) of the model it hotswaps: the swap would wait "
                "for itself. Hotswap between calls."
            )
        with self._condition:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._condition.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._condition:
                self._writer = False
                self._condition.notify_all()

    def __deepcopy__(self, memo: dict) -> ForwardLock:  # a copied model gets its own, free lock
        return ForwardLock()

    def __reduce__(self):
        return (ForwardLock, ())


FORWARD_LOCK = "sara_forward_lock"


def _enter_forward(module: nn.Module, args: Any) -> None:
    if not torch.compiler.is_compiling():
        module.__dict__[FORWARD_LOCK].acquire_shared()


def _leave_forward(module: nn.Module, args: Any, output: Any) -> None:
    if not torch.compiler.is_compiling():
        module.__dict__[FORWARD_LOCK].release_shared()


def _install_forward_lock(module: nn.Module) -> None:
    if FORWARD_LOCK in module.__dict__:
        return
    module.__dict__[FORWARD_LOCK] = ForwardLock()
    module.register_forward_pre_hook(_enter_forward)
    module.register_forward_hook(_leave_forward, always_call=True)


def _locks(modules: Sequence[nn.Module]) -> list[ForwardLock]:
    locks = {id(lock): lock for module in modules if (lock := module.__dict__.get(FORWARD_LOCK)) is not None}
    return [locks[key] for key in sorted(locks)]  # one order for every thread: no lock-order deadlock


@contextlib.contextmanager
def hotswap_guard(pipe_or_model: Any, components: Sequence[str] | None = None) -> Iterator[None]:
    """Hold the shared side of the hotswap lock of every module with a slot: no swap happens inside the block.

    Forwards of an eager module take it by themselves; hold it around calls of a compiled model (the hooks do nothing
    inside a graph), or around a whole multi-step generation so that all its steps use one adapter::

        with peft_sara.hotswap.hotswap_guard(pipe):
            image = pipe(prompt).images[0]
    """
    modules = list(_targets(pipe_or_model, components).values()) if components else _all_modules(pipe_or_model)
    locks = _locks(modules)
    taken = []
    try:
        for lock in locks:
            lock.acquire_shared()
            taken.append(lock)
        yield
    finally:
        for lock in reversed(taken):
            lock.release_shared()


def _all_modules(pipe_or_model: Any) -> list[nn.Module]:
    if isinstance(pipe_or_model, nn.Module):
        return [_unwrap(pipe_or_model)]
    return [module for module in getattr(pipe_or_model, "components", {}).values() if isinstance(module, nn.Module)]


def _slot_layers(module: nn.Module, adapter_name: str) -> dict[str, SaRALayer]:
    """The layers holding ``adapter_name``, by name as checkpoints spell it."""
    return {
        normalize_module_name(name): layer
        for name, layer in sara_layers(module)
        if layer.present_adapters([adapter_name])
    }


def _inject_slot(module: nn.Module, config: SaRAConfig, adapter_name: str) -> None:
    # low_cpu_mem_usage: the slot's entries are set right after (no selection to throw away)
    if isinstance(module, PeftModel):
        module.add_adapter(adapter_name, config, low_cpu_mem_usage=True)
        module.set_adapter(adapter_name)
        return
    inject_adapter_in_model(config, module, adapter_name, low_cpu_mem_usage=True)
    cast_adapter_dtype(module, adapter_name)
    module._hf_peft_config_loaded = True  # diffusers' and transformers' adapter API then drive it
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.set_adapter([adapter_name], inference_mode=True)
    install_save_bridge(module)


def enable_sara_hotswap(
    pipe_or_model: Any,
    max_fraction: float,
    target_modules: list[str] | str | None = None,
    adapter_name: str = "default",
    components: Sequence[str] | None = None,
    exclude_modules: list[str] | str | None = None,
) -> dict[str, int]:
    """Reserve a fixed-capacity, inert SaRA adapter slot for hotswapping, before the first load and before compiling.

    Every layer matched by ``target_modules`` (``SaRAConfig``'s default when ``None``) gets an adapter
    ``adapter_name`` with room for ``ceil(max_fraction * numel)`` entries and no live entry (its output is the base
    layer's). Later loads with ``hotswap=True`` (:func:`peft_sara.load_sara_adapter`, :func:`hotswap_adapter`) write
    into it in place. Choose ``max_fraction`` at least the largest trainable fraction of the adapters to serve, and
    ``target_modules`` covering every layer any of them adapts.

    Args:
        pipe_or_model: A diffusers pipeline, a model (a ``ModelMixin``, any ``nn.Module``) or a ``PeftModel``.
        max_fraction: Capacity per layer, as a fraction of its weight's entries (0 < max_fraction <= 1).
        target_modules: Layers to reserve (names, suffixes or a regex, as in ``SaRAConfig``).
        adapter_name: Name of the slot; pass it as ``adapter_name`` to the hotswapping loads.
        components: Pipeline components to reserve in (default: the denoiser, ``unet`` / ``transformer``).
        exclude_modules: Layers never to reserve (as in ``SaRAConfig``).

    Returns:
        ``{label: total reserved entries}`` per component (``pipe.unet``) or model (its class name).
    """
    if not 0 < max_fraction <= 1:
        raise ValueError(f"`max_fraction` must be in (0, 1], got {max_fraction}.")
    reserved = {}
    targets = _targets(pipe_or_model, components)
    with all_or_nothing(*targets.values()):  # a refusal in a later component leaves the earlier ones as they were
        _enable_slots(targets, max_fraction, target_modules, adapter_name, exclude_modules, reserved)
    return reserved


def _enable_slots(targets, max_fraction, target_modules, adapter_name, exclude_modules, reserved) -> None:
    for label, module in targets.items():
        if adapter_name in (getattr(module, "peft_config", None) or {}):
            raise ValueError(
                f"{label} already has an adapter named '{adapter_name}': enable hotswap before the first load, or "
                "pick another `adapter_name` for the slot."
            )
        config = SaRAConfig(
            target_modules=target_modules,
            exclude_modules=exclude_modules,
            trainable_fraction=max_fraction,
            init_weights=True,
            inference_mode=True,
        )
        _inject_slot(module, config, adapter_name)
        _install_forward_lock(module)
        total = 0
        for _, layer in _slot_layers(module, adapter_name).items():
            numel = layer.weight_shape.numel()
            capacity = max(math.ceil(max_fraction * numel), layer.sara_values[adapter_name].shape[0])
            reference = layer.sara_indices[adapter_name]
            # Grow to the capacity (unique in-range placeholder indices), then empty it: zero values, no live entry.
            layer.set_trainable_entries(adapter_name, torch.arange(capacity, device=reference.device))
            empty = reference.new_zeros(0)
            values = layer.sara_values[adapter_name].detach().new_zeros(0)
            layer.set_trainable_entries(adapter_name, empty, values, empty, values)
            total += capacity
        reserved[label] = total


@dataclass
class _Swap:
    layer: SaRALayer
    entries: LayerEntries | None  # None: the new adapter does not touch this layer (inert update)


def _plan_swaps(
    label: str, module: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str, allow_non_finite: bool
) -> list[_Swap]:
    """Check a checkpoint against the slot of ``module`` and return what to write; change nothing."""
    slots = _slot_layers(module, adapter_name)
    if not slots:
        raise ValueError(
            f"{label} has no SaRA adapter '{adapter_name}' to hotswap into. Call "
            f"`peft_sara.enable_sara_hotswap(..., adapter_name='{adapter_name}')` before the first load (or load "
            "without `hotswap=True`)."
        )
    merged = [name for name, layer in slots.items() if layer.merged]
    if merged:
        raise ValueError(f"{label}: unfuse / unmerge the adapters before hotswapping (e.g. '{merged[0]}' is merged).")
    parsed, _ = check_checkpoint_file(state_dict, allow_non_finite)
    if parsed.other_keys:
        raise InvalidAdapterError(
            f"The adapter for {label} also holds full modules (modules_to_save, e.g. '{parsed.other_keys[0]}'): "
            "hotswap replaces SaRA entries only. Load it without `hotswap=True`."
        )
    entries = {}
    for layer_name, checkpoint in parsed.layers.items():
        layer = slots.get(layer_name)
        if layer is None:
            raise ValueError(
                f"The adapter for {label} adapts layer '{layer_name}', which has no hotswap slot: "
                "`enable_sara_hotswap` reserved only the layers its `target_modules` matched. Include this layer "
                "there (before compiling), or load the adapter without `hotswap=True`."
            )
        param = layer.sara_values[adapter_name]
        layer_entries = check_layer_checkpoint(
            layer_name,
            checkpoint,
            tuple(layer.weight_shape),
            param.dtype,
            allow_non_finite=allow_non_finite,
        )
        count, capacity, numel = layer_entries.indices.numel(), param.shape[0], layer.weight_shape.numel()
        if count > capacity:
            raise ValueError(
                f"The adapter for {label} does not fit the hotswap slot of layer '{layer_name}': it has {count} "
                f"trainable entries ({count / numel:.4f} of the weight), the slot holds {capacity}. Call "
                f"`enable_sara_hotswap` with `max_fraction >= {count / numel:.4f}` (before compiling)."
            )
        entries[layer_name] = layer_entries
    return [_Swap(layer, entries.get(name)) for name, layer in slots.items()]


def _write(swap: _Swap, adapter_name: str, scale: float) -> None:
    layer = swap.layer
    if swap.entries is None:
        empty = layer.sara_indices[adapter_name].new_zeros(0)
        values = layer.sara_values[adapter_name].detach().new_zeros(0)
        layer.set_trainable_entries(adapter_name, empty, values, empty, values)
    else:
        e = swap.entries
        layer.set_trainable_entries(adapter_name, e.indices, e.values, e.frozen_indices, e.frozen_values)
    layer.set_scale(adapter_name, scale)


def swap_state_dicts(
    targets: Sequence[tuple[str, nn.Module, dict[str, torch.Tensor]]],
    adapter_name: str,
    scale: float = 1.0,
    allow_non_finite: bool | None = None,
) -> None:
    """Hotswap ``adapter_name`` of each ``(label, module, checkpoint)`` in place, all or nothing.

    Every checkpoint is validated against its module's slot first (files, shapes, capacity, target layers); only then
    are entries written, into the existing tensors. Used by ``load_sara_adapter(..., hotswap=True)``.
    """
    allow_non_finite = non_finite_allowed() if allow_non_finite is None else allow_non_finite
    plans = [
        (_unwrap(module), _plan_swaps(label, _unwrap(module), sd, adapter_name, allow_non_finite))
        for label, module, sd in targets
    ]
    modules = [module for module, _ in plans]
    with contextlib.ExitStack() as stack:
        for lock in _locks(modules):  # wait for the forwards in flight; new ones wait for the swap
            stack.enter_context(lock.exclusive())
        _write_all(plans, modules, adapter_name, scale)


def _write_all(plans, modules, adapter_name: str, scale: float) -> None:
    with torch.no_grad(), all_or_nothing(*modules) as state:
        for _, swaps in plans:
            state.keep_values(
                tensor
                for swap in swaps
                for tensor in (
                    swap.layer.sara_values[adapter_name],
                    swap.layer.sara_indices[adapter_name],
                    swap.layer.sara_live_count[adapter_name],
                    swap.layer.sara_scale[adapter_name],
                )
            )
        for _, swaps in plans:
            for swap in swaps:
                _write(swap, adapter_name, scale)


def hotswap_adapter(
    model: nn.Module,
    model_id: str | os.PathLike,
    adapter_name: str = "default",
    scale: float = 1.0,
    allow_non_finite: bool | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> str:
    """Hotswap the SaRA adapter ``adapter_name`` of a ``PeftModel`` (or of a model with a slot from
    :func:`enable_sara_hotswap`) for the adapter saved at ``model_id`` (a folder or Hub repo written by
    ``save_pretrained``), in place: a compiled model keeps its graph. Transactional: a refused file changes nothing.

    The adapter slot keeps its config (``peft_config[adapter_name]`` still describes the reserved layers). Returns
    ``adapter_name``.
    """
    folder = Path(resolve_adapter_folder(model_id, subfolder, revision, token, None, local_files_only, None))
    read_sara_config(folder)  # a SaRA adapter at all (a clear error for LoRA and foreign configs)
    state_dict = read_adapter_weights(folder)
    swap_state_dicts([(type(_unwrap(model)).__name__, model, state_dict)], adapter_name, scale, allow_non_finite)
    return adapter_name


__all__ = ["ForwardLock", "enable_sara_hotswap", "hotswap_adapter", "hotswap_guard", "swap_state_dicts"]
