"""The sparse-update op registered with ``torch.library``, so that ``torch.compile`` traces SaRA layers whole.

``torch.ops.peft_sara.sparse_delta`` is the fast path of :mod:`peft_sara.functional` (patch in place, dense op,
restore) as one opaque op with a fake (meta) implementation for tracing and an autograd formula that calls
``torch.ops.peft_sara.sparse_delta_backward``. Dynamo and AOTAutograd see no data-dependent Python: the module kind
travels as an integer ``op_spec`` (:func:`op_spec` / :func:`op_from_spec`), indices in their stored dtype.

Eager execution keeps using :class:`peft_sara.functional._SparseDeltaFunction` (less dispatch overhead, and double
backward); both are tested against the same dense reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .functional import ConvOp, LinearOp, SparseDeltaOp, patched_weight

_LINEAR, _CONV = 0, 1


def op_spec(op: SparseDeltaOp) -> list[int]:
    """``op`` as integers: ``[0, transposed]`` for :class:`LinearOp`, ``[1, groups, dims, stride, padding, dilation]``
    for :class:`ConvOp`."""
    if isinstance(op, LinearOp):
        return [_LINEAR, int(op.transposed)]
    if isinstance(op, ConvOp):
        return [_CONV, op.groups, len(op.stride), *op.stride, *op.padding, *op.dilation]
    raise TypeError(f"No torch.library encoding for {type(op).__name__}; register one in peft_sara.custom_ops.")


def op_from_spec(spec: Sequence[int]) -> SparseDeltaOp:
    """Inverse of :func:`op_spec`."""
    if spec[0] == _LINEAR:
        return LinearOp(transposed=bool(spec[1]))
    groups, dims = spec[1], spec[2]
    stride, padding, dilation = (tuple(spec[3 + i * dims : 3 + (i + 1) * dims]) for i in range(3))
    return ConvOp(stride=stride, padding=padding, dilation=dilation, groups=groups)


@torch.library.custom_op("peft_sara::sparse_delta", mutates_args=())
def sparse_delta(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    indices: list[torch.Tensor],
    values: list[torch.Tensor],
    scales: list[float],
    spec: list[int],
    backend: str,
) -> torch.Tensor:
    """``op(x, W + sum scale * Delta_W, bias)``; ``W`` is patched in place under its storage lock and restored bitwise
    (its content and version counter are unchanged afterwards, so declaring no mutation is truthful)."""
    with patched_weight(weight, indices, values, scales, backend):
        return op_from_spec(spec).forward(x, weight, bias)


@sparse_delta.register_fake
def _(x, weight, bias, indices, values, scales, spec, backend):
    return op_from_spec(spec).forward(x, weight, bias)


@torch.library.custom_op("peft_sara::sparse_delta_backward", mutates_args=())
def sparse_delta_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    indices: list[torch.Tensor],
    values: list[torch.Tensor],
    scales: list[float],
    spec: list[int],
    backend: str,
    need_input: bool,
    need_values: list[bool],
    need_bias: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Input gradient, the weight gradient sampled at each index set (times its scale) and the bias gradient; a
    gradient that is not needed comes back empty."""
    need = [wanted and scale != 0 for wanted, scale in zip(need_values, scales)]
    with patched_weight(weight, indices, values, scales, backend):
        grad_input, grad_values, grad_bias = op_from_spec(spec).backward(
            grad_output.contiguous(), x, weight, bias, need_input, need_bias, indices, need, backend
        )
    grad_values = [
        torch.zeros_like(vals) if grad is None else (grad * scale).to(vals.dtype)
        for grad, vals, scale in zip(grad_values, values, scales)
    ]
    grad_input = x.new_empty(0) if grad_input is None else grad_input.to(x.dtype)
    grad_bias = x.new_empty(0) if grad_bias is None or not need_bias else grad_bias.to(bias.dtype)
    return grad_input, grad_values, grad_bias


@sparse_delta_backward.register_fake
def _(grad_output, x, weight, bias, indices, values, scales, spec, backend, need_input, need_values, need_bias):
    grad_input = torch.empty_like(x) if need_input else x.new_empty(0)
    grad_bias = torch.empty_like(bias) if need_bias and bias is not None else x.new_empty(0)
    return grad_input, [torch.empty_like(vals) for vals in values], grad_bias


def _setup_context(ctx, inputs, output):
    x, weight, bias, indices, values, scales, spec, backend = inputs
    ctx.save_for_backward(x, weight, *(() if bias is None else (bias,)), *indices, *values)
    ctx.has_bias, ctx.count = bias is not None, len(indices)
    ctx.scales, ctx.spec, ctx.backend = scales, spec, backend


def _backward(ctx, grad_output):
    x, weight, *rest = ctx.saved_tensors
    bias = rest.pop(0) if ctx.has_bias else None
    indices, values = rest[: ctx.count], rest[ctx.count :]
    need = ctx.needs_input_grad
    grad_input, grad_values, grad_bias = torch.ops.peft_sara.sparse_delta_backward(
        grad_output,
        x,
        weight,
        bias,
        indices,
        values,
        ctx.scales,
        ctx.spec,
        ctx.backend,
        need[0],
        [bool(wanted) for wanted in need[4]],
        ctx.has_bias and bool(need[2]),
    )
    return (
        grad_input if need[0] else None,
        None,
        grad_bias if ctx.has_bias and need[2] else None,
        [None] * ctx.count,
        grad_values,
        None,
        None,
        None,
    )


sparse_delta.register_autograd(_backward, setup_context=_setup_context)


def compiled_sparse_delta(
    op: SparseDeltaOp,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    indices_per_adapter: Sequence[torch.Tensor],
    values_per_adapter: Sequence[torch.Tensor],
    scales: Sequence[float],
    backend: str,
) -> torch.Tensor:
    """:func:`peft_sara.functional.sparse_delta_forward` through the registered op (what a compiled layer runs)."""
    return torch.ops.peft_sara.sparse_delta(
        x,
        weight,
        bias,
        list(indices_per_adapter),
        list(values_per_adapter),
        [float(scale) for scale in scales],
        op_spec(op),
        backend,
    )


__all__ = ["compiled_sparse_delta", "op_from_spec", "op_spec"]
