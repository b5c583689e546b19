"""Masked-weight operations with automatic dispatch between a fused Triton path and the PyTorch reference.

Dispatch: ``PEFT_SARA_KERNEL`` (``auto`` / ``triton`` / ``reference``) overrides the layer's ``kernel`` setting; ``auto``
uses Triton for CUDA tensors when Triton imports, and the reference everywhere else.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

from ..names import KERNEL_ENV_VAR as ENV_VAR
from ..names import KERNELS as BACKENDS
from . import reference


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the Triton kernels can be imported here."""
    try:
        from . import triton_kernels  # noqa: F401
    except Exception:  # ImportError, or Triton failing to find a backend
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@torch.compiler.assume_constant_result  # a compiled graph bakes the choice in (dynamo need not trace the cache)
def resolve_backend(preference: str, device: torch.device) -> str:
    """The backend that will run for tensors on ``device`` given a layer preference (env var wins)."""
    return _resolve_backend(os.environ.get(ENV_VAR, preference) or "auto", device, _interpreting())


@functools.lru_cache(maxsize=64)
def _resolve_backend(choice: str, device: torch.device, interpreting: bool) -> str:
    if choice not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {choice!r}.")
    if choice == "reference":
        return "reference"
    usable = triton_available() and (device.type == "cuda" or interpreting)
    if choice == "triton":
        if not usable:
            raise RuntimeError(
                f"The Triton kernel was requested (kernel='triton' or {ENV_VAR}=triton) but cannot run on "
                f"{device}: Triton needs a CUDA device, or TRITON_INTERPRET=1 for CPU tensors. Use 'auto'."
            )
        return "triton"
    return "triton" if usable and device.type == "cuda" else "reference"


def linear_weight_grad_values(
    grad_output: torch.Tensor, inputs: torch.Tensor, indices_per_set: Sequence[torch.Tensor], backend: str
) -> list[torch.Tensor]:
    """The weight gradient ``grad_output.T @ inputs`` sampled at each set of flat indices (float32, float64 for
    float64 inputs). The Triton path is a registered op (:func:`sampled_linear_weight_grad`), so that
    ``torch.compile`` traces around it; the reference is plain PyTorch that dynamo traces."""
    if backend == "triton":
        return torch.ops.peft_sara.sampled_linear_weight_grad(grad_output, inputs, list(indices_per_set))
    return reference.linear_weight_grad_values(grad_output, inputs, indices_per_set)


@torch.library.custom_op("peft_sara::sampled_linear_weight_grad", mutates_args=())
def sampled_linear_weight_grad(
    grad_output: torch.Tensor, inputs: torch.Tensor, indices_per_set: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The fused SDDMM / masked-GEMM weight gradient (:func:`.triton_kernels.linear_weight_grad_values`)."""
    from . import triton_kernels

    return triton_kernels.linear_weight_grad_values(grad_output, inputs, indices_per_set)


@sampled_linear_weight_grad.register_fake
def _(grad_output, inputs, indices_per_set):
    return [grad_output.new_empty(indices.shape[0], dtype=torch.float32) for indices in indices_per_set]
