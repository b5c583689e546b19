"""SaRA on a pipeline's components, for a training loop: add a trainable adapter in place, and keep together what
trains each component (its optimizer, LR scheduler and :class:`SaRATrainingHelper`).

Scripts that train several components of one pipeline (a UNet and its text encoders) hold one
:class:`TrainedComponent` per component; :mod:`.checkpoint_folders` saves and resumes them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..pipelines import inject_sara_adapter
from ..transaction import all_or_nothing
from ..tuner.config import SaRAConfig
from ..tuner.layer import sara_layers
from .helper import SaRATrainingHelper

DEFAULT_ADAPTER_NAME = "default"


def _is_diffusers_model(module: nn.Module) -> bool:
    try:
        from diffusers import ModelMixin
    except ImportError:  # diffusers is optional for training transformers / plain models
        return False
    return isinstance(module, ModelMixin)


def add_sara_adapter(
    module: nn.Module,
    config: SaRAConfig,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    *,
    gradient_checkpointing: bool = False,
    trainable_dtype: torch.dtype | None = torch.float32,
) -> list[nn.Parameter]:
    """Add a trainable SaRA adapter to a pipeline component in place and return the parameters to optimize.

    The component stays a diffusers ``ModelMixin`` (through its ``add_adapter``) or transformers model (through
    :func:`peft_sara.pipelines.inject_sara_adapter`, without transformers' ``peft>=0.22`` check), so the pipeline
    keeps working and ``load_sara_adapter`` / ``save_sara_adapter`` read and write it. Its base weights are frozen.

    Args:
        module: a denoiser (UNet, transformer) or text encoder.
        config: the SaRA config of this component.
        adapter_name: the adapter's name.
        gradient_checkpointing: switch on the component's own gradient checkpointing (non-reentrant for
            transformers models).
        trainable_dtype: dtype of the trainable SaRA values (float32 by default, the dtype mixed-precision training
            needs for its optimizer updates, whatever the frozen weights' dtype); None leaves them as they are.
    """
    # All or nothing: a refused injection leaves the module as it was (diffusers' `add_adapter` marks the model as
    # holding adapters before it injects).
    with all_or_nothing(module):
        if _is_diffusers_model(module):
            module.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_sara_adapter(module, config, adapter_name)
            for _, layer in sara_layers(module):
                layer.set_adapter([adapter_name])  # trainable (inject_sara_adapter activates for inference)
    if gradient_checkpointing:
        if _is_diffusers_model(module):
            module.enable_gradient_checkpointing()
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [param for param in module.parameters() if param.requires_grad]
    if trainable_dtype is not None:
        for param in trainable:
            if param.dtype != trainable_dtype:
                param.data = param.data.to(trainable_dtype)
    return trainable


@dataclass
class TrainedComponent:
    """One adapted pipeline component and what trains it.

    Attributes:
        name: the component's name in the pipeline (``"unet"``, ``"text_encoder"``, ...); it names its subfolder in
            checkpoints and in the saved adapter.
        model: the component, with its SaRA adapter.
        optimizer: the optimizer over its SaRA values (plain, or wrapped by accelerate).
        lr_scheduler: its learning-rate scheduler, or None.
        helper: its :class:`SaRATrainingHelper` (low-rank loss, progressive re-selection).
        prepared: what a wrapper (``accelerator.prepare``: DDP, DeepSpeed) returned for ``model``, the one to call in
            the loss; None while unwrapped.
    """

    name: str
    model: nn.Module
    optimizer: Any
    lr_scheduler: Any
    helper: SaRATrainingHelper
    prepared: nn.Module | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The component's parameters that train (its SaRA values)."""
        return [param for param in self.model.parameters() if param.requires_grad]


__all__ = ["DEFAULT_ADAPTER_NAME", "add_sara_adapter", "TrainedComponent"]
