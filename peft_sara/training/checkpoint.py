"""Checkpoints that resume SaRA training bitwise: adapter, optimizer, LR scheduler, helper and RNG states."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from peft import set_peft_model_state_dict
from torch import nn

from ..atomic import torch_save_atomic
from ..constants import TRAINING_STATE_NAME
from ..layer import sara_layers
from ..masks import is_sharded
from ..serialization import adapter_subfolder, read_adapter_weights, save_model_adapter
from .helper import SaRATrainingHelper, resolve_sara_adapter
from .optimizer import pad_state_to_capacity, unwrap_optimizer


def _trainable_parameter_names(model: nn.Module) -> dict[nn.Parameter, str]:
    return {param: name for name, param in model.named_parameters() if param.requires_grad}


def save_training_state(
    output_dir: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any | None = None,
    helper: SaRATrainingHelper | None = None,
) -> None:
    """Save everything needed to resume bitwise: adapter, optimizer, scheduler, helper and RNG states.

    The adapter is written with ``save_pretrained`` (PEFT format, live entries only) into ``output_dir``; the rest
    goes to ``sara_training_state.pt`` beside it, written atomically. Optimizer state keeps the values Parameters'
    full (fixed) capacity, freed tail included, so that a resumed run continues bitwise.
    """
    sharded = [name for name, param in model.named_parameters() if "sara_" in name and is_sharded(param)]
    if sharded:
        raise ValueError(
            f"save_training_state writes from one process and cannot read sharded (FSDP2 / DTensor) SaRA parameters "
            f"such as '{sharded[0]}'. Checkpoint an FSDP run with torch.distributed.checkpoint (or accelerate's "
            "save_state) instead; see docs/DISTRIBUTED.md."
        )
    os.makedirs(output_dir, exist_ok=True)
    save_model_adapter(model, output_dir)
    names = _trainable_parameter_names(model)
    inner = unwrap_optimizer(optimizer)
    state = {
        "optimizer": inner.state_dict(),
        "param_names": [[names[p] for p in group["params"]] for group in inner.param_groups],
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "helper": helper.state_dict() if helper is not None else None,
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }
    state["rng"]["numpy"] = np.random.get_state()
    torch_save_atomic(state, os.path.join(output_dir, TRAINING_STATE_NAME))


def load_training_state(
    input_dir: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any | None = None,
    helper: SaRATrainingHelper | None = None,
    adapter_name: str | None = None,
) -> None:
    """Resume from :func:`save_training_state`: loads the adapter into ``model`` (in place, into the values
    Parameters' capacity, so wrappers built before stay valid), points ``optimizer`` at the current parameters and
    restores all states."""
    adapter_name, _ = resolve_sara_adapter(model, adapter_name)
    adapter_dir = os.path.join(input_dir, adapter_subfolder(adapter_name))
    load_result = set_peft_model_state_dict(model, read_adapter_weights(adapter_dir), adapter_name)
    missing = [k for k in getattr(load_result, "missing_keys", []) if "sara_" in k]
    if missing:
        raise ValueError(f"Checkpoint {input_dir} lacks SaRA tensors the model has: {missing[:5]}")
    state = torch.load(os.path.join(input_dir, TRAINING_STATE_NAME), weights_only=False)
    params = dict(model.named_parameters())
    inner = unwrap_optimizer(optimizer)
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
    layers = [layer for _, layer in sara_layers(model) if adapter_name in layer.sara_values]
    pad_state_to_capacity(
        inner, [(layer.sara_values[adapter_name], layer.num_trainable(adapter_name)) for layer in layers]
    )
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
        np.random.set_state(rng["numpy"])


__all__ = ["save_training_state", "load_training_state", "TRAINING_STATE_NAME"]
