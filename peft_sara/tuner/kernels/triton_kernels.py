"""Fused Triton kernels for SaRA's masked-weight operations, with the semantics of :mod:`.reference`.

Importing this module needs Triton; :func:`peft_sara.tuner.kernels.triton_available` guards the import. Kernels run on CUDA
tensors, or on CPU tensors through the Triton interpreter when ``TRITON_INTERPRET=1`` was set before Triton was first
imported (how the tests run them).

The weight gradient at the trainable entries has two strategies, picked per index set by density
(:data:`SDDMM_MAX_DENSITY`):

* ``"sddmm"``: sampled dense-dense matmul. Each program owns a block of trainable entries and reduces the rows of
  ``grad_output^T`` and ``inputs^T`` they address over the tokens (token-major copies, made a bounded chunk of tokens
  at a time). Work is ``nnz * N``, on CUDA cores with gathered rows.
* ``"gemm"``: a tiled ``grad_output^T @ inputs`` (tensor cores for fp16 / bf16, exact fp32 dot for fp32; fp32
  accumulate) over the tiles that hold trainable entries only; the epilogue stores just those entries. Work is
  ``out * in * N`` minus empty tiles. The per-index-set tile plan is built once and cached.

Neither strategy allocates anything of size out x in except the plan's one bit per weight of the non-empty tiles.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

from . import reference

Strategy = Literal["auto", "sddmm", "gemm"]

# Largest density (trainable entries / weight entries) for which the SDDMM strategy is used; above it, the masked GEMM.
# Both costs grow linearly in the tokens N, so density alone decides. Roofline estimate for an H100: the GEMM runs
# 2*N*out*in flops at ~400 TFLOP/s on bf16/fp16 tensor cores, but only ~30 TFLOP/s for exact fp32 (no TF32); the SDDMM
# streams one gathered row of inputs^T per entry (2*N*nnz bytes for 16-bit, 4*N*nnz for fp32) from L2 at ~6 TB/s.
# Equal cost at density ~1.5% (16-bit) and ~10% (fp32); the cutoffs below sit under both, since the estimate ignores
# the SDDMM's transposed copies of the operands. Not yet measured on a GPU: `benchmarks/kernels.py` prints the
# crossover to tune these.
SDDMM_MAX_DENSITY = {torch.float16: 0.01, torch.bfloat16: 0.01, torch.float32: 0.05}

GEMM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SDDMM_BLOCK_ENTRIES = 32
SDDMM_BLOCK_TOKENS = 128
# The SDDMM reads token-major copies of its operands (coalesced rows); they are made for as many tokens at a time as
# fit in the larger of this budget and the dense out x in gradient the reference would have allocated.
SDDMM_COPY_BUDGET_BYTES = 32 * 2**20
# Contract a * b + c into fma in the reductions (Triton's current default, stated so a changed default changes nothing).
FP_FUSION = True


@triton.jit
def _sddmm_kernel(
    grad_t_ptr,
    inputs_t_ptr,
    indices_ptr,
    out_ptr,
    count,
    n_tokens,
    in_features,
    stride_grad_row,
    stride_grad_token,
    stride_inputs_row,
    stride_inputs_token,
    BLOCK_ENTRIES: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
):
    entries = tl.program_id(0) * BLOCK_ENTRIES + tl.arange(0, BLOCK_ENTRIES)
    in_range = entries < count
    flat_positions = tl.load(indices_ptr + entries, mask=in_range, other=0).to(tl.int64)
    grad_rows = grad_t_ptr + (flat_positions // in_features) * stride_grad_row
    input_rows = inputs_t_ptr + (flat_positions % in_features) * stride_inputs_row
    tokens = tl.arange(0, BLOCK_TOKENS)
    acc = tl.load(out_ptr + entries, mask=in_range, other=0.0)  # partial sums of earlier token chunks
    for start in range(0, n_tokens, BLOCK_TOKENS):
        token_ids = start + tokens
        valid = in_range[:, None] & (token_ids[None, :] < n_tokens)
        grad_block = tl.load(grad_rows[:, None] + token_ids[None, :] * stride_grad_token, mask=valid, other=0.0)
        input_block = tl.load(input_rows[:, None] + token_ids[None, :] * stride_inputs_token, mask=valid, other=0.0)
        acc += tl.sum(grad_block.to(tl.float32) * input_block.to(tl.float32), axis=1)
    tl.store(out_ptr + entries, acc, mask=in_range)


@triton.jit
def _masked_gemm_kernel(
    grad_ptr,
    inputs_ptr,
    out_ptr,
    tile_ids_ptr,
    tile_starts_ptr,
    tile_bits_ptr,
    destinations_ptr,
    n_tokens,
    out_features,
    in_features,
    tiles_per_row,
    stride_grad_token,
    stride_grad_out,
    stride_inputs_token,
    stride_inputs_in,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    EXACT_FP32: tl.constexpr,
):
    plan_slot = tl.program_id(0)
    tile_id = tl.load(tile_ids_ptr + plan_slot)
    rows = (tile_id // tiles_per_row) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile_id % tiles_per_row) * BLOCK_N + tl.arange(0, BLOCK_N)
    tokens = tl.arange(0, BLOCK_K)
    grad_ptrs = grad_ptr + rows[:, None] * stride_grad_out + tokens[None, :] * stride_grad_token
    input_ptrs = inputs_ptr + tokens[:, None] * stride_inputs_token + cols[None, :] * stride_inputs_in
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_tokens, BLOCK_K):
        token_valid = (start + tokens) < n_tokens
        grad_tile = tl.load(grad_ptrs, mask=(rows[:, None] < out_features) & token_valid[None, :], other=0.0)
        input_tile = tl.load(input_ptrs, mask=token_valid[:, None] & (cols[None, :] < in_features), other=0.0)
        if DOT_IN_FP32:  # the interpreter's dot reads bf16 as raw integers; fp16/bf16 products are exact in fp32
            grad_tile = grad_tile.to(tl.float32)
            input_tile = input_tile.to(tl.float32)
        if EXACT_FP32:
            acc = tl.dot(grad_tile, input_tile, acc, input_precision="ieee")
        else:
            acc = tl.dot(grad_tile, input_tile, acc)
        grad_ptrs += BLOCK_K * stride_grad_token
        input_ptrs += BLOCK_K * stride_inputs_token
    # Epilogue: the tile's trainable entries are the set bits of its row-major bit mask, stored compactly (in that
    # order) from tile_starts[slot]; an entry's compact rank is the number of set bits before it.
    local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    mask_bytes = tl.load(tile_bits_ptr + plan_slot * (BLOCK_M * BLOCK_N // 8) + local // 8).to(tl.int32)
    is_trainable = ((mask_bytes >> (local % 8)) & 1).to(tl.int32)
    row_counts = tl.sum(is_trainable, axis=1)
    row_starts = tl.cumsum(row_counts, axis=0) - row_counts
    ranks = row_starts[:, None] + tl.cumsum(is_trainable, axis=1) - 1
    keep = is_trainable != 0
    tile_start = tl.load(tile_starts_ptr + plan_slot)
    destinations = tl.load(destinations_ptr + tile_start + ranks, mask=keep, other=0)
    tl.store(out_ptr + destinations, acc, mask=keep)


def _interpreted() -> bool:
    """Whether the kernels were built for the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(_sddmm_kernel, triton.runtime.JITFunction)


def linear_weight_grad_values(
    grad_output: torch.Tensor,
    inputs: torch.Tensor,
    indices_per_adapter: Sequence[torch.Tensor],
    *,
    strategy: Strategy = "auto",
) -> list[torch.Tensor]:
    """Entries of ``grad_output.T @ inputs`` (an out x in weight gradient) at each flat index set, as float32.

    ``grad_output`` is (N, out) and ``inputs`` (N, in), both 2-D; ``inputs`` is rounded to ``grad_output``'s dtype
    as in the reference, and products are accumulated in float32. ``strategy`` forces ``"sddmm"`` or ``"gemm"``;
    ``"auto"`` picks by density (:data:`SDDMM_MAX_DENSITY`). Dtypes other than fp16 / bf16 / fp32 use the reference.
    """
    if strategy not in ("auto", "sddmm", "gemm"):
        raise ValueError(f"strategy must be 'auto', 'sddmm' or 'gemm', got {strategy!r}.")
    if grad_output.dtype not in GEMM_DTYPES:
        return reference.linear_weight_grad_values(grad_output, inputs, indices_per_adapter)
    weight_numel = grad_output.shape[1] * inputs.shape[1]
    results: list[torch.Tensor | None] = [None] * len(indices_per_adapter)
    sddmm_slots = []
    for slot, indices in enumerate(indices_per_adapter):
        if indices.numel() == 0 or grad_output.shape[0] == 0:
            results[slot] = torch.zeros(indices.numel(), dtype=torch.float32, device=grad_output.device)
            continue
        chosen = strategy
        if chosen == "auto":
            sddmm_cutoff = SDDMM_MAX_DENSITY[grad_output.dtype]
            chosen = "sddmm" if indices.numel() <= sddmm_cutoff * weight_numel else "gemm"
        if chosen == "sddmm":
            sddmm_slots.append(slot)
        else:
            results[slot] = _gemm_sampled(grad_output, inputs, indices)
    if sddmm_slots:
        sampled = _sddmm_sampled(grad_output, inputs, [indices_per_adapter[slot] for slot in sddmm_slots])
        for slot, values in zip(sddmm_slots, sampled):
            results[slot] = values
    return results


def _sddmm_sampled(
    grad_output: torch.Tensor, inputs: torch.Tensor, indices_per_adapter: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Sampled entries by the SDDMM kernel, over token chunks whose token-major copies fit the copy budget."""
    dtype = grad_output.dtype
    n_tokens, out_features, in_features = grad_output.shape[0], grad_output.shape[1], inputs.shape[1]
    budget = max(SDDMM_COPY_BUDGET_BYTES, out_features * in_features * dtype.itemsize)
    chunk = budget // ((out_features + in_features) * dtype.itemsize)
    chunk = max(SDDMM_BLOCK_TOKENS, chunk - chunk % SDDMM_BLOCK_TOKENS)
    sampled = [
        torch.zeros(indices.numel(), dtype=torch.float32, device=grad_output.device) for indices in indices_per_adapter
    ]
    for start in range(0, n_tokens, chunk):
        # (out, chunk) and (in, chunk), contiguous along tokens; no copy where already so. Inputs are rounded to
        # grad_output's dtype, as in the reference.
        grad_t = grad_output[start : start + chunk].t().to(memory_format=torch.contiguous_format)
        inputs_t = inputs[start : start + chunk].t().to(dtype=dtype, memory_format=torch.contiguous_format)
        for indices, values in zip(indices_per_adapter, sampled):
            _launch_sddmm(grad_t, inputs_t, indices, values)
    return sampled


def _launch_sddmm(grad_t: torch.Tensor, inputs_t: torch.Tensor, indices: torch.Tensor, sampled: torch.Tensor) -> None:
    """Add this token chunk's contribution to ``sampled``; ``grad_t`` is (out, chunk) and ``inputs_t`` (in, chunk)."""
    grid = (triton.cdiv(indices.numel(), SDDMM_BLOCK_ENTRIES),)
    _sddmm_kernel[grid](
        grad_t,
        inputs_t,
        indices.contiguous(),
        sampled,
        indices.numel(),
        grad_t.shape[1],
        inputs_t.shape[0],
        grad_t.stride(0),
        grad_t.stride(1),
        inputs_t.stride(0),
        inputs_t.stride(1),
        BLOCK_ENTRIES=SDDMM_BLOCK_ENTRIES,
        BLOCK_TOKENS=SDDMM_BLOCK_TOKENS,
        enable_fp_fusion=FP_FUSION,
    )


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch settings of the masked GEMM (the tile plan depends on ``block_m`` x ``block_n``)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def gemm_config(dtype: torch.dtype) -> GemmConfig:
    """Default tiles: 128 x 128 for tensor-core dtypes, 64 x 64 for exact fp32 (CUDA-core dot)."""
    if dtype == torch.float32:
        return GemmConfig(64, 64, 32, num_warps=4, num_stages=3)
    return GemmConfig(128, 128, 32, num_warps=8, num_stages=3)


def _gemm_sampled(
    grad_output: torch.Tensor, inputs: torch.Tensor, indices: torch.Tensor, config: GemmConfig | None = None
) -> torch.Tensor:
    """Sampled entries by the masked GEMM over the tiles that hold trainable entries."""
    config = config or gemm_config(grad_output.dtype)
    out_features, in_features = grad_output.shape[1], inputs.shape[1]
    plan = tile_plan(indices, out_features, in_features, config.block_m, config.block_n)
    if inputs.dtype != grad_output.dtype:
        inputs = inputs.to(grad_output.dtype)
    sampled = torch.empty(indices.numel(), dtype=torch.float32, device=grad_output.device)
    _masked_gemm_kernel[(plan.tile_ids.numel(),)](
        grad_output,
        inputs,
        sampled,
        plan.tile_ids,
        plan.tile_starts,
        plan.tile_bits,
        plan.destinations,
        grad_output.shape[0],
        out_features,
        in_features,
        plan.tiles_per_row,
        grad_output.stride(0),
        grad_output.stride(1),
        inputs.stride(0),
        inputs.stride(1),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        DOT_IN_FP32=_interpreted(),
        EXACT_FP32=grad_output.dtype == torch.float32,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        enable_fp_fusion=FP_FUSION,
    )
    return sampled


@dataclass(frozen=True)
class TilePlan:
    """Where one index set's entries fall in the block_m x block_n tiles of an out x in weight.

    Only tiles holding at least one entry appear, in launch order (grouped along rows for L2 reuse). For launch slot
    s: ``tile_ids[s]`` is the row-major tile number, ``tile_bits[s]`` its row-major bit mask of trainable entries
    (``block_m * block_n / 8`` bytes), and ``destinations[tile_starts[s] + r]`` the position in the index set of its
    r-th trainable entry.
    """

    tile_ids: torch.Tensor
    tile_starts: torch.Tensor
    tile_bits: torch.Tensor
    destinations: torch.Tensor
    tiles_per_row: int


# Tile rows walked together before moving right: consecutive programs then reuse the same input columns from L2.
GROUP_ROWS = 8
_PLANS: dict[tuple, tuple[weakref.ref, TilePlan]] = {}


def tile_plan(indices: torch.Tensor, out_features: int, in_features: int, block_m: int, block_n: int) -> TilePlan:
    """The cached :class:`TilePlan` of ``indices``; rebuilt only when the index tensor changes (new tensor, in-place
    edit) or the weight or tile shape differs."""
    key = (
        id(indices),
        indices._version,
        indices.data_ptr(),
        indices.numel(),
        out_features,
        in_features,
        block_m,
        block_n,
    )
    cached = _PLANS.get(key)
    if cached is not None and cached[0]() is indices:
        return cached[1]
    plan = _build_tile_plan(indices, out_features, in_features, block_m, block_n)
    _PLANS[key] = (weakref.ref(indices, lambda _, key=key: _PLANS.pop(key, None)), plan)
    return plan


def _build_tile_plan(
    indices: torch.Tensor, out_features: int, in_features: int, block_m: int, block_n: int
) -> TilePlan:
    if block_n % 8:
        raise ValueError(f"block_n must be a multiple of 8 (one mask byte holds 8 columns), got {block_n}.")
    flat_positions = indices.long()
    rows, cols = flat_positions // in_features, flat_positions % in_features
    tiles_per_row = triton.cdiv(in_features, block_n)
    tile_rows, tile_cols = rows // block_m, cols // block_n
    launch_rank = (  # grouped order: GROUP_ROWS tile rows at a time, column by column
        (tile_rows // GROUP_ROWS) * (GROUP_ROWS * tiles_per_row) + tile_cols * GROUP_ROWS + tile_rows % GROUP_ROWS
    )
    local = (rows % block_m) * block_n + cols % block_n
    order = torch.argsort(launch_rank * (block_m * block_n) + local)
    sorted_ranks, sorted_local = launch_rank[order], local[order]
    _, counts = torch.unique_consecutive(sorted_ranks, return_counts=True)
    tile_starts = torch.cumsum(counts, 0) - counts
    first_of_tile = order[tile_starts]
    tile_ids = tile_rows[first_of_tile] * tiles_per_row + tile_cols[first_of_tile]
    bytes_per_tile = block_m * block_n // 8
    slot_of_entry = torch.repeat_interleave(torch.arange(counts.numel(), device=indices.device), counts)
    # Each entry owns a distinct bit, so summing the bit values of a byte equals OR-ing them.
    tile_bits = torch.zeros(counts.numel() * bytes_per_tile, dtype=torch.int32, device=indices.device)
    tile_bits.index_add_(
        0, slot_of_entry * bytes_per_tile + sorted_local // 8, (1 << (sorted_local % 8)).to(torch.int32)
    )
    position_dtype = torch.int32 if indices.numel() < 2**31 else torch.int64
    return TilePlan(
        tile_ids=tile_ids.to(torch.int32),
        tile_starts=tile_starts.to(position_dtype),
        tile_bits=tile_bits.to(torch.uint8),
        destinations=order.to(position_dtype),
        tiles_per_row=tiles_per_row,
    )
