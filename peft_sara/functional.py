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
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .masks import compute_dtype

_STORAGE_LOCKS: dict[tuple[str, int | None, int], threading.RLock] = {}
_STORAGE_LOCKS_GUARD = threading.Lock()


def storage_lock(tensor: torch.Tensor) -> threading.RLock:
    """The lock of ``tensor``'s storage: held while its entries are patched, so that concurrent forwards (inference
    servers), merges and unmerges of one weight never see each other's patched entries."""
    key = (tensor.device.type, tensor.device.index, tensor.untyped_storage().data_ptr())
    lock = _STORAGE_LOCKS.get(key)  # a plain dict read is atomic; only creation needs the guard
    if lock is None:
        with _STORAGE_LOCKS_GUARD:
            lock = _STORAGE_LOCKS.setdefault(key, threading.RLock())
    return lock


class patched_weight:  # noqa: N801 (used as a function: `with patched_weight(...) as weight`)
    """Temporarily write each adapter's update into ``weight``; restores the base entries bitwise on exit.

    Holds the weight's :func:`storage_lock` throughout and runs without grad. The weight's autograd version counter is
    preserved: its content is bitwise the same afterwards, so an untargeted op that saved the same weight for backward
    stays valid. A plain class rather than a generator context manager: it runs twice per layer and training step.
    """

    __slots__ = ("weight", "indices", "values", "scales", "backend", "flat", "saved", "lock", "version", "grad_mode")

    def __init__(
        self,
        weight: torch.Tensor,
        indices_per_adapter: Sequence[torch.Tensor],
        values_per_adapter: Sequence[torch.Tensor],
        scales: Sequence[float],
        backend: str,
    ) -> None:
        if not weight.is_contiguous():
            raise RuntimeError(
                f"SaRA needs a contiguous base weight, got strides {weight.stride()} for shape {tuple(weight.shape)}. "
                "Convert the model with `.to(memory_format=torch.contiguous_format)`."
            )
        if backend == "reference":  # scatter needs int64: convert once for patch and restore
            indices_per_adapter = [kernels.reference.as_int64(indices) for indices in indices_per_adapter]
        self.weight, self.indices, self.values, self.scales = weight, indices_per_adapter, values_per_adapter, scales
        self.backend = backend

    def __enter__(self) -> torch.Tensor:
        weight = self.weight
        self.flat = weight.detach().view(-1)
        self.saved = []
        self.lock = storage_lock(weight)
        self.lock.acquire()
        self.version, self.grad_mode = weight._version, torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            for indices, values, scale in zip(self.indices, self.values, self.scales):
                self.saved.append(kernels.patch_entries_(self.flat, indices, values, scale, self.backend))
        except BaseException:
            self.__exit__()
            raise
        return weight

    def __exit__(self, *exc_info: object) -> None:
        try:
            for indices, saved in zip(reversed(self.indices[: len(self.saved)]), reversed(self.saved)):
                kernels.restore_entries_(self.flat, indices, saved, self.backend)
            torch._C._autograd._unsafe_set_version_counter((self.weight,), (self.version,))
        finally:
            self.saved = []
            torch.set_grad_enabled(self.grad_mode)
            self.lock.release()


@dataclass(frozen=True)
class SparseUpdate:
    """One adapter's update of one layer: ``weight.view(-1)[indices] += scale * values`` (trainable and frozen entries).

    ``indices`` are int64 flat indices into the base weight (row-major), ``values`` the deltas (detached; float32, or
    float64 for a float64 base),
    ``weight_shape`` the base weight's shape.
    """

    indices: torch.Tensor
    values: torch.Tensor
    scale: float
    weight_shape: torch.Size

    def to_dense(self) -> torch.Tensor:
        """Dense ``scale * Delta_W`` (in the values' dtype) shaped like the base weight."""
        return dense_delta(self.weight_shape, [self.indices], [self.values], [self.scale], self.values.device)


@runtime_checkable
class SparseDeltaOp(Protocol):
    """The contract between a SaRA layer and :func:`sparse_delta_forward`: the dense op of one module kind.

    A new module type (e.g. ``nn.Embedding``) is a layer class whose ``_op`` returns one of these, plus the op itself.
    ``forward`` computes the module's output from an (already patched) weight; ``backward`` returns the input
    gradient, the weight gradient sampled at each adapter's flat ``indices`` (float32, ``None`` where not needed)
    and the bias gradient (``None`` unless ``need_bias``).
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

    def backward(self, grad_output, x, weight, bias, need_input, need_bias, indices_per_adapter, need_values, backend):
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

    def backward(self, grad_output, x, weight, bias, need_input, need_bias, indices_per_adapter, need_values, backend):
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
        grad_values = [None] * len(indices_per_adapter)
        if need_weight:
            flat_grad = grad_weight.reshape(-1)
            for i, (indices, need) in enumerate(zip(indices_per_adapter, need_values)):
                if need:
                    grad_values[i] = flat_grad.index_select(0, indices).to(compute_dtype(flat_grad.dtype))
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
        if torch.is_grad_enabled():  # create_graph=True: the gradients themselves must be differentiable
            return _differentiable_backward(ctx, grad_output, x, values_per_adapter)
        need_values = [need and scale != 0 for need, scale in zip(ctx.needs_input_grad[7:], ctx.scales)]
        with patched_weight(ctx.weight, ctx.indices_per_adapter, values_per_adapter, ctx.scales, ctx.backend):
            grad_input, grad_values, grad_bias = ctx.op.backward(
                grad_output.contiguous(),
                x,
                ctx.weight,
                ctx.bias,
                ctx.needs_input_grad[0],
                ctx.needs_input_grad[2],
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


# Dense kernels (oneDNN / MKL on CPU) may round differently depending on an operand's address modulo the vector width;
# a copy at the same offset keeps a zero-scale or untouched update bitwise equal to the base layer.
_ALIGNMENT_BYTES = 64


def _empty_aligned_like(weight: torch.Tensor) -> torch.Tensor:
    """An empty contiguous tensor like ``weight`` whose address has the same offset modulo 64 bytes."""
    itemsize = weight.element_size()
    offset = weight.data_ptr() % _ALIGNMENT_BYTES
    buffer = torch.empty(weight.numel() + 2 * _ALIGNMENT_BYTES // itemsize, dtype=weight.dtype, device=weight.device)
    shift = ((offset - buffer.data_ptr() % _ALIGNMENT_BYTES) % _ALIGNMENT_BYTES) // itemsize
    return buffer[shift : shift + weight.numel()].view(weight.shape)


def patched_copy(
    weight: torch.Tensor,
    indices_per_adapter: Sequence[torch.Tensor],
    values_per_adapter: Sequence[torch.Tensor],
    scales: Sequence[float],
    backend: str,
) -> torch.Tensor:
    """A copy of ``weight`` with each adapter's entries patched (not differentiable): what no-grad inference computes
    with, so that concurrent forwards and ``state_dict()`` never see a modified base weight."""
    copy = _empty_aligned_like(weight)
    copy.copy_(weight.detach())
    flat = copy.view(-1)
    for indices, values, scale in zip(indices_per_adapter, values_per_adapter, scales):
        kernels.patch_entries_(flat, indices, values.detach(), scale, backend)
    return copy


def effective_weight(
    weight: torch.Tensor,
    indices_per_adapter: Sequence[torch.Tensor],
    values_per_adapter: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> torch.Tensor:
    """The patched weight as a dense out-of-place copy, differentiable in the values when grad is enabled (double
    backward); under ``no_grad`` a plain copy for export, merge checks and tests. Never used by the fast path."""
    flat = weight.detach().reshape(-1)
    for indices, values, scale in zip(indices_per_adapter, values_per_adapter, scales):
        flat = flat.index_put(
            (indices,), kernels.reference.patched_values(flat.index_select(0, indices), values, scale)
        )
    return flat.view(weight.shape)


def _differentiable_backward(ctx, grad_output, x, values_per_adapter):
    """Backward through a dense, differentiable re-computation, so that ``create_graph=True`` (gradient penalties,
    double backward) gets gradients with a graph, equal to the dense reference."""
    needs = ctx.needs_input_grad
    inputs = {0: x} | {7 + i: values for i, values in enumerate(values_per_adapter)}
    if ctx.bias is not None and needs[2]:
        inputs[2] = ctx.bias
    wanted = {position: tensor for position, tensor in inputs.items() if needs[position]}
    with torch.enable_grad():
        weight = effective_weight(ctx.weight, ctx.indices_per_adapter, values_per_adapter, ctx.scales)
        output = ctx.op.forward(x, weight.to(x.dtype), ctx.bias)
        grads = torch.autograd.grad(output, list(wanted.values()), grad_output, create_graph=True, allow_unused=True)
    result = [None] * (7 + len(values_per_adapter))
    for position, grad in zip(wanted, grads):
        result[position] = grad
    return tuple(result)


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


def composable_reason(base_layer: nn.Module) -> str | None:
    """Why the in-place patch is unsafe for ``base_layer`` (its hooks would not run, or its weight cannot be patched),
    or ``None`` when it is safe. Layers with a reason run the base layer itself plus :func:`update_contribution`."""
    if has_forward_hooks(base_layer):
        return "the base layer has forward hooks (offloading, layerwise casting, ...)"
    return unpatchable_storage_reason(base_layer.weight)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its own ``forward``: torch hooks, or a forward replaced on the
    instance (accelerate's `_hf_hook`, diffusers' hook registry). SaRA must then call the module itself."""
    return bool(module._forward_pre_hooks or module._forward_hooks or "forward" in vars(module))


def unpatchable_storage_reason(weight: torch.Tensor) -> str | None:
    """Why SaRA cannot write into ``weight`` (meta, quantized or 8-bit storage), or ``None`` when it can."""
    if weight.device.type == "meta":
        return "the base weight is on the meta device (offloaded)"
    if type(weight) not in (nn.Parameter, torch.Tensor) or not weight.dtype.is_floating_point:
        return f"the base weight is a {type(weight).__name__} of dtype {weight.dtype} (quantized storage)"
    if weight.dtype.itemsize < 2:
        return f"the base weight is stored in {weight.dtype}"
    return None


def update_contribution(
    op: SparseDeltaOp,
    x: torch.Tensor,
    weight_shape: torch.Size,
    indices_per_adapter: Sequence[torch.Tensor],
    values_per_adapter: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> torch.Tensor:
    """``op(x, Delta_W)`` without bias: the sparse update's share of the output, differentiable in ``x`` and the values.

    The composable path adds this to the base layer's own output; it never reads the base weight, so offloaded, cast
    or quantized storage is fine. ``Delta_W`` is formed densely for the call (one weight-sized temporary).
    """
    delta = dense_delta(weight_shape, indices_per_adapter, values_per_adapter, scales, x.device)
    return op.forward(x, delta.to(x.dtype), None)


def dense_delta(
    weight_shape: torch.Size,
    indices_per_adapter: Sequence[torch.Tensor],
    values_per_adapter: Sequence[torch.Tensor],
    scales: Sequence[float],
    device: torch.device,
) -> torch.Tensor:
    """Dense ``sum scale * Delta_W`` shaped like the weight, in the values' compute dtype, differentiable in them."""
    compute = compute_dtype(*(values.dtype for values in values_per_adapter))
    delta = torch.zeros(weight_shape.numel(), dtype=compute, device=device)
    for indices, values, scale in zip(indices_per_adapter, values_per_adapter, scales):
        delta = delta.index_add(0, indices.to(device), values.to(device=device, dtype=compute) * scale)
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
