"""The model, adapter and optimizer a plan trains, built on real tensors or on fake ones (no memory, no data).

Fake models are built on the meta device and then given fake parameters and buffers of the same shapes, in the
planned dtype (:func:`materialize_fake_`); adapters are injected by PEFT as usual. Only SaRA's *selection* cannot run on fake weights (it sorts real
magnitudes): :func:`fraction_selection` stands in for it, selecting the same per-layer count as
``trainable_fraction`` would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import diffusers
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from ..tuner import layer as sara_layer_module
from ..tuner.config import SaRAConfig
from ..tuner.functional import has_forward_hooks
from ..tuner.model import default_target_modules
from ..tuner.selection import index_dtype_for
from .presets import ModelSpec

METHODS = ("sara", "lora", "full")


@dataclass(frozen=True)
class MethodSpec:
    """How the model is trained: ``"sara"`` (``fraction`` of each targeted weight), ``"lora"`` (rank ``rank``) or
    ``"full"`` fine-tuning. ``target_modules`` default to SaRA's defaults for the model class, for LoRA too (the same
    layers, so the two compare like for like)."""

    method: str
    fraction: float | None = None
    rank: int = 16
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}: use one of {', '.join(METHODS)}.")
        if self.method == "sara" and not (self.fraction and 0 < self.fraction <= 1):
            raise ValueError(f"SaRA needs a trainable fraction in (0, 1], got {self.fraction}.")
        if self.method == "lora" and self.rank < 1:
            raise ValueError(f"LoRA needs a rank >= 1, got {self.rank}.")


def fraction_selection(fraction: float):
    """A stand-in for :func:`peft_sara.tuner.selection.select_trainable_indices` on fake weights: as many entries as
    ``trainable_fraction=fraction`` selects (``max(1, round(fraction * numel))``), at placeholder positions."""

    def select(weight: torch.Tensor, threshold: float | None = None, trainable_fraction: float | None = None):
        numel = weight.numel()
        count = min(numel, max(1, round(fraction * numel)))
        return torch.zeros(count, dtype=index_dtype_for(numel), device=weight.device), 0.0

    return select


@torch.no_grad()
def materialize_fake_(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """In place: every parameter and buffer of ``model`` becomes an uninitialised tensor of the same shape on the CPU, floating ones in ``dtype`` (default: kept); called under a
    ``FakeTensorMode`` they are fake. (``Module.to`` cannot move fake parameters: it swaps tensors, which their
    weak references forbid.)"""

    def empty_like(tensor: torch.Tensor) -> torch.Tensor:
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        return torch.empty(tensor.shape, dtype=cast, device="cpu")

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = nn.Parameter(empty_like(param), requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = empty_like(buffer)
    return model


def build_model(model: ModelSpec, dtype: torch.dtype, fake: bool, seed: int = 0) -> nn.Module:
    """The denoiser of ``model`` in ``dtype``, in train mode: random weights, or fake ones (call under the mode)."""
    model_class = getattr(diffusers, model.class_name)
    if fake:
        with torch.device("meta"):
            denoiser = model_class(**model.config)
        materialize_fake_(denoiser, dtype)
    else:
        torch.manual_seed(seed)
        denoiser = model_class(**model.config)
        if dtype != torch.float32:
            denoiser = denoiser.to(dtype)
    return denoiser.train()


@contextlib.contextmanager
def sara_on_fake_weights(fraction: float, plain_weights: bool = True) -> Iterator[None]:
    """SaRA layers created and run on fake weights behave as on real ones. Two names of ``peft_sara.tuner.layer`` stand in
    while the plan runs: the selection (:func:`fraction_selection`), and the path choice, which takes a fake tensor
    (type ``FakeTensor``, not ``Parameter``) for quantized storage. With ``plain_weights`` a fake floating weight of
    2+ bytes without hooks takes the main path, as a real one does; without, the composable path, as a quantized
    (bitsandbytes) base does."""
    originals = {
        name: getattr(sara_layer_module, name, None) for name in ("select_trainable_indices", "composable_reason")
    }
    missing = [name for name, original in originals.items() if original is None]
    if missing:
        raise RuntimeError(
            f"peft_sara.tuner.layer no longer uses {missing}: update peft_sara.planning.build, which stands in for them on "
            "fake weights."
        )
    original_reason = originals["composable_reason"]

    def composable_reason(base_layer: nn.Module) -> str | None:
        weight = base_layer.weight
        plain_fake = isinstance(weight, FakeTensor) and weight.dtype.is_floating_point and weight.dtype.itemsize >= 2
        if plain_weights and plain_fake and not has_forward_hooks(base_layer):
            return None
        return original_reason(base_layer)

    sara_layer_module.select_trainable_indices = fraction_selection(fraction)
    sara_layer_module.composable_reason = composable_reason
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(sara_layer_module, name, original)


@contextlib.contextmanager
def _fake_moves_rebuild() -> Iterator[None]:
    """``Module.to`` on a module with fake tensors rebuilds them (:func:`materialize_fake_`, in the requested dtype).
    PEFT moves and casts each new adapter to its base layer's device and dtype; for fake tensors torch implements that
    by swapping tensors, which their weak references forbid."""
    original = nn.Module.to

    def to(module: nn.Module, *args, **kwargs) -> nn.Module:
        _, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if any(isinstance(tensor, FakeTensor) for tensor in [*module.parameters(), *module.buffers()]):
            return materialize_fake_(module, dtype)
        return original(module, *args, **kwargs)

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = original


def apply_method(denoiser: nn.Module, method: MethodSpec, fake: bool) -> nn.Module:
    """``denoiser`` set up for ``method``: wrapped by PEFT (adapter values / LoRA factors in float32, PEFT's
    default), or with every parameter trainable (full fine-tuning). SaRA on fake weights needs
    :func:`sara_on_fake_weights` around this and the steps."""
    if method.method == "full":
        return denoiser.requires_grad_(True)
    targets = list(method.target_modules or default_target_modules(denoiser) or [])
    if not targets:
        raise ValueError(f"No default target modules for {type(denoiser).__name__}: pass target modules.")
    if method.method == "sara":
        config = SaRAConfig(trainable_fraction=method.fraction, target_modules=targets)
    else:
        config = LoraConfig(r=method.rank, lora_alpha=method.rank, target_modules=targets)
    if not fake:
        return get_peft_model(denoiser, config)
    with _fake_moves_rebuild():
        return get_peft_model(denoiser, config)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates."""
    return [param for param in model.parameters() if param.requires_grad]
