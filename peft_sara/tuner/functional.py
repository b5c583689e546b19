"""The sparse-update op ``op(x, W ⊕ Δ)`` ("unstructured backpropagation"), in two paths.

The effective weight of a SaRA layer is the frozen base weight with each adapter's entries replaced by
``cast(w + scale * delta)``. The base weight is never written (merging aside):

* **main path** (plain floating base weight, no hooks): :func:`sparse_delta_forward` builds the effective weight out
  of place for the call (one weight-sized temporary, never stored) and runs the module's dense op on it. Training saves
  only the input and the 1-D values; backward rebuilds the effective weight for the input gradient and produces the
  weight gradient only at the trainable entries (the dense GEMM + gather on CPU, the fused SDDMM / masked GEMM on
  CUDA). The same code runs eager, under ``torch.no_grad`` and under ``torch.compile`` (dynamo traces it).
* **composable path** (a base layer that must run its own forward: hooks, offloading, layerwise casting, quantized or
  meta storage): ``base_layer(x) + op(x, Δ)`` with :func:`update_contribution`.

:func:`peft_sara.tuner.base_weight.execution_path` chooses between them (from the layer's storage backend and the base
layer's hooks); every caller asks it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .selection import compute_dtype


class SparseEntries(NamedTuple):
    """One set of sparse entries of a weight: ``indices`` (flat, row-major; int32 or int64), their deltas ``values``
    and the adapter's ``scale`` (a float, or a 0-d tensor so that compiled graphs do not specialise on it).

    ``live_count`` (a 0-d integer tensor) marks a fixed-capacity trainable set after a re-selection: entries from that
    position on are an inert, zero tail that must get no gradient. ``None``: every entry is live.
    """

    indices: torch.Tensor
    values: torch.Tensor
    scale: float | torch.Tensor
    live_count: torch.Tensor | None = None


@dataclass(frozen=True)
class SparseUpdate:
    """One adapter's update of one layer: ``weight.view(-1)[indices] += scale * values`` (trainable and frozen entries).

    ``indices`` are int64 flat indices into the base weight (row-major), ``values`` the deltas (detached; float32, or
    float64 for a float64 base), ``weight_shape`` the base weight's shape.
    """

    indices: torch.Tensor
    values: torch.Tensor
    scale: float
    weight_shape: torch.Size

    def to_dense(self) -> torch.Tensor:
        """Dense ``scale * Delta_W`` (in the values' dtype) shaped like the base weight."""
        entries = [SparseEntries(self.indices, self.values, self.scale)]
        return dense_delta(self.weight_shape, entries, self.values.device)


@runtime_checkable
class SparseDeltaOp(Protocol):
    """The contract between a SaRA layer and :func:`sparse_delta_forward`: the dense op of one module kind.

    A new module type (e.g. ``nn.Embedding``) is a layer class whose ``_op`` returns one of these, plus the op itself.
    ``forward`` computes the module's output from a weight; ``backward`` returns the input gradient, the weight
    gradient sampled at each flat index set (float32 or float64, ``None`` where not needed) and the bias gradient
    (``None`` unless ``need_bias``). ``weight`` is the effective weight when ``need_input``, else only its shape counts.
    """

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def backward(
        self,
        grad_output: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        need_input: bool,
        need_bias: bool,
        indices_per_set: Sequence[torch.Tensor],
        need_values: Sequence[bool],
        backend: str,
    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None], torch.Tensor | None]: ...


@dataclass(frozen=True)
class LinearOp:
    """``y = x W^T + b`` (``transposed=True``: transformers' ``Conv1D``, ``y = x W + b`` with W of shape in x out)."""

    transposed: bool = False

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight.t() if self.transposed else weight, bias)

    def backward(self, grad_output, x, weight, bias, need_input, need_bias, indices_per_set, need_values, backend):
        grad_input = None
        if need_input:
            grad_input = grad_output @ (weight.t() if self.transposed else weight).to(grad_output.dtype)
        grad_values = [None] * len(indices_per_set)
        wanted = [i for i, need in enumerate(need_values) if need]
        if wanted:
            grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
            x_2d = x.reshape(-1, x.shape[-1])
            if self.transposed:  # weight is in x out: its gradient is x^T g
                grad_2d, x_2d = x_2d.to(grad_output.dtype), grad_2d
            sampled = kernels.linear_weight_grad_values(grad_2d, x_2d, [indices_per_set[i] for i in wanted], backend)
            for i, values in zip(wanted, sampled):
                grad_values[i] = values
        grad_bias = None
        if bias is not None and need_bias:
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

    def backward(self, grad_output, x, weight, bias, need_input, need_bias, indices_per_set, need_values, backend):
        need_weight = any(need_values)
        need_bias = bias is not None and need_bias
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
        grad_values = [None] * len(indices_per_set)
        if need_weight:
            flat_grad = grad_weight.reshape(-1)
            for i, (indices, need) in enumerate(zip(indices_per_set, need_values)):
                if need:
                    grad_values[i] = flat_grad.index_select(0, indices).to(compute_dtype(flat_grad.dtype))
        return grad_input, grad_values, grad_bias.to(bias.dtype) if need_bias else None


def effective_weight(weight: torch.Tensor, entries: Sequence[SparseEntries]) -> torch.Tensor:
    """The weight with each set's entries replaced by ``cast(w + scale * delta)``, built out of place (one contiguous
    weight-sized tensor); differentiable in the values. Sets apply in order; ``weight`` is only read."""
    if weight.requires_grad:
        weight = weight.detach()
    shares_weight = weight.is_contiguous()
    flat = weight.reshape(-1)  # a view of a contiguous weight, else a row-major copy of its own
    for entry in entries:
        if entry.values.dtype == flat.dtype in _OWN_COMPUTE_DTYPES and not isinstance(entry.scale, torch.Tensor):
            increment, alpha = entry.values, entry.scale  # the common case: one op, no temporary
        else:
            increment, alpha = _increment(flat, entry, compute_dtype(flat.dtype, entry.values.dtype)), 1
        if shares_weight:  # the first set copies the weight as it adds (one pass), later sets add into that copy
            flat, shares_weight = torch.index_add(flat, 0, entry.indices, increment, alpha=alpha), False
        else:
            flat.index_add_(0, entry.indices, increment, alpha=alpha)
    if shares_weight:  # no entries: still a tensor of its own
        flat = flat.clone()
    return flat.view(weight.shape)


# Dtypes that are their own compute dtype (see `compute_dtype`): entries add as `scale * delta` in one op.
_OWN_COMPUTE_DTYPES = (torch.float32, torch.float64)


def _increment(flat: torch.Tensor, entry: SparseEntries, compute: torch.dtype) -> torch.Tensor:
    """What to add at ``entry.indices`` so that each entry becomes ``cast(w + scale * delta)``: ``scale * delta`` where
    the weight's dtype is the compute dtype; for narrower weights the difference of the rounded sum
    (``kernels.reference.patched_values``, the one formula) and the entry (a zero delta, e.g. an inert tail entry, adds
    an exact zero either way)."""
    if flat.dtype == compute:
        return entry.values.to(compute) * entry.scale
    base = flat.index_select(0, entry.indices)
    patched = kernels.reference.patched_values(base, entry.values, entry.scale)
    return (patched.to(compute) - base.to(compute)).to(flat.dtype)


class _SparseDeltaFunction(torch.autograd.Function):
    """``op(x, operand, bias)`` where the operand is ``effective_weight(weight, entries)`` (main path), or the dense
    update alone when ``weight`` is a shape (composable path). Saves only ``x`` and the values (the weight and bias are
    frozen references), and rebuilds the operand in backward when the input gradient is needed."""

    @staticmethod
    def forward(ctx, x, weight, bias, op, scales, live_counts, backend, count, *indices_and_values):
        entries = _entries(indices_and_values, count, scales, live_counts)
        output = op.forward(x, _operand(weight, entries, x), bias)
        ctx.weight_shape = weight if isinstance(weight, torch.Size) else None
        ctx.save_for_backward(x, None if ctx.weight_shape else weight, bias, *indices_and_values)
        ctx.op, ctx.scales, ctx.live_counts, ctx.backend, ctx.count = op, scales, live_counts, backend, count
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, bias, *indices_and_values = ctx.saved_tensors
        weight = ctx.weight_shape or weight
        entries = _entries(indices_and_values, ctx.count, ctx.scales, ctx.live_counts)
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: gradients with a graph (double backward)
            return _differentiable_backward(ctx, grad_output, x, weight, bias, entries)
        need_values = list(needs[8 + ctx.count :])
        grad_output = grad_output.contiguous()
        indices = [entry.indices for entry in entries]
        grad_input = None
        if needs[0]:  # the input gradient first, so the rebuilt operand is freed before the weight-gradient GEMM
            operand = _operand(weight, entries, x)
            grad_input, _, _ = ctx.op.backward(
                grad_output, x, operand, bias, True, False, indices, [False], ctx.backend
            )
            del operand
        # Only the operand's shape matters for the weight and bias gradients.
        shaped = weight if ctx.weight_shape is None else x.new_zeros(()).expand(ctx.weight_shape)
        _, grad_values, grad_bias = ctx.op.backward(
            grad_output, x, shaped, bias, False, needs[2], indices, need_values, ctx.backend
        )
        grad_values = [
            None if grad is None else _scaled_live_gradient(grad, entry).to(entry.values.dtype)
            for grad, entry in zip(grad_values, entries)
        ]
        if grad_input is not None:
            grad_input = grad_input.to(x.dtype)
        return (grad_input, None, grad_bias, None, None, None, None, None, *([None] * ctx.count), *grad_values)


def _operand(weight: torch.Tensor | torch.Size, entries: Sequence[SparseEntries], x: torch.Tensor) -> torch.Tensor:
    """The effective weight (``weight`` a tensor), or the dense update in ``x``'s dtype (``weight`` a shape)."""
    if isinstance(weight, torch.Size):
        return dense_delta(weight, entries, x.device).to(x.dtype)
    return effective_weight(weight, entries)


def _entries(indices_and_values, count, scales, live_counts) -> list[SparseEntries]:
    indices, values = indices_and_values[:count], indices_and_values[count:]
    return [SparseEntries(*parts) for parts in zip(indices, values, scales, live_counts)]


def _scaled_live_gradient(grad: torch.Tensor, entry: SparseEntries) -> torch.Tensor:
    """The sampled weight gradient times the scale, zero on an inert tail (entries at or after ``live_count``)."""
    grad = grad * entry.scale
    return _without_inert_tail(grad, entry)


def _without_inert_tail(per_entry: torch.Tensor, entry: SparseEntries) -> torch.Tensor:
    """``per_entry`` (one value per entry of ``entry``) with the inert tail (positions at or after ``live_count``)
    zeroed; as it is when every entry is live."""
    if entry.live_count is None:
        return per_entry
    positions = torch.arange(per_entry.shape[0], device=per_entry.device)
    return per_entry * (positions < entry.live_count.to(per_entry.device))


def _differentiable_backward(ctx, grad_output, x, weight, bias, entries):
    """Backward through a differentiable recomputation, so that ``create_graph=True`` (gradient penalties, double
    backward) gets gradients with a graph, equal to the dense reference."""
    needs = ctx.needs_input_grad
    first_value = 8 + ctx.count
    inputs = {0: x} | {first_value + i: entry.values for i, entry in enumerate(entries)}
    if bias is not None and needs[2]:
        inputs[2] = bias
    wanted = {position: tensor for position, tensor in inputs.items() if needs[position]}
    with torch.enable_grad():
        output = ctx.op.forward(x, _operand(weight, entries, x).to(x.dtype), bias)
        grads = torch.autograd.grad(output, list(wanted.values()), grad_output, create_graph=True, allow_unused=True)
    result = [None] * (first_value + len(entries))
    for position, grad in zip(wanted, grads):
        result[position] = grad
    for i, entry in enumerate(entries):
        if result[first_value + i] is not None:
            result[first_value + i] = _without_inert_tail(result[first_value + i], entry)
    return tuple(result)


def sparse_delta_forward(
    op: SparseDeltaOp,
    x: torch.Tensor,
    weight: torch.Tensor | torch.Size,
    bias: torch.Tensor | None,
    entries: Sequence[SparseEntries],
    backend: str = "reference",
) -> torch.Tensor:
    """``op(x, W ⊕ Δ, bias)`` with the effective weight built for this call only (``weight`` a tensor: the main path),
    or ``op(x, Δ)`` (``weight`` the weight's shape: the composable path's share); differentiable in ``x``, the bias
    and the values, saving only ``x`` and the values (only what autograd needs is computed)."""
    if not torch.is_grad_enabled():  # inference
        return op.forward(x, _operand(weight, entries, x), bias)
    if not (
        x.requires_grad
        or any(entry.values.requires_grad for entry in entries)
        or (bias is not None and bias.requires_grad)
    ):
        with torch.no_grad():
            return op.forward(x, _operand(weight, entries, x), bias)
    return _SparseDeltaFunction.apply(
        x,
        weight,
        bias,
        op,
        tuple(entry.scale for entry in entries),
        tuple(entry.live_count for entry in entries),
        backend,
        len(entries),
        *(entry.indices for entry in entries),
        *(entry.values for entry in entries),
    )


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its own ``forward``: torch hooks, or a forward replaced on the
    instance (accelerate's `_hf_hook`, diffusers' hook registry). SaRA must then call the module itself."""
    return bool(module._forward_pre_hooks or module._forward_hooks or "forward" in vars(module))


def update_contribution(
    op: SparseDeltaOp,
    x: torch.Tensor,
    weight_shape: torch.Size,
    entries: Sequence[SparseEntries],
    backend: str = "reference",
) -> torch.Tensor:
    """``op(x, Delta_W)`` without bias: the sparse update's share of the output, differentiable in ``x`` and the values.

    The composable path adds this to the base layer's own output; it never reads the base weight, so offloaded, cast
    or quantized storage is fine. ``Delta_W`` is formed densely for the call (one weight-sized temporary) and again in
    backward: training saves ``x`` and the values, not ``Delta_W``.
    """
    return sparse_delta_forward(op, x, torch.Size(weight_shape), None, entries, backend)


def dense_delta(weight_shape: torch.Size, entries: Sequence[SparseEntries], device: torch.device) -> torch.Tensor:
    """Dense ``sum scale * Delta_W`` shaped like the weight, in the values' compute dtype, differentiable in them.
    An inert tail (zero values) adds nothing; its gradient is zeroed."""
    compute = compute_dtype(*(entry.values.dtype for entry in entries))
    delta = torch.zeros(weight_shape.numel(), dtype=compute, device=device)
    for entry in entries:
        values = entry.values.to(device=device, dtype=compute) * entry.scale
        if values.requires_grad:
            values = _without_inert_tail(values, entry)
        delta = delta.index_add(0, entry.indices.to(device), values)
    return delta.view(weight_shape)


@contextlib.contextmanager
def offload_hooks_run(*containers: nn.Module) -> Iterator[None]:
    """Run accelerate's offload hooks of tensor containers around their use.

    ``cpu_offload`` hooks every module that holds tensors, a SaRA layer's value / index dicts too, but loads a module's
    tensors only when that module's forward runs; the dicts have no forward, so their hooks run here instead.
    """
    hooked = [container for container in containers if hasattr(container, "_hf_hook")]
    for container in hooked:
        container._hf_hook.pre_forward(container)
    try:
        yield
    finally:
        for container in hooked:
            container._hf_hook.post_forward(container, None)
