"""Choosing the trainable ("temporarily ineffective") entries of a pre-trained weight.

A selection is a sorted 1-D tensor of flat indices into the weight (int32 where the weight is small enough) plus the
magnitude cutoff it implies, which progressive re-selection reuses: an entry counts as ineffective while
``|w| <= cutoff`` (compared in float32), so the cutoff is the largest magnitude that still counts.

Re-selection only shrinks a trainable set, in place (:func:`compact_`): the survivors move to the front of the
fixed-capacity tensors (values, indices, gradients, optimizer moments) and the freed tail is zeroed.
"""

from __future__ import annotations

import math
import sys

import numpy
import torch

# FSDP2's sharded parameters are DTensors. Their module is looked up, not imported: a tensor can only be a DTensor once
# torch.distributed.tensor is loaded (optional in PyTorch builds), and importing it costs ~0.5 s that reading an
# adapter file (`peft-sara inspect`) does not need.
_DTENSOR_MODULE = "torch.distributed.tensor"

INT32_LIMIT = 2**31 - 1


def value_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """Dtype of an adapter's values for a base weight of ``weight_dtype``: the base's own floating dtype (PEFT's
    convention: ``autocast_adapter_dtype=True``, the default, then upcasts float16 / bfloat16 values to float32), and
    float32 for non-floating (quantized) storage."""
    return weight_dtype if weight_dtype.is_floating_point and weight_dtype.itemsize >= 2 else torch.float32


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype ``w + scale * delta`` is computed in: float32, or wider if an operand is (float64 stays float64)."""
    result = torch.float32
    for dtype in dtypes:
        if dtype.is_floating_point and dtype.itemsize > 4:
            result = dtype
    return result


def index_dtype_for(numel: int) -> torch.dtype:
    """Smallest integer dtype that can address ``numel`` entries."""
    return torch.int32 if numel <= INT32_LIMIT else torch.int64


def threshold_cutoff(threshold: float) -> float:
    """The cutoff of ``|w| < threshold``: the largest float32 magnitude below the threshold (as float32), so that
    ``|w| <= threshold_cutoff(threshold)`` selects exactly the entries with ``|w| < threshold``."""
    as_float32 = torch.tensor(threshold, dtype=torch.float32)
    return torch.nextafter(as_float32, torch.tensor(-torch.inf)).item()


def select_trainable_indices(
    weight: torch.Tensor, threshold: float | None = None, trainable_fraction: float | None = None
) -> tuple[torch.Tensor, float]:
    """Flat indices (ascending) of the entries to train, and the inclusive magnitude cutoff that selected them.

    With ``threshold``: every entry with ``|w| < threshold`` (the paper's rule, compared in float32); the cutoff is
    :func:`threshold_cutoff` of it. With ``trainable_fraction``: the ``max(1, round(fraction * numel))``
    smallest-magnitude entries (ties broken by position); the cutoff is the largest selected magnitude. Either way an
    entry is ineffective while ``|w| <= cutoff``, so entries tied with the cutoff (zero-initialised layers, quantised
    weights) stay trainable at re-selection as long as they have not grown.

    Costs about one pass over the weight: the fraction's cutoff is the k-th smallest magnitude among the few entries
    below a bound estimated from a sample (:func:`smallest_magnitudes`), not a sort of the whole weight.
    """
    if (threshold is None) == (trainable_fraction is None):
        raise ValueError("Pass exactly one of `threshold` and `trainable_fraction`.")
    flat = gathered(weight).detach().reshape(-1)
    numel = flat.numel()
    index_dtype = index_dtype_for(numel)
    if threshold is not None:
        cutoff = threshold_cutoff(threshold)
        indices, _ = entries_at_most(flat, bound_in_dtype(cutoff, magnitude_dtype(flat.dtype)))
        return indices.to(index_dtype), cutoff
    count = min(numel, max(1, round(trainable_fraction * numel)))
    indices, cutoff = smallest_magnitudes(flat, count)
    return indices.to(index_dtype), cutoff


def magnitude_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``|w|`` is compared in: float32, bfloat16 and float16 stay as they are (their conversion to float32 is
    exact and keeps the order), anything else (float64, integers) is converted to float32, as the selection rule
    compares in float32."""
    return weight_dtype if weight_dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def bound_in_dtype(bound: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` that is ``<= bound``, as a float: comparing a ``dtype`` tensor with it (PyTorch
    compares a tensor and a Python number in the tensor's dtype) selects exactly the entries whose float32 value is
    ``<= bound``."""
    as_dtype = torch.tensor(bound, dtype=torch.float64).to(dtype)
    if as_dtype.item() > bound:
        as_dtype = torch.nextafter(as_dtype, torch.tensor(-math.inf, dtype=dtype))
    return as_dtype.item()


# Entries per step of the pass over a weight on CPU: its magnitudes and mask stay in the cache.
CHUNK_SIZE = 2**18
# A magnitude dtype's bits as a signed integer, and the mask that clears the sign bit: for |w| (NaN included) the
# integers order exactly as the floats do, and NaN lies above inf.
_MAGNITUDE_BITS = {
    torch.float32: (torch.int32, numpy.int32, 0x7FFFFFFF),
    torch.bfloat16: (torch.int16, numpy.int16, 0x7FFF),
    torch.float16: (torch.int16, numpy.int16, 0x7FFF),
}


def entries_at_most(flat: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (ascending, int64) and magnitudes (in :func:`magnitude_dtype`) of the entries of the 1-D ``flat``
    with ``|w| <= bound`` (``bound`` a value of that dtype, see :func:`bound_in_dtype`; NaN is never selected), in one
    pass."""
    dtype = magnitude_dtype(flat.dtype)
    if flat.device.type != "cpu":
        magnitudes = flat.abs().to(dtype)
        positions = torch.nonzero(magnitudes <= bound).reshape(-1)
        return positions, magnitudes[positions]
    # On CPU, chunk by chunk into reused buffers (no weight-sized temporaries), on the magnitudes' bits with NumPy
    # (its compare and nonzero are several times faster than PyTorch's CPU kernels for a boolean result).
    torch_bits, numpy_bits, magnitude_mask = _MAGNITUDE_BITS[dtype]
    bound_bits = torch.tensor(bound, dtype=dtype).view(torch_bits).item()
    size = min(CHUNK_SIZE, flat.numel())
    bits, mask = numpy.empty(size, dtype=numpy_bits), numpy.empty(size, dtype=numpy.bool_)
    positions, values = [], []
    for start in range(0, flat.numel(), size):
        chunk = flat[start : start + size]
        if chunk.dtype != dtype:
            chunk = chunk.abs().to(dtype)
        chunk_bits, chunk_mask = bits[: chunk.numel()], mask[: chunk.numel()]
        numpy.bitwise_and(chunk.view(torch_bits).numpy(), magnitude_mask, out=chunk_bits)
        numpy.less_equal(chunk_bits, bound_bits, out=chunk_mask)
        local = numpy.flatnonzero(chunk_mask)
        if local.size:
            values.append(torch.from_numpy(chunk_bits[local]).view(dtype))
            positions.append(torch.from_numpy(local + start))
    if not positions:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=dtype)
    return torch.cat(positions), torch.cat(values)


# Entries drawn to estimate the bound below which the k smallest magnitudes lie (a sample costs a cache miss per entry).
SAMPLE_SIZE = 2**14
# How far (in standard deviations of the sample quantile) the first bound lies above the estimate of the k-th
# magnitude; each next try (rarely needed) doubles the distance, and the last takes every magnitude.
BOUND_MARGIN = 5.0
BOUND_TRIES = 3


def smallest_magnitudes(flat: torch.Tensor, count: int) -> tuple[torch.Tensor, float]:
    """Flat indices (ascending, int64) of the ``count`` smallest magnitudes of the 1-D ``flat``, ties broken by
    position, and the largest of them as a float: exactly the first ``count`` entries of a stable ascending argsort of
    ``|flat|`` in float32 (NaN last).

    One pass: a bound is estimated from a seeded sample (a private generator: the global RNG is left alone) so that a
    little more than ``count`` entries lie at or below it; those are gathered in position order, and the cutoff is
    their ``count``-th smallest value. If the bound falls short, another pass tries a larger one, the last every magnitude but NaN.
    """
    numel = flat.numel()
    if not 1 <= count <= numel:
        raise ValueError(f"Cannot select {count} of {numel} entries.")
    for bound in [*_estimated_bounds(flat, count), math.inf]:
        positions, values = entries_at_most(flat, bound)
        if positions.numel() >= count:
            break
    else:  # fewer than `count` magnitudes are not NaN: the stable sort's order (NaN last, then by position)
        magnitudes = flat.abs().float()
        order = torch.argsort(magnitudes, stable=True)[:count]
        return torch.sort(order).values, magnitudes[order[-1]].item()
    cutoff = torch.kthvalue(values, count).values if count < values.numel() else values.max()
    below = values < cutoff
    tied = values == cutoff
    # All entries below the cutoff, then the first tied ones (in position order) up to `count`.
    keep = below | (tied & (torch.cumsum(tied, 0) <= count - int(below.sum())))
    return positions[keep], cutoff.item()


def _estimated_bounds(flat: torch.Tensor, count: int) -> list[float]:
    """Increasing magnitudes, each likely to have at least ``count`` entries at or below it (estimated from a seeded
    sample of ``flat``); empty when the sample would be most of the weight."""
    numel = flat.numel()
    if numel <= 4 * SAMPLE_SIZE:
        return []
    # One entry at a random place in each of SAMPLE_SIZE equal strides: ascending positions (cheaper to read).
    generator = torch.Generator(device="cpu").manual_seed(numel)
    stride = numel // SAMPLE_SIZE
    positions = torch.arange(SAMPLE_SIZE) * stride + torch.randint(0, stride, (SAMPLE_SIZE,), generator=generator)
    sample = flat[positions.to(flat.device)].abs().to(magnitude_dtype(flat.dtype)).float()
    quantile = count / numel
    spread = (quantile * (1 - quantile) / SAMPLE_SIZE) ** 0.5 + 1 / SAMPLE_SIZE
    bounds = []
    for attempt in range(BOUND_TRIES):
        estimate = quantile + BOUND_MARGIN * 2**attempt * spread
        if estimate >= 1:
            break
        bound = torch.kthvalue(sample, max(1, math.ceil(estimate * SAMPLE_SIZE))).values.item()
        if not math.isfinite(bound):
            break
        bounds.append(bound)
    return bounds


def still_ineffective(current_values: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Boolean mask over a layer's trainable entries: those whose current value is still within the cutoff
    (``|w| <= cutoff`` in float32; see :func:`select_trainable_indices`)."""
    return current_values.detach().float().abs() <= cutoff


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (e.g. a parameter sharded by FSDP2's ``fully_shard``)."""
    dtensor = getattr(sys.modules.get(_DTENSOR_MODULE), "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded ``DTensor`` (FSDP2) is all-gathered (a collective: call it on every rank)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def write_prefix_(tensor: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """In place: ``tensor`` becomes ``prefix`` followed by zeros, keeping its size, storage and identity.

    A sharded ``DTensor`` (FSDP2) keeps its placements: each rank writes its own shard of the result.
    """
    if prefix.numel() > tensor.shape[0]:
        raise ValueError(f"{prefix.numel()} entries do not fit into a tensor of capacity {tensor.shape[0]}.")
    if not is_sharded(tensor):  # one pass, no temporary
        if (
            prefix.device == tensor.device
            and prefix.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
        ):
            prefix = prefix.clone()  # a view into `tensor` itself
        tensor[: prefix.numel()].copy_(prefix)
        tensor[prefix.numel() :].zero_()
        return tensor
    result = torch.zeros(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    result[: prefix.numel()] = prefix.to(device=result.device, dtype=result.dtype)
    if is_sharded(tensor):
        from torch.distributed.tensor import DTensor, Replicate

        mesh = tensor.device_mesh
        result = DTensor.from_local(result, mesh, [Replicate()] * mesh.ndim).redistribute(mesh, tensor.placements)
    tensor.copy_(result)
    return tensor


def compact_(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Re-selection, in place: move the kept entries of ``tensor``'s live prefix to its front, zero everything after.

    ``keep`` is a boolean mask over the first ``keep.numel()`` entries (the live ones); their order is kept. The
    tensor keeps its size, storage and identity, so a Parameter stays the one that DDP, FSDP, optimizers and compiled
    graphs hold. Used alike for values, indices, gradients and per-entry optimizer state. Returns ``tensor``.
    """
    full = gathered(tensor)
    return write_prefix_(tensor, full[: keep.numel()][keep.to(full.device)])


def check_entries(
    indices: torch.Tensor, values: torch.Tensor | None, numel: int, where: str, out_of_range_hint: str = ""
) -> None:
    """Raise a ``ValueError`` that starts with ``where`` unless ``indices`` (and ``values``) are valid flat entries.

    Valid: 1-D integer indices within ``[0, numel)``; 1-D floating values, one per index. ``out_of_range_hint`` ends
    the message of an index outside the weight.
    """
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype in (torch.bool, torch.uint8):
        raise ValueError(
            f"{where}: indices must be a 1-D integer tensor, got dtype {indices.dtype} and shape {tuple(indices.shape)}."
        )
    if values is not None:
        if values.dim() != 1 or not values.dtype.is_floating_point:
            raise ValueError(
                f"{where}: values must be a 1-D floating tensor, got dtype {values.dtype} and shape "
                f"{tuple(values.shape)}."
            )
        if values.numel() != indices.numel():
            raise ValueError(f"{where}: {indices.numel()} indices but {values.numel()} values.")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise ValueError(
            f"{where}: indices span [{int(indices.min())}, {int(indices.max())}] but the weight has {numel} entries."
            + (f" {out_of_range_hint}" if out_of_range_hint else "")
        )
