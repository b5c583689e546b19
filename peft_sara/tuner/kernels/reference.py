"""Pure PyTorch masked-weight operations: the reference every fused kernel is tested against.

Every function works on any device and dtype. Weight-gradient functions build the dense out x in gradient
transiently (one GEMM) and gather the trainable entries from it; nothing dense outlives the call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..selection import compute_dtype


def patched_values(entries: torch.Tensor, values: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``cast(entries + scale * values)`` in the entries' dtype, summed in :func:`~peft_sara.tuner.selection.compute_dtype`
    (differentiable in ``values``): the one definition of an adapted weight entry, used by the forward
    (``functional.effective_weight``), merges (``base_weight.merge_entries_``) and the load checks
    (``reader.effective_weight_problem``). ``scale`` may be a 0-d tensor (a hotswap slot's live scale)."""
    compute = compute_dtype(entries.dtype, values.dtype)
    if isinstance(scale, torch.Tensor):
        return (entries.to(compute) + values.to(compute) * scale.to(compute)).to(entries.dtype)
    if entries.dtype == values.dtype == compute:  # the common float32 case: no conversions to dispatch
        return entries.add(values, alpha=scale)
    return entries.to(compute).add(values.to(compute), alpha=scale).to(entries.dtype)


def linear_weight_grad_values(
    grad_output: torch.Tensor, inputs: torch.Tensor, indices_per_set: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Entries of ``grad_output.T @ inputs`` (an out x in weight gradient) at each flat index set, as float32 (float64 for
    float64 inputs).

    ``grad_output`` is (N, out) and ``inputs`` (N, in), both 2-D.
    """
    if inputs.dtype != grad_output.dtype:
        inputs = inputs.to(grad_output.dtype)
    dense = (grad_output.t() @ inputs).reshape(-1)
    compute = compute_dtype(dense.dtype)
    sampled = [dense.index_select(0, indices) for indices in indices_per_set]
    return sampled if compute == dense.dtype else [values.to(compute) for values in sampled]
