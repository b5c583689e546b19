"""Hotswapping SaRA adapters: replace an adapter's entries in place, so a compiled model keeps its graph.

diffusers' LoRA sequence, transcribed (``enable_lora_hotswap(target_rank=...)``, a plain first load, compile, then
loads with ``hotswap=True``)::

    peft_sara.enable_sara_hotswap(pipe, max_fraction=0.1, target_modules=[...])   # before the first load
    peft_sara.load_sara_adapter(pipe, "adapter_a", adapter_name="style")          # loads into the reserved slot
    pipe.unet = torch.compile(pipe.unet, fullgraph=True)
    peft_sara.load_sara_adapter(pipe, "adapter_b", adapter_name="style", hotswap=True)   # no recompile

Compiling before the first load works too, when every load names the slot as :func:`enable_sara_hotswap` did
(``adapter_name="default"`` unless given there)::

    peft_sara.enable_sara_hotswap(pipe, max_fraction=0.1, target_modules=[...])
    pipe.unet = torch.compile(pipe.unet, fullgraph=True)
    peft_sara.load_sara_adapter(pipe, "adapter_a", adapter_name="default", hotswap=True)

:func:`enable_sara_hotswap` injects an inert adapter slot into every layer an adapter may touch, with a fixed capacity
of ``ceil(max_fraction * numel)`` entries per layer (a compiled graph bakes the sizes of the values Parameter and the
index buffer in); :func:`hotswap_sizing` reads adapter files and says which ``max_fraction`` and layers they need. The
first load into the component, plain or ``hotswap=True``, claims the slot: it takes that load's adapter name (a rename,
done before compiling in diffusers' sequence) and its entries. A swap writes the new adapter's entries into that
capacity in place: same tensors, same shapes, the live count and scale as 0-d tensors, the frozen entries in the
layer's dynamic-size buffers. Layers the new adapter does not touch get an inert (zero) update. Nothing changes before
every file has been checked against every layer; an adapter that does not fit raises an error naming the layer, and
leaves the current adapter as it was.

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
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .adapter_files import read_adapter_weights, read_sara_config
from .constants import CONFIG_NAME
from .injection import inject_sara_adapter
from .resolve import resolve_adapter_folder
from .tuner.config import SaRAConfig
from .tuner.file_format import InvalidAdapterError, normalize_module_name, parse_checkpoint
from .tuner.layer import SaRALayer, sara_layers
from .tuner.reader import (
    LayerChecksums,
    LayerEntries,
    SlotTooSmall,
    check_checkpoint_file,
    check_other_checksum,
    non_finite_allowed,
    read_layer,
)
from .tuner.transaction import all_or_nothing

# Pipeline components a slot goes into when `components` is not given (the first one the pipeline has).
DENOISERS = ("unet", "transformer", "prior", "decoder")
# Name of the slot when `enable_sara_hotswap` is given none (the first load renames it to its own adapter name).
DEFAULT_SLOT_NAME = "default"
# Where a component keeps its slot (as diffusers keeps `_prepare_lora_hotswap_kwargs` on the model).
SLOT_ATTRIBUTE = "_sara_hotswap_slot"


def _unwrap(module: nn.Module) -> nn.Module:
    """The model behind a ``torch.compile`` wrapper (its layers are the compiled model's)."""
    return getattr(module, "_orig_mod", module)


@dataclass
class HotswapSlot:
    """The hotswap slot a component holds: the adapter name it goes by, its capacity as a fraction of each reserved
    weight, and whether a load has claimed it yet (an unclaimed slot takes the name of the first load into it)."""

    name: str
    max_fraction: float
    claimed: bool = False


def hotswap_slot(module: nn.Module) -> HotswapSlot | None:
    """The slot :func:`enable_sara_hotswap` reserved in ``module`` (a pipeline component or model), if any (a slot
    whose adapter was deleted since, e.g. by ``pipe.unload_lora_weights()``, is gone)."""
    module = _unwrap(module)
    slot = module.__dict__.get(SLOT_ATTRIBUTE)
    alive = isinstance(slot, HotswapSlot) and slot.name in (getattr(module, "peft_config", None) or {})
    return slot if alive else None


def unclaimed_slot(module: nn.Module) -> HotswapSlot | None:
    """The slot of ``module`` if no load has claimed it yet: the next load into ``module`` goes into it."""
    slot = hotswap_slot(module)
    return slot if slot is not None and not slot.claimed else None


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
    inject_sara_adapter(module, config, adapter_name, low_cpu_mem_usage=True)  # diffusers' and PEFT's public API


def enable_sara_hotswap(
    pipe_or_model: Any,
    max_fraction: float,
    target_modules: list[str] | str | None = None,
    adapter_name: str | None = None,
    components: Sequence[str] | None = None,
    exclude_modules: list[str] | str | None = None,
) -> dict[str, int]:
    """Reserve a fixed-capacity, inert SaRA adapter slot for hotswapping, before the first load and before compiling.

    Every layer matched by ``target_modules`` (``SaRAConfig``'s default when ``None``) gets room for
    ``ceil(max_fraction * numel)`` entries and no live entry (its output is the base layer's). The first load into the
    component (:func:`peft_sara.load_sara_adapter`, plain as in diffusers' LoRA sequence, or with ``hotswap=True``)
    writes into the slot and names it; later loads with ``hotswap=True`` (and :func:`hotswap_adapter`) replace its
    entries in place. Choose ``max_fraction`` at least the largest trainable fraction of the adapters to serve, and
    ``target_modules`` covering every layer any of them adapts: :func:`hotswap_sizing` (``peft-sara inspect A B C``)
    reads both from the adapter files.

    Args:
        pipe_or_model: A diffusers pipeline, a model (a ``ModelMixin``, any ``nn.Module``) or a ``PeftModel``.
        max_fraction: Capacity per layer, as a fraction of its weight's entries (0 < max_fraction <= 1).
        target_modules: Layers to reserve (names, suffixes or a regex, as in ``SaRAConfig``).
        adapter_name: Name of the slot until a load names it (default ``"default"``). Loads that compile first and
            hotswap afterwards pass this name, so that no rename happens after compiling.
        components: Pipeline components to reserve in (default: the denoiser, ``unet`` / ``transformer``).
        exclude_modules: Layers never to reserve (as in ``SaRAConfig``).

    Returns:
        ``{label: total reserved entries}`` per component (``pipe.unet``) or model (its class name).
    """
    if not 0 < max_fraction <= 1:
        raise ValueError(f"`max_fraction` must be in (0, 1], got {max_fraction}.")
    adapter_name = adapter_name or DEFAULT_SLOT_NAME
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
        if hotswap_slot(module) is not None:
            raise ValueError(f"{label} already has a hotswap slot ('{hotswap_slot(module).name}'); one per component.")
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
        module.__dict__[SLOT_ATTRIBUTE] = HotswapSlot(adapter_name, max_fraction)
        reserved[label] = total


def _rename_adapter(module: nn.Module, old: str, new: str) -> None:
    """Rename adapter ``old`` of ``module`` (a pipeline component with injected layers) to ``new``, through PEFT's
    per-adapter attribute protocol (``adapter_layer_names`` + ``other_param_names``): same tensors, new key."""
    for layer in module.modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        if isinstance(layer, SaRALayer) and old in layer.sara_values:
            for attribute in (*layer.adapter_layer_names, *layer.other_param_names):
                container = getattr(layer, attribute)
                if old in container:
                    container[new] = container[old]
                    del container[old]
        active = layer._active_adapter
        if isinstance(active, str):
            layer._active_adapter = new if active == old else active
        else:
            layer._active_adapter = [new if name == old else name for name in active]
    configs = module.peft_config
    configs[new] = configs.pop(old)


@dataclass
class _Swap:
    layer: SaRALayer
    entries: LayerEntries | None  # None: the new adapter does not touch this layer (inert update)


def _plan_swaps(
    label: str,
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    allow_non_finite: bool,
    scale: float = 1.0,
) -> list[_Swap]:
    """Read a checkpoint against the slot of ``module`` with the one reader, each layer once (form, checksum, shapes,
    layouts, the slot's capacity for trainable and frozen entries, finiteness and the effective weight at ``scale``)
    and return what to write; change nothing."""
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
    parsed = parse_checkpoint(state_dict)
    if parsed.other_keys:
        raise InvalidAdapterError(
            f"The adapter for {label} also holds full modules (modules_to_save, e.g. '{parsed.other_keys[0]}'): "
            "hotswap replaces SaRA entries only. Load it without `hotswap=True`."
        )
    check_other_checksum(state_dict, parsed, None)
    unknown = sorted(set(parsed.layers) - set(slots))
    if unknown:
        raise ValueError(
            f"The adapter for {label} adapts layer '{unknown[0]}', which has no hotswap slot: "
            "`enable_sara_hotswap` reserved only the layers its `target_modules` matched. Include this layer "
            "there (before compiling), or load the adapter without `hotswap=True`."
        )
    entries = {}
    with LayerChecksums(parsed.layers) as checksums:
        for layer_name, checkpoint in parsed.layers.items():
            layer = slots[layer_name]
            param = layer.sara_values[adapter_name]
            capacity, numel = param.shape[0], layer.weight_shape.numel()
            try:
                entries[layer_name] = read_layer(
                    layer_name,
                    checkpoint,
                    allow_non_finite,
                    parsed.version,
                    layer=layer,
                    value_dtype=param.dtype,
                    scale=scale,
                    capacity=capacity,
                    checksums=checksums,
                )
            except SlotTooSmall as err:
                names = ("sara_values", "sara_frozen_values")
                count = sum(tensor.numel() for name, tensor in checkpoint.tensors.items() if name in names)
                raise ValueError(
                    f"The adapter for {label} does not fit the hotswap slot of layer '{layer_name}': it has {count} "
                    f"entries, trainable and frozen ({count / numel:.4f} of the weight), the slot holds {capacity}. Call "
                    f"`enable_sara_hotswap` with `max_fraction >= {math.ceil(count / numel * 1e4) / 1e4:.4f}` (before "
                    "compiling; `peft-sara inspect ADAPTER...` sizes a slot for a set of adapters)."
                ) from err
    return [_Swap(layer, entries.get(name)) for name, layer in slots.items()]


def _write(swap: _Swap, adapter_name: str, scale: float) -> None:
    layer = swap.layer
    if swap.entries is None:
        empty = layer.sara_indices[adapter_name].new_zeros(0)
        values = layer.sara_values[adapter_name].detach().new_zeros(0)
        layer.set_trainable_entries(adapter_name, empty, values, empty, values)
    else:
        e = swap.entries
        layer.set_trainable_entries(adapter_name, e.indices, e.values, e.frozen_indices, e.frozen_values, checked=True)
    layer.set_scale(adapter_name, scale)


def _slot_name(label: str, module: nn.Module, adapter_name: str | None) -> str:
    """The adapter of ``module`` a hotswap of ``adapter_name`` writes into: that adapter if it exists, else the
    component's unclaimed slot (renamed to ``adapter_name`` when the swap is applied)."""
    existing = getattr(module, "peft_config", None) or {}
    slot = hotswap_slot(module)
    if adapter_name is None:
        if slot is None:
            raise ValueError(f"Pass `adapter_name=` to hotswap: {label} has no hotswap slot to default to.")
        return slot.name
    if adapter_name in existing:
        return adapter_name
    return slot.name if slot is not None and not slot.claimed else adapter_name


@dataclass
class HotswapPlan:
    """Checked swaps for one or more components, applied by :meth:`apply` (see :func:`plan_hotswap`)."""

    adapter_name: str | None
    scale: float
    components: list[tuple[nn.Module, str, list[_Swap]]]  # (module, its slot's current name, swaps)

    def modules(self) -> list[nn.Module]:
        return [module for module, _, _ in self.components]

    def renames(self) -> bool:
        """Whether :meth:`apply` renames a slot (the first load into it under another name)."""
        return any((self.adapter_name or slot_name) != slot_name for _, slot_name, _ in self.components)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the exclusive side of the forward locks of the modules :meth:`apply` writes: wait for the forwards in
        flight; new ones wait for the swap."""
        with contextlib.ExitStack() as stack:
            for lock in _locks(self.modules()):
                stack.enter_context(lock.exclusive())
            yield

    def tensors(self) -> list[torch.Tensor]:
        """The tensors :meth:`apply` writes into (for ``all_or_nothing``'s ``keep_values``)."""
        return [
            tensor
            for _, slot_name, swaps in self.components
            for swap in swaps
            for tensor in (
                swap.layer.sara_values[slot_name],
                swap.layer.sara_indices[slot_name],
                swap.layer.sara_live_count[slot_name],
                swap.layer.sara_scale[slot_name],
            )
        ]

    @torch.no_grad()
    def apply(self) -> None:
        """Claim (and rename) unclaimed slots, then write every swap in place. Run inside ``all_or_nothing``."""
        for module, slot_name, swaps in self.components:
            name = self.adapter_name or slot_name
            slot = hotswap_slot(module)
            if name != slot_name:
                _rename_adapter(module, slot_name, name)
            for swap in swaps:
                _write(swap, name, self.scale)
            if isinstance(slot, HotswapSlot) and slot.name == slot_name:  # claimed once every entry is written
                module.__dict__[SLOT_ATTRIBUTE] = HotswapSlot(name, slot.max_fraction, claimed=True)


def plan_hotswap(
    targets: Sequence[tuple[str, nn.Module, dict[str, torch.Tensor]]],
    adapter_name: str | None,
    scale: float = 1.0,
    allow_non_finite: bool | None = None,
) -> HotswapPlan:
    """Check each ``(label, module, checkpoint)`` against the slot it would go into (files, shapes, capacity, target
    layers) and return the plan; nothing changes. ``adapter_name=None`` swaps into each component's slot, whatever
    its name."""
    allow_non_finite = non_finite_allowed() if allow_non_finite is None else allow_non_finite
    components = []
    for label, module, state_dict in targets:
        module = _unwrap(module)
        slot_name = _slot_name(label, module, adapter_name)
        if adapter_name is not None and slot_name != adapter_name and isinstance(module, PeftModel):
            raise ValueError(
                f"The hotswap slot of {label} is named '{slot_name}': pass `adapter_name='{slot_name}'` (the adapters "
                "of a PeftModel are not renamed)."
            )
        swaps = _plan_swaps(label, module, state_dict, slot_name, allow_non_finite, scale)
        components.append((module, slot_name, swaps))
    return HotswapPlan(adapter_name, scale, components)


def swap_state_dicts(
    targets: Sequence[tuple[str, nn.Module, dict[str, torch.Tensor]]],
    adapter_name: str | None,
    scale: float = 1.0,
    allow_non_finite: bool | None = None,
) -> str:
    """Hotswap ``adapter_name`` of each ``(label, module, checkpoint)`` in place, all or nothing.

    Every checkpoint is validated against its module's slot first (files, shapes, capacity, target layers); only then
    are entries written, into the existing tensors. An unclaimed slot is claimed and takes the name ``adapter_name``.
    Used by ``load_sara_adapter(..., hotswap=True)``. Returns the adapter name.
    """
    plan = plan_hotswap(targets, adapter_name, scale, allow_non_finite)
    with plan.exclusive(), torch.no_grad():
        if plan.renames():  # a rename touches every tuner layer of the component: the whole component is kept
            with all_or_nothing(*plan.modules()) as state:
                state.keep_values(plan.tensors())
                plan.apply()
        else:  # only the slots' entries and scales change: each layer keeps what it needs to undo the write
            _apply_undoable(plan)
    return adapter_name or plan.components[0][1]


def _apply_undoable(plan: HotswapPlan) -> None:
    """:meth:`HotswapPlan.apply` without a rename, all or nothing: a failure puts back every slot's entries (copies of
    the live entries it held: nothing for an empty slot) before it propagates."""
    snapshots = [
        (swap.layer, swap.layer.snapshot_entries(slot_name))
        for _, slot_name, swaps in plan.components
        for swap in swaps
    ]
    try:
        plan.apply()
    except BaseException:
        for layer, snapshot in snapshots:
            layer.restore_entries(snapshot)
        raise


def hotswap_adapter(
    model: nn.Module,
    model_id: str | os.PathLike,
    adapter_name: str | None = None,
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

    ``adapter_name=None``: the slot of :func:`enable_sara_hotswap` (whatever its name), else ``"default"``. The adapter
    slot keeps its config (``peft_config[adapter_name]`` still describes the reserved layers). Returns the adapter
    name.
    """
    if adapter_name is None and hotswap_slot(model) is None:
        adapter_name = "default"
    folder = Path(resolve_adapter_folder(model_id, subfolder, revision, token, None, local_files_only, None))
    read_sara_config(folder)  # a SaRA adapter at all (a clear error for LoRA and foreign configs)
    state_dict = read_adapter_weights(folder)
    return swap_state_dicts([(type(_unwrap(model)).__name__, model, state_dict)], adapter_name, scale, allow_non_finite)


@dataclass
class HotswapSizing:
    """What :func:`enable_sara_hotswap` needs to serve a set of adapters (see :func:`hotswap_sizing`)."""

    max_fraction: float  # the smallest `max_fraction` whose slot fits every layer of every adapter
    largest: tuple[str, str, str] | None  # (adapter, component, layer) that fraction comes from
    layers: dict[str, list[str]]  # component ("" for a root adapter) -> every layer any adapter adapts (target_modules)

    @property
    def target_modules(self) -> list[str]:
        """Every layer any of the adapters adapts, for ``enable_sara_hotswap(target_modules=...)``."""
        return sorted({layer for names in self.layers.values() for layer in names})

    def call(self) -> str:
        """The ``enable_sara_hotswap`` call, as a line of Python (a root adapter's layers go to the denoiser)."""
        components = sorted(name for name in self.layers if name)
        targets = self.target_modules
        fraction = math.ceil(self.max_fraction * 1e6) / 1e6  # rounded up: it must still fit
        denoiser_only = all(name in DENOISERS for name in components)
        where = "" if denoiser_only else f", components={components}"
        return f"peft_sara.enable_sara_hotswap(pipe, max_fraction={fraction:g}, target_modules={targets}{where})"


def _component_folders(folder: Path) -> dict[str, Path]:
    found = {
        child.name: child
        for child in sorted(folder.iterdir())
        if (child / CONFIG_NAME).is_file() and not child.name.startswith("checkpoint-")  # training outputs hold those
    }
    if found:
        return found
    if (folder / CONFIG_NAME).is_file():
        return {"": folder}
    raise FileNotFoundError(f"No '{CONFIG_NAME}' in '{folder}' or in its subfolders: not a SaRA adapter folder.")


def hotswap_sizing(
    sources: Sequence[str | os.PathLike],
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> HotswapSizing:
    """Read SaRA adapters (folders or Hub repos) and say what a hotswap slot serving all of them needs: the largest
    trainable fraction of any of their layers (``max_fraction``) and every layer they adapt (``target_modules``).
    The files are checked as every load checks them; no base model is needed (the files record weight shapes)."""
    if not sources:
        raise ValueError("Pass at least one adapter to size a hotswap slot for.")
    best, largest, layers = 0.0, None, {}
    for source in sources:
        folder = Path(resolve_adapter_folder(source, None, revision, token, None, local_files_only, None))
        for component, component_folder in _component_folders(folder).items():
            read_sara_config(component_folder)
            parsed, entries = check_checkpoint_file(read_adapter_weights(component_folder), allow_non_finite=True)
            names = layers.setdefault(component, [])
            for name in parsed.layers:
                numel = math.prod(entries[name].weight_shape)
                stored = entries[name].indices.numel() + entries[name].frozen_indices.numel()  # a slot holds both
                fraction = stored / numel if numel else 0.0
                if fraction > best:
                    best, largest = fraction, (str(source), component, name)
                if name not in names:
                    names.append(name)
    return HotswapSizing(best, largest, {component: sorted(names) for component, names in layers.items()})


__all__ = [
    "ForwardLock",
    "enable_sara_hotswap",
    "hotswap_adapter",
    "hotswap_guard",
    "hotswap_sizing",
    "HotswapSizing",
    "HotswapSlot",
    "hotswap_slot",
    "plan_hotswap",
    "swap_state_dicts",
]
