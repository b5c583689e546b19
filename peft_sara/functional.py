"""The sparse-update forward/backward ("unstructured backpropagation").

The effective weight of a SaRA layer is the frozen base weight with its trainable entries replaced by
``cast(base + scale * delta)``. Instead of materialising that weight (a full copy per forward), the op writes the
patched entries into the base weight in place, runs the ordinary dense op, and writes the original entries back,
bitwise. Only the input and the 1-D deltas are saved for backward; the weight gradient is produced only at the
trainable entries (gathered from a transient dense GEMM on the reference path, computed directly by the fused kernel),
so no dense gradient or mask persists and optimizer state exists only for the trainable values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


@contextlib.contextmanager
def patched_weight(
    weight: torch.Tensor,
    indices_per_adapter: Sequence[torch.Tensor],
    values_per_adapter: Sequence[torch.Tensor],
    scales: Sequence[float],
    backend: str,
) -> Iterator[torch.Tensor]:
    """Temporarily write each adapter's update into ``weight``; restores the base entries bitwise on exit."""
    if not weight.is_contiguous():
        raise RuntimeError(
            f"SaRA needs a contiguous base weight, got strides {weight.stride()} for shape {tuple(weight.shape)}. "
            "Convert the model with `.to(memory_format=torch.contiguous_format)`."
        )
    flat_weight = weight.detach().view(-1)
    saved_entries = []
    with torch.no_grad():
        try:
            for indices, values, scale in zip(indices_per_adapter, values_per_adapter, scales):
                saved_entries.append(kernels.patch_entries_(flat_weight, indices, values, scale, backend))
            yield weight
        finally:
            for indices, saved in zip(reversed(indices_per_adapter[: len(saved_entries)]), reversed(saved_entries)):
                kernels.restore_entries_(flat_weight, indices, saved, backend)


@runtime_checkable
class SparseDeltaOp(Protocol):
    """The contract between a SaRA layer and :func:`sparse_delta_forward`: the dense op of one module kind.

    A new module type (e.g. ``nn.Embedding``) is a layer class whose ``_op`` returns one of these, plus the op itself.
    ``forward`` computes the module's output from an (already patched) weight; ``backward`` returns the input
    gradient, the weight gradient sampled at each adapter's flat ``indices`` (float32, ``None`` where not needed)
    and the bias gradient.
    """

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def backward(
        self,
        grad_output: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        need_input: bool,
        indices_per_adapter: Sequence[torch.Tensor],
        need_values: Sequence[bool],
        backend: str,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None], torch.Tensor | None]: ...


@dataclass(frozen=True)
class LinearOp:
    """``y = x W^T + b`` (``transposed=True``: transformers' ``Conv1D``, ``y = x W + b`` with W of shape in x out)."""

    transposed: bool = False

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight.t() if self.transposed else weight, bias)

    def backward(self, grad_output, x, weight, bias, need_input, indices_per_adapter, need_values, backend):
        out_weight = weight.t() if self.transposed else weight
        grad_input = None
        if need_input:
            grad_input = grad_output @ out_weight.to(grad_output.dtype)
        grad_values = [None] * len(indices_per_adapter)
        wanted = [i for i, need in enumerate(need_values) if need]
        if wanted:
            grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
            x_2d = x.reshape(-1, x.shape[-1])
            if self.transposed:  # weight is in x out: its gradient is x^T g
                grad_2d, x_2d = x_2d.to(grad_output.dtype), grad_2d
            sampled = kernels.linear_weight_grad_values(
                grad_2d, x_2d, [indices_per_adapter[i] for i in wanted], backend
            )
            for i, values in zip(wanted, sampled):
                grad_values[i] = values
        grad_bias = None
        if bias is not None and bias.requires_grad:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(bias.dtype)
        return grad_input, grad_values, grad_bias


@dataclass(frozen=True)
class ConvOp:
    """N-d convolution with explicit integer padding (string / non-zero padding modes are resolved by the layer)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @classmethod
    def for_module(cls, conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[ConvOp, torch.Tensor]:
        """The op of ``conv`` and its input after the padding the op cannot express (padding modes, odd "same")."""
        spatial = len(conv.kernel_size)
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = (0,) * spatial
        elif padding == "valid":
            padding = (0,) * spatial
        elif padding == "same":
            totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            if all(total % 2 == 0 for total in totals):
                padding = tuple(total // 2 for total in totals)
            else:  # asymmetric: pad explicitly (extra element on the right, as PyTorch does)
                pads = []
                for total in reversed(totals):
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
                padding = (0,) * spatial
        return cls(tuple(conv.stride), tuple(padding), tuple(conv.dilation), conv.groups), x

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, grad_output, x, weight, bias, need_input, indices_per_adapter, need_values, backend):
        need_weight = any(need_values)
        need_bias = bias is not None and bias.requires_grad
        dtype = grad_output.dtype
        grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_output,
            x.to(dtype),
            weight.to(dtype),
            [weight.shape[0]] if need_bias else None,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            False,
            [0] * (weight.dim() - 2),
            self.groups,
            [need_input, need_weight, need_bias],
        )
        grad_values = [None] * len(indices_per_adapter)
        if need_weight:
            flat_grad = grad_weight.reshape(-1)
            for i, (indices, need) in enumerate(zip(indices_per_adapter, need_values)):
                if need:
                    grad_values[i] = flat_grad.index_select(0, indices).float()
        return grad_input, grad_values, grad_bias.to(bias.dtype) if need_bias else None


class _SparseDeltaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, op, indices_per_adapter, scales, backend, *values_per_adapter):
        with patched_weight(weight, indices_per_adapter, values_per_adapter, scales, backend):
            output = op.forward(x, weight, bias)
        ctx.save_for_backward(x, *values_per_adapter)
        # The base weight and bias are frozen and only read: keep plain references (their entries are patched in
        # place, which would otherwise trip autograd's version check).
        ctx.weight, ctx.bias = weight, bias
        ctx.op, ctx.indices_per_adapter, ctx.scales, ctx.backend = op, indices_per_adapter, scales, backend
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, *values_per_adapter = ctx.saved_tensors
        need_values = [need and scale != 0 for need, scale in zip(ctx.needs_input_grad[7:], ctx.scales)]
        with patched_weight(ctx.weight, ctx.indices_per_adapter, values_per_adapter, ctx.scales, ctx.backend):
            grad_input, grad_values, grad_bias = ctx.op.backward(
                grad_output.contiguous(),
                x,
                ctx.weight,
                ctx.bias,
                ctx.needs_input_grad[0],
                ctx.indices_per_adapter,
                need_values,
                ctx.backend,
            )
        grad_values = [
            None if grad is None else grad.mul_(scale) if scale != 1 else grad
            for grad, scale in zip(grad_values, ctx.scales)
        ]
        if grad_input is not None:
            grad_input = grad_input.to(x.dtype)
        return (grad_input, None, grad_bias, None, None, None, None, *grad_values)


def sparse_delta_forward(
    op: SparseDeltaOp,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    indices_per_adapter: Sequence[torch.Tensor],
    values_per_adapter: Sequence[torch.Tensor],
    scales: Sequence[float],
    backend: str = "reference",
) -> torch.Tensor:
    """Apply ``op`` with the base weight plus each adapter's sparse update; differentiable in ``x`` and the values."""
    return _SparseDeltaFunction.apply(
        x, weight, bias, op, tuple(indices_per_adapter), tuple(float(s) for s in scales), backend, *values_per_adapter
    )


def effective_weight(
    weight: torch.Tensor,
    indices_per_adapter: Sequence[torch.Tensor],
    values_per_adapter: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> torch.Tensor:
    """A dense copy of the patched weight (for export, merge checks and tests; never used in training)."""
    dense = weight.detach().clone()
    flat_dense = dense.view(-1)
    with torch.no_grad():
        for indices, values, scale in zip(indices_per_adapter, values_per_adapter, scales):
            kernels.reference.patch_entries_(flat_dense, indices, values, scale)
    return dense
