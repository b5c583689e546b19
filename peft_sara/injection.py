"""Injecting a SaRA adapter into a pipeline component in place, through public API only.

A diffusers model (``ModelMixin``) gets it through its own ``add_adapter``, as a LoRA adapter would: diffusers then
knows the model holds adapters, so ``unet.set_adapter``, ``unet.active_adapters()``, ``unet.disable_adapters()`` and
the pipeline's methods all work. A transformers text encoder, or any other module, gets it through PEFT's
``inject_adapter_in_model``: transformers' own ``PreTrainedModel.add_adapter`` refuses ``peft<0.22`` (transformers 5.x)
and peft-sara pins ``peft<0.22``. diffusers' pipeline methods drive such a component through its ``peft_config`` and its
tuner layers (``set_adapters``, ``fuse_lora``, ``unfuse_lora``, ``disable_lora``, ``enable_lora``,
``unload_lora_weights``, ``get_list_adapters``), with one gap: ``pipe.delete_adapters`` removes the encoder's layers
but keeps its ``peft_config`` entry (diffusers removes it only from models transformers marked as holding adapters).
Such an entry, an adapter no layer holds any more, is dropped at the next injection (:func:`drop_deleted_adapters`).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer, cast_adapter_dtype
from torch import nn

from .tuner.config import SaRAConfig
from .tuner.layer import sara_adapter_names
from .tuner.transaction import all_or_nothing


def is_diffusers_model(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusers ``ModelMixin`` (diffusers is imported only if it is installed)."""
    try:
        from diffusers import ModelMixin
    except ImportError:
        return False
    return isinstance(module, ModelMixin)


def deleted_adapters(module: nn.Module) -> list[str]:
    """The SaRA adapters in ``module.peft_config`` that no layer holds any more (deleted by ``pipe.delete_adapters``
    from a text encoder, see the module docstring); changes nothing."""
    configs = getattr(module, "peft_config", None)
    if not isinstance(configs, dict):
        return []
    present = set(sara_adapter_names(module))
    return [name for name, config in configs.items() if isinstance(config, SaRAConfig) and name not in present]


def drop_deleted_adapters(module: nn.Module) -> None:
    """Remove :func:`deleted_adapters` from ``module.peft_config``."""
    for name in deleted_adapters(module):
        del module.peft_config[name]


def adapter_names_in_use(module: nn.Module) -> set[str]:
    """The adapter names of ``module``'s ``peft_config``, less :func:`deleted_adapters`."""
    return set(getattr(module, "peft_config", None) or {}) - set(deleted_adapters(module))


def _activate(module: nn.Module, adapter_name: str) -> None:
    # Every tuner layer of the component, as `add_adapter` does: other methods' layers (e.g. LoRA) switch too. For
    # inference: the adapter's values do not require grad (diffusers' `set_adapter` would make them trainable).
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.set_adapter([adapter_name], inference_mode=True)


def inject_sara_adapter(
    module: nn.Module,
    config: SaRAConfig,
    adapter_name: str,
    low_cpu_mem_usage: bool = False,
    enclosing_transaction: bool = False,
) -> None:
    """Inject a SaRA adapter into a pipeline component in place and make it the active adapter (for inference).

    ``component.add_adapter(config, adapter_name)`` for diffusers models; PEFT's ``inject_adapter_in_model`` for
    transformers text encoders and other modules (see the module docstring). ``low_cpu_mem_usage=True`` (PEFT's
    meaning: a checkpoint sets the weights next) skips the selection, so the adapter waits for its entries (diffusers'
    ``add_adapter`` takes no such argument: the config says it, see ``SaRAModel.inject_adapter``).
    ``enclosing_transaction=True``: the caller runs this inside its own ``all_or_nothing`` over ``module`` and lets
    any error through it, which then restores everything diffusers' ``add_adapter`` changed (not captured twice).
    """
    if adapter_name in adapter_names_in_use(module):
        raise ValueError(
            f"{type(module).__name__} already has an adapter named '{adapter_name}': pass another `adapter_name`, or "
            "remove it first with `pipe.delete_adapters(...)`."
        )
    with warnings.catch_warnings():
        # PEFT warns whenever a second adapter joins `peft_config`; several adapters per component are intended here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        drop_deleted_adapters(module)
        if is_diffusers_model(module):
            recorded = config.base_model_name_or_path
            # diffusers' add_adapter marks the model as holding adapters before it injects: all or nothing.
            # It takes no `low_cpu_mem_usage`; the config carries the same promise for the injection only.
            config.entries_follow = low_cpu_mem_usage
            try:
                with nullcontext() if enclosing_transaction else all_or_nothing(module):
                    module.add_adapter(config, adapter_name=adapter_name)
            finally:
                del config.entries_follow
            if recorded is not None:  # add_adapter clears it (the tuner then records the model's own id)
                config.base_model_name_or_path = recorded
        else:
            inject_adapter_in_model(config, module, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    # As PeftModel does by default: float16 / bfloat16 adapter values are kept in float32 (the sum is cast anyway).
    cast_adapter_dtype(module, adapter_name)
    _activate(module, adapter_name)


__all__ = [
    "adapter_names_in_use",
    "deleted_adapters",
    "drop_deleted_adapters",
    "inject_sara_adapter",
    "is_diffusers_model",
]
