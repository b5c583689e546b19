"""The nuclear-norm low-rank loss on each layer's sparse update, and rank statistics of the update.

For a layer, Delta_W is the adapter's sparse update viewed as an out x (in * prod(kernel)) matrix (trainable plus
frozen entries). ||Delta_W||_* is the sum of its singular values; its subgradient is U V^T over the non-zero singular
values. We build one dense matrix per layer at a time, take its SVD, and return the subgradient only at the
trainable entries (gathered row by row from U and V, chunked), so no second dense matrix is formed.
"""

from __future__ import annotations

import math

import torch

from .base_weight import readable_weight
from .layer import SaRALayer

# Chunk of trainable entries whose subgradient is gathered at once (bounds the U[rows] * V[cols] temporary).
SUBGRADIENT_CHUNK = 16384


def delta_matrix_shape(weight_shape: torch.Size) -> tuple[int, int]:
    """(rows, cols) of the 2-D view of a weight of ``weight_shape`` (a layer's logical :attr:`SaRALayer.weight_shape`,
    also for packed 4-bit storage) used by the low-rank loss: out x in * prod(kernel).

    (transformers' Conv1D stores in x out; the singular values of the transpose are the same.)
    """
    return weight_shape[0], math.prod(weight_shape[1:])


def _svd_factors(matrix: torch.Tensor, method: str, oversample: int):
    if method == "randomized" and min(matrix.shape) > oversample:
        u, s, v = torch.svd_lowrank(matrix, q=oversample, niter=2)
        return u, s, v.t()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh


class _SparseNuclearNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, base_entries, fixed_indices, fixed_values, shape, method, oversample):
        rows, cols = shape
        dense = torch.zeros(rows * cols, dtype=torch.float32, device=values.device)
        if fixed_indices.numel():
            dense.index_put_((fixed_indices,), fixed_values.float())
        dense.index_put_((indices,), values.detach().float() + base_entries)
        u, s, vh = _svd_factors(dense.view(rows, cols), method, oversample)
        del dense
        tolerance = s.max().clamp_min(1e-30) * max(rows, cols) * torch.finfo(torch.float32).eps if s.numel() else 0
        keep = s > tolerance
        ctx.save_for_backward(u[:, keep], vh[keep], indices)
        ctx.cols = cols
        return s.sum()

    @staticmethod
    def backward(ctx, grad_norm):
        u, vh, indices = ctx.saved_tensors
        grad_values = torch.empty(indices.numel(), dtype=torch.float32, device=u.device)
        for start in range(0, indices.numel(), SUBGRADIENT_CHUNK):
            flat = indices[start : start + SUBGRADIENT_CHUNK].long()
            rows, cols = flat // ctx.cols, flat % ctx.cols
            grad_values[start : start + SUBGRADIENT_CHUNK] = (u[rows] * vh[:, cols].t()).sum(1)
        return grad_values * grad_norm, None, None, None, None, None, None, None


def layer_nuclear_norm(
    layer: SaRALayer, adapter_name: str, method: str = "svd", oversample: int = 32, target: str = "delta"
) -> torch.Tensor:
    """||Delta_W||_* of one SaRA layer's adapter, differentiable in its trainable values.

    ``target="masked_weight"`` uses the paper's written form instead: the effective weight restricted to the
    adapter's entries (base + delta at those entries, zero elsewhere).
    """
    indices, values = layer.trainable_entries(adapter_name)
    fixed_indices, fixed_values = layer.frozen_entries(adapter_name)
    fixed_values = fixed_values.float()
    if target == "masked_weight":
        with readable_weight(layer.get_base_layer()) as weight:  # dequantized / onloaded where needed
            flat_weight = weight.detach().reshape(-1)
            base_entries = flat_weight.index_select(0, indices).float()
            if fixed_indices.numel():
                fixed_values = fixed_values + flat_weight.index_select(0, fixed_indices).float()
    else:
        base_entries = torch.zeros((), dtype=torch.float32, device=values.device)
    shape = delta_matrix_shape(layer.weight_shape)
    return _SparseNuclearNorm.apply(
        values, indices, base_entries, fixed_indices, fixed_values, shape, method, oversample
    )


@torch.no_grad()
def delta_rank_stats(layer: SaRALayer, adapter_name: str) -> dict[str, float]:
    """Nuclear norm, numerical rank and effective rank (exp of the singular-value entropy) of a layer's update."""
    rows, cols = delta_matrix_shape(layer.weight_shape)
    dense = layer.get_sparse_update(adapter_name).to_dense().reshape(rows, cols)
    singular_values = torch.linalg.svdvals(dense)
    del dense
    total = float(singular_values.sum())
    if total == 0:
        return {"nuclear_norm": 0.0, "rank": 0, "effective_rank": 0.0, "shape": [rows, cols]}
    tolerance = float(singular_values.max()) * max(rows, cols) * torch.finfo(torch.float32).eps
    probabilities = singular_values / total
    entropy = -float((probabilities[probabilities > 0] * probabilities[probabilities > 0].log()).sum())
    return {
        "nuclear_norm": total,
        "rank": int((singular_values > tolerance).sum()),
        "effective_rank": math.exp(entropy),
        "shape": [rows, cols],
    }


def qualifies_for_rank_loss(layer: SaRALayer, min_dim: int) -> bool:
    """Whether a layer's 2-D update is large enough for the low-rank loss (both dimensions > min_dim)."""
    rows, cols = delta_matrix_shape(layer.weight_shape)
    return min(rows, cols) > min_dim


def sample_layers(candidates: list, count: int | None, generator: torch.Generator) -> list:
    """``count`` distinct candidates drawn uniformly with ``generator`` (all of them when ``count`` is None)."""
    if count is None or count >= len(candidates):
        return list(candidates)
    order = torch.randperm(len(candidates), generator=generator)[:count]
    return [candidates[i] for i in order.tolist()]
