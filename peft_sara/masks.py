"""Choosing the trainable ("temporarily ineffective") entries of a pre-trained weight.

A selection is a sorted 1-D tensor of flat indices into the weight (int32 where the weight is small enough) plus the
magnitude cutoff it implies, which progressive re-selection reuses.
"""

from __future__ import annotations

import math

import torch

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


def select_trainable_indices(
    weight: torch.Tensor, threshold: float | None = None, trainable_fraction: float | None = None
) -> tuple[torch.Tensor, float]:
    """Flat indices (ascending) of the entries to train, and the strict magnitude cutoff that selected them.

    With ``threshold``: every entry with ``|w| < threshold`` (compared in float32). With ``trainable_fraction``: the
    ``max(1, round(fraction * numel))`` smallest-magnitude entries; the cutoff is then the smallest magnitude left out
    (``inf`` when everything is selected), so ``|w| < cutoff`` describes the same set up to ties.
    """
    if (threshold is None) == (trainable_fraction is None):
        raise ValueError("Pass exactly one of `threshold` and `trainable_fraction`.")
    magnitudes = weight.detach().reshape(-1).abs().float()
    index_dtype = index_dtype_for(magnitudes.numel())
    if threshold is not None:
        indices = torch.nonzero(magnitudes < threshold).reshape(-1)
        return indices.to(index_dtype), float(threshold)
    numel = magnitudes.numel()
    count = min(numel, max(1, round(trainable_fraction * numel)))
    order = torch.argsort(magnitudes, stable=True)
    cutoff = magnitudes[order[count]].item() if count < numel else math.inf
    indices = torch.sort(order[:count]).values
    return indices.to(index_dtype), cutoff


def still_ineffective(current_values: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Boolean mask over a layer's trainable entries: those whose current value is still below the cutoff."""
    return current_values.detach().float().abs() < cutoff


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
