"""Training SaRA the paper's way: low-rank loss, progressive re-selection, optimizer consistency, exact resume.

One object, :class:`SaRATrainingHelper`, hooks into any loop::

    helper = SaRATrainingHelper(model, optimizer, total_steps=max_steps)
    for batch in loader:
        loss = compute_loss(model, batch) + helper.regularization()
        loss.backward()
        optimizer.step(); lr_scheduler.step(); optimizer.zero_grad()
        helper.step()          # re-selects at the progressive step and keeps the optimizer consistent

The helper never changes a learning rate; :func:`paper_learning_rate` gives the paper's fitted default.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import SaRAConfig
from .layer import SaRALayer
from .regularizers import layer_nuclear_norm, qualifies_for_rank_loss, sample_layers

TRAINING_STATE_NAME = "sara_training_state.pt"


def paper_learning_rate(threshold: float) -> float:
    """The paper's fitted learning rate for a threshold: ``1e-3 * exp(-350 * threshold)`` (4.97e-4 at 2e-3)."""
    return 1e-3 * math.exp(-350.0 * threshold)


def sara_layers(model: nn.Module) -> Iterator[tuple[str, SaRALayer]]:
    """(name, layer) for every SaRA layer in ``model`` (a PeftModel or a model with injected adapters)."""
    for name, module in model.named_modules():
        if isinstance(module, SaRALayer):
            yield name, module


def _sara_config(model: nn.Module, adapter_name: str | None) -> tuple[str, SaRAConfig]:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        raise ValueError("The model carries no PEFT config: wrap it with get_peft_model or add_adapter first.")
    if adapter_name is None:
        active = getattr(model, "active_adapter", None)
        adapter_name = active if isinstance(active, str) and active in configs else next(iter(configs))
    if adapter_name not in configs:
        raise ValueError(f"Adapter '{adapter_name}' not found; available: {sorted(configs)}.")
    config = configs[adapter_name]
    if not isinstance(config, SaRAConfig):
        raise ValueError(f"Adapter '{adapter_name}' is a {type(config).__name__}, not a SaRAConfig.")
    return adapter_name, config


def _unwrap_optimizer(optimizer):
    # accelerate's AcceleratedOptimizer (and similar wrappers) keep the real optimizer in `.optimizer`
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def replace_optimizer_parameters(
    optimizer: torch.optim.Optimizer, replacements: dict[nn.Parameter, tuple[nn.Parameter, torch.Tensor]]
) -> None:
    """Swap parameters in an optimizer in place, keeping the state of surviving entries.

    ``replacements`` maps an old 1-D parameter to ``(new_parameter, keep_mask)``: per-entry state tensors (Adam's
    moments, momentum buffers) are indexed with the mask; scalar state (Adam's step) is kept as is. The optimizer
    object stays the same, so LR schedulers and accelerate wrappers remain valid.
    """
    optimizer = _unwrap_optimizer(optimizer)
    for group in optimizer.param_groups:
        for position, param in enumerate(group["params"]):
            if param not in replacements:
                continue
            new_param, keep = replacements[param]
            group["params"][position] = new_param
            old_state = optimizer.state.pop(param, None)
            if old_state is not None:
                optimizer.state[new_param] = {key: _keep_entries(key, value, param, keep)
                                              for key, value in old_state.items()}


def _keep_entries(key: str, value: Any, param: nn.Parameter, keep: torch.Tensor) -> Any:
    if not torch.is_tensor(value) or value.numel() <= 1:
        return value  # step counters and other scalars
    if value.shape == param.shape:
        return value[keep].clone()
    raise ValueError(
        f"Cannot carry optimizer state '{key}' of shape {tuple(value.shape)} over to the re-selected entries of a "
        f"parameter of shape {tuple(param.shape)} (e.g. block-quantized 8-bit optimizer state). Clear that "
        "optimizer's state before re-selection, or use an optimizer with per-entry state such as torch.optim.AdamW."
    )


class SaRATrainingHelper:
    """Owns SaRA's per-step training logic: step counting, low-rank loss sampling and progressive re-selection.

    Args:
        model: a PeftModel (or a diffusers/transformers model with a SaRA adapter added in place).
        optimizer: the optimizer over the SaRA values; re-selection updates it in place. May be None if you rebuild
            your optimizer yourself (then use the mapping returned by :meth:`reselect`).
        total_steps: planned optimizer steps; with ``progressive_fraction`` it sets the re-selection step.
        adapter_name: the SaRA adapter to train (default: the active one).
        seed: seed of the generator that samples layers for the low-rank loss.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        total_steps: int | None = None,
        adapter_name: str | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.adapter_name, self.config = _sara_config(model, adapter_name)
        self.total_steps = total_steps
        self.progressive_step = self._progressive_step()
        self.global_step = 0
        self.reselected = False
        self.generator = torch.Generator().manual_seed(seed)
        self.last_regularization: float = 0.0
        self.rank_layers = [
            layer for name, layer in sara_layers(model)
            if self.adapter_name in layer.sara_values
            and qualifies_for_rank_loss(layer, self.config.rank_min_dim)
            and self._matches_rank_targets(name)
        ]
        if self.config.lambda_rank > 0 and not self.rank_layers:
            warnings.warn(
                f"lambda_rank={self.config.lambda_rank} but no SaRA layer qualifies for the low-rank loss "
                f"(both matrix dimensions > rank_min_dim={self.config.rank_min_dim}"
                + (", and matching rank_target_modules" if self.config.rank_target_modules is not None else "")
                + "): the loss is 0. Lower `rank_min_dim` for small models.",
                stacklevel=2,
            )

    def _progressive_step(self) -> int | None:
        if self.config.progressive_step is not None:
            return self.config.progressive_step
        if self.config.progressive_fraction is None or self.total_steps is None:
            return None
        return max(1, round(self.config.progressive_fraction * self.total_steps))

    def _matches_rank_targets(self, name: str) -> bool:
        targets = self.config.rank_target_modules
        if targets is None:
            return True
        if isinstance(targets, str):
            import re

            return re.fullmatch(targets, name) is not None
        return any(name == target or name.endswith(f".{target}") for target in targets)

    def regularization(self) -> torch.Tensor:
        """``lambda_rank * sum ||Delta_W||_*`` over this step's sampled layers (a differentiable scalar)."""
        device = next((layer.sara_values[self.adapter_name].device for layer in self.rank_layers), torch.device("cpu"))
        if self.config.lambda_rank == 0 or not self.rank_layers:
            self.last_regularization = 0.0
            return torch.zeros((), device=device)
        count = None if self.config.rank_layers_per_step == "all" else self.config.rank_layers_per_step
        chosen = sample_layers(self.rank_layers, count, self.generator)
        total = sum(
            layer_nuclear_norm(layer, self.adapter_name, self.config.rank_method, self.config.rank_oversample,
                               self.config.rank_target)
            for layer in chosen
        )
        loss = self.config.lambda_rank * total
        self.last_regularization = float(loss.detach())
        return loss

    def step(self) -> bool:
        """Advance one optimizer step; returns True when this step performed the progressive re-selection."""
        self.global_step += 1
        if self.progressive_step is not None and not self.reselected and self.global_step >= self.progressive_step:
            self.reselect()
            return True
        return False

    @torch.no_grad()
    def reselect(self) -> dict[nn.Parameter, tuple[nn.Parameter, torch.Tensor]]:
        """Shrink every layer's trainable set to the entries still below its cutoff; update the optimizer in place."""
        replacements = {}
        for _, layer in sara_layers(self.model):
            if self.adapter_name not in layer.sara_values:
                continue
            old_param = layer.sara_values[self.adapter_name]
            keep = layer.reselect(self.adapter_name)
            replacements[old_param] = (layer.sara_values[self.adapter_name], keep)
        if self.optimizer is not None:
            replace_optimizer_parameters(self.optimizer, replacements)
        self.reselected = True
        return replacements

    def trainable_count(self) -> int:
        """Current number of trainable SaRA entries."""
        return sum(layer.num_trainable(self.adapter_name) for _, layer in sara_layers(self.model)
                   if self.adapter_name in layer.sara_values)

    def state_dict(self) -> dict[str, Any]:
        return {"global_step": self.global_step, "reselected": self.reselected,
                "generator": self.generator.get_state(), "progressive_step": self.progressive_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step = state["global_step"]
        self.reselected = state["reselected"]
        self.generator.set_state(state["generator"])
        self.progressive_step = state["progressive_step"]


# ----------------------------------------------------------------------------------------------- checkpoints
def _trainable_parameter_names(model: nn.Module) -> dict[nn.Parameter, str]:
    return {param: name for name, param in model.named_parameters() if param.requires_grad}


def _save_adapter(model: nn.Module, output_dir: str) -> None:
    """PEFT-format adapter files of a PeftModel, or of a model with injected adapters (diffusers' add_adapter)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.save_pretrained(output_dir)
        return
    from .diffusers_utils import save_component_adapter

    for adapter_name in getattr(model, "peft_config", {}):
        target = output_dir if adapter_name == "default" else os.path.join(output_dir, adapter_name)
        save_component_adapter(model, target, adapter_name)


def save_training_state(
    output_dir: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any | None = None,
    helper: SaRATrainingHelper | None = None,
) -> None:
    """Save everything needed to resume bitwise: adapter, optimizer, scheduler, helper and RNG states.

    The adapter is written with ``save_pretrained`` (PEFT format) into ``output_dir``; the rest goes to
    ``sara_training_state.pt`` beside it.
    """
    os.makedirs(output_dir, exist_ok=True)
    _save_adapter(model, output_dir)
    names = _trainable_parameter_names(model)
    inner = _unwrap_optimizer(optimizer)
    state = {
        "optimizer": inner.state_dict(),
        "param_names": [[names[p] for p in group["params"]] for group in inner.param_groups],
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "helper": helper.state_dict() if helper is not None else None,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    try:
        import numpy as np

        state["rng"]["numpy"] = np.random.get_state()
    except ImportError:
        pass
    torch.save(state, os.path.join(output_dir, TRAINING_STATE_NAME))


def load_training_state(
    input_dir: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any | None = None,
    helper: SaRATrainingHelper | None = None,
    adapter_name: str | None = None,
) -> None:
    """Resume from :func:`save_training_state`: loads the adapter into ``model`` (resizing layers to the saved
    trainable sets), points ``optimizer`` at the current parameters and restores all states."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    adapter_name, _ = _sara_config(model, adapter_name)
    adapter_dir = input_dir if adapter_name == "default" else os.path.join(input_dir, adapter_name)
    load_result = set_peft_model_state_dict(model, load_peft_weights(adapter_dir, device="cpu"), adapter_name)
    missing = [k for k in getattr(load_result, "missing_keys", []) if "sara_" in k]
    if missing:
        raise ValueError(f"Checkpoint {input_dir} lacks SaRA tensors the model has: {missing[:5]}")
    state = torch.load(os.path.join(input_dir, TRAINING_STATE_NAME), weights_only=False)
    params = dict(model.named_parameters())
    inner = _unwrap_optimizer(optimizer)
    if len(state["param_names"]) != len(inner.param_groups):
        raise ValueError(
            f"The checkpoint's optimizer has {len(state['param_names'])} parameter groups, this one "
            f"{len(inner.param_groups)}: build the optimizer the same way as when the checkpoint was saved."
        )
    for group, group_names in zip(inner.param_groups, state["param_names"]):
        unknown = [n for n in group_names if n not in params]
        if unknown:
            raise ValueError(f"Optimizer parameters {unknown[:3]} of the checkpoint are not in the model.")
        group["params"] = [params[name] for name in group_names]
    inner.load_state_dict(state["optimizer"])
    if lr_scheduler is not None and state["lr_scheduler"] is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if helper is not None and state["helper"] is not None:
        helper.load_state_dict(state["helper"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "numpy" in rng:
        import numpy as np

        np.random.set_state(rng["numpy"])


# ------------------------------------------------------------------------------------------ transformers Trainer
def _trainer_callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is a dependency
        return object
    return TrainerCallback


class SaRATrainerCallback(_trainer_callback_base()):
    """Runs SaRA's training logic inside a ``transformers.Trainer``.

    Just before each optimizer step it adds the gradient of the low-rank loss to the SaRA values (once per optimizer
    step, whatever the gradient accumulation), and after each step it performs the progressive re-selection on the
    Trainer's own optimizer. The regulariser's value is added to the Trainer's logs as ``sara_rank_loss``.
    """

    def __init__(self, adapter_name: str | None = None, seed: int = 0) -> None:
        self.adapter_name = adapter_name
        self.seed = seed
        self.helper: SaRATrainingHelper | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.helper = SaRATrainingHelper(model, optimizer, total_steps=state.max_steps,
                                         adapter_name=self.adapter_name, seed=self.seed)
        self.helper.global_step = state.global_step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        regularization = self.helper.regularization()
        if regularization.requires_grad:
            regularization.backward()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self.helper.optimizer = optimizer
        self.helper.step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.helper is not None:
            logs["sara_rank_loss"] = self.helper.last_regularization
            logs["sara_trainable"] = self.helper.trainable_count()
