"""Pure PyTorch masked-weight operations: the reference every fused kernel is tested against.

Every function works on any device and dtype. Weight-gradient functions build the dense out x in gradient
transiently (one GEMM) and gather the trainable entries from it; nothing dense outlives the call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..masks import compute_dtype


def patched_values(entries: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """``cast(entries + scale * values)`` in the entries' dtype, summed in :func:`~peft_sara.masks.compute_dtype`
    (differentiable in ``values``): the one definition of a patched weight entry, for patch, merge and dense copies."""
    compute = compute_dtype(entries.dtype, values.dtype)
    return entries.to(compute).add(values.to(compute), alpha=scale).to(entries.dtype)


def patch_entries_(
    flat_weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """Write ``w[i] = cast(float(w[i]) + scale * values)`` in place; return the overwritten entries."""
    indices = indices.long()  # no-op for int64; scatter_ with int64 is several times faster than index_put_
    saved = flat_weight.index_select(0, indices)
    flat_weight.scatter_(0, indices, patched_values(saved, values, scale))
    return saved


def restore_entries_(flat_weight: torch.Tensor, indices: torch.Tensor, saved: torch.Tensor) -> None:
    """Write back entries returned by :func:`patch_entries_` (bitwise restore)."""
    flat_weight.scatter_(0, indices.long(), saved)


def linear_weight_grad_values(
    grad_output: torch.Tensor, inputs: torch.Tensor, indices_per_adapter: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Entries of ``grad_output.T @ inputs`` (an out x in weight gradient) at each flat index set, as float32 (float64 for
    float64 inputs).

    ``grad_output`` is (N, out) and ``inputs`` (N, in), both 2-D.
    """
    dense = (grad_output.t() @ inputs.to(grad_output.dtype)).reshape(-1)
    return [dense.index_select(0, indices).to(compute_dtype(dense.dtype)) for indices in indices_per_adapter]
