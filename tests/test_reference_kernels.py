"""The PyTorch reference kernel that every CPU step uses: the sampled weight gradient."""

from __future__ import annotations

import pytest
import torch

from benchmarks import cpu_grad
from benchmarks.cpu_grad import sddmm_weight_grad_values
from peft_sara.tuner.kernels import reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("density", [0.01, 0.2, 1.0])
def test_sddmm_weight_gradient_equals_the_gemm_and_gather(dtype, index_dtype, density, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    grad_output = torch.randn(37, 24, generator=generator).to(dtype)
    inputs = torch.randn(37, 40, generator=generator).to(dtype)
    count = max(1, round(density * 24 * 40))
    index_sets = [torch.randperm(24 * 40, generator=generator)[:count].to(index_dtype) for _ in range(2)]
    expected = [(grad_output.double().t() @ inputs.double()).reshape(-1)[indices.long()] for indices in index_sets]
    monkeypatch.setattr(cpu_grad, "SDDMM_CHUNK_ELEMENTS", 5 * count)  # several token chunks
    sampled = sddmm_weight_grad_values(grad_output, inputs, index_sets)
    dense = reference.linear_weight_grad_values(grad_output, inputs, index_sets)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    for got, via_gemm, want in zip(sampled, dense, expected):
        assert got.dtype == via_gemm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance * 10)
