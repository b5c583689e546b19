"""Peak memory of one training step: predicted on fake tensors with torch's ``MemTracker``, measured on real tensors
with the CPU allocator's own accounting (the profiler's memory events).

The step (:func:`training_step`) is the same code in both: forward, MSE loss in float32, backward, optimizer step,
``zero_grad(set_to_none=True)``. Optimizer state exists before the step (:func:`initialize_optimizer_state`), as in
every step after the first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from .inputs import TrainingBatch

# MemTracker's categories, by the names the plan reports them under.
CATEGORIES = {
    _MemRefType.PARAM: "parameters",
    _MemRefType.BUFFER: "buffers",
    _MemRefType.GRAD: "gradients",
    _MemRefType.OPT: "optimizer",
    _MemRefType.ACT: "activations",
    _MemRefType.TEMP: "temporaries",
    _MemRefType.OTH: "inputs",
}


def training_step(model: nn.Module, batch: TrainingBatch, optimizer: torch.optim.Optimizer) -> None:
    """One step of denoiser training: prediction, float32 MSE against the target, backward, update, free gradients."""
    prediction = model(**batch.inputs, return_dict=False)[0]
    F.mse_loss(prediction.float(), batch.target.float()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def initialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state (as its first step does) without a forward pass.

    Adam and AdamW create their state in ``_init_group`` (their first step's lazy initialization: ``step``,
    ``exp_avg``, ``exp_avg_sq``), called here directly; the rest of a step would only update it, and on fake
    tensors that update costs as much as the traced step's (seconds for LoRA's thousands of parameters). Other
    optimizers, or an ``_init_group`` of another signature, take a whole step on zero gradients."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    try:
        if not isinstance(optimizer, torch.optim.Adam):
            raise TypeError(type(optimizer).__name__)
        for group in optimizer.param_groups:
            optimizer._init_group(group, [], [], [], [], [], [])
    except TypeError:  # raised before any state exists (the type, or the arguments' binding)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class _FrozenAwareMemTracker(MemTracker):
    """``MemTracker`` that also tracks modules with frozen parameters (it hooks every parameter's gradient, and a
    tensor that does not require grad refuses hooks): gradient hooks go on trainable parameters only."""

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for param in module.parameters():
                if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(self._track_gradient),
                        param.register_post_accumulate_grad_hook(lambda p: self._track_gradient(p.grad)),
                    )
        return memory

    def _track_gradient(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _update_peak_stats(self, peak_state) -> None:
        # Only the global peak: the per-module peaks cost a loop over every module per op (minutes for SDXL).
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot["Total"]:
                self._peak_mem[device] = snapshot["Total"]
                self._peak_mem_snap[device] = dict(snapshot)


@dataclass(frozen=True)
class StepPeak:
    """Peak bytes of a training step and what was live at that moment, by category (``CATEGORIES``' values)."""

    peak_bytes: int
    at_peak: dict[str, int]


def tracked_step_peak(
    model: nn.Module, batch: TrainingBatch, optimizer: torch.optim.Optimizer, external: Iterable[object] = ()
) -> StepPeak:
    """Run :func:`training_step` under a ``MemTracker`` (fake or real tensors) and return its peak and breakdown."""
    tracker = _FrozenAwareMemTracker()
    tracker.track_external(model, optimizer, batch.inputs, batch.target, *external)
    with tracker:
        training_step(model, batch, optimizer)
    (snapshot,) = tracker.get_tracker_snapshot("peak").values()
    at_peak = {CATEGORIES[key]: value for key, value in snapshot.items() if key in CATEGORIES}
    return StepPeak(snapshot["Total"], at_peak)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared weights counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measured_step_peak(model: nn.Module, batch: TrainingBatch, optimizer: torch.optim.Optimizer) -> int:
    """Peak bytes of a real :func:`training_step` on the CPU, by the allocator: what was live before the step
    (parameters, buffers, optimizer state, inputs; distinct storages) plus the highest running total of the bytes the
    CPU allocator handed out during the step (profiler memory events, which include every op's internal buffers)."""
    tensors = [*model.parameters(), *model.buffers(), batch.target, *_tensors_in(batch.inputs)]
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    before = storage_bytes(tensors)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        training_step(model, batch, optimizer)
    events = sorted(
        (event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"),
        key=lambda event: event.start_ns(),
    )
    running = highest = 0
    for event in events:
        running += event.nbytes()
        highest = max(highest, running)
    return before + highest


def _tensors_in(inputs: dict[str, object]) -> list[torch.Tensor]:
    tensors = []
    for value in inputs.values():
        if isinstance(value, dict):
            tensors += _tensors_in(value)
        elif torch.is_tensor(value):
            tensors.append(value)
    return tensors
