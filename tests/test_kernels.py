"""The Triton kernels against the PyTorch reference: patch / restore bitwise, sampled weight gradients within dtype
tolerance, and a SaRA layer giving the same results on either backend.

On CPU the kernels run through the Triton interpreter, which must be switched on (``TRITON_INTERPRET=1``) before
Triton is first imported. Importing ``peft_sara`` already imports Triton (through transformers / torch), so under a
plain ``pytest`` run the kernels are compiled ones that cannot run on CPU: the kernel tests then skip in this process
and ``test_kernel_tests_pass_in_an_interpreter_subprocess`` reruns this file in a fresh process with the variable set.
Started with ``TRITON_INTERPRET=1`` (or with compiled kernels on a CUDA machine) they run here directly.
"""

from __future__ import annotations

import os
import sys

if "triton.language" not in sys.modules:  # the interpreter is chosen when Triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from peft_sara.tuner.kernels import reference

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed (pip install 'peft-sara[triton]').", allow_module_level=True)

import triton  # noqa: E402

from peft_sara.tuner.kernels import triton_kernels  # noqa: E402


def _kernel_device() -> str | None:
    """Where the kernels can run in this process: CPU through the interpreter, CUDA when compiled, else nowhere."""
    if triton_kernels._interpreted():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


DEVICE = _kernel_device()
needs_kernel_device = pytest.mark.skipif(
    DEVICE is None,
    reason="Triton was imported without TRITON_INTERPRET=1 and there is no CUDA device; "
    "test_kernel_tests_pass_in_an_interpreter_subprocess runs these tests in an interpreter process.",
)

DENSITIES = (0.001, 0.01, 0.1, 0.5)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (rtol, atol) against the reference, which rounds the gradient to the input dtype; we accumulate and return fp32.
GRAD_TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
SMALL_GEMM = triton_kernels.GemmConfig(32, 32, 16, num_warps=4, num_stages=1)


def random_indices(numel: int, density: float, index_dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Sorted distinct flat indices (at least one) on the kernel device."""
    generator = torch.Generator().manual_seed(seed)
    count = max(1, round(density * numel))
    chosen = torch.randperm(numel, generator=generator)[:count].sort().values
    return chosen.to(device=DEVICE, dtype=index_dtype)


def sampled_gradient_case(dtype, density, index_dtype, n_tokens=33, out_features=37, in_features=53, seed=0):
    generator = torch.Generator().manual_seed(seed)
    grad_output = torch.randn(n_tokens, out_features, generator=generator).to(device=DEVICE, dtype=dtype)
    inputs = torch.randn(n_tokens, in_features, generator=generator).to(device=DEVICE, dtype=dtype)
    indices = random_indices(out_features * in_features, density, index_dtype, seed=seed + 1)
    return grad_output, inputs, indices


def assert_matches_reference(sampled, grad_output, inputs, indices):
    """Within dtype tolerance of reference.py, and within fp32-accumulation error of the exact (fp64) gradient."""
    assert sampled.dtype == torch.float32 and sampled.shape == indices.shape
    expected = reference.linear_weight_grad_values(grad_output, inputs, [indices])[0]
    rtol, atol = GRAD_TOLERANCES[grad_output.dtype]
    torch.testing.assert_close(sampled, expected, rtol=rtol, atol=atol)
    exact = reference.linear_weight_grad_values(grad_output.double(), inputs.to(grad_output.dtype).double(), [indices])
    torch.testing.assert_close(sampled, exact[0].float(), rtol=1e-5, atol=1e-5 * grad_output.shape[0])


@needs_kernel_device
@pytest.mark.parametrize("strategy", ["sddmm", "gemm"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "density, index_dtype", [(0.001, torch.int32), (0.01, torch.int64), (0.1, torch.int32), (0.5, torch.int64)]
)
def test_sampled_weight_gradient_matches_reference(strategy, dtype, density, index_dtype):
    grad_output, inputs, indices = sampled_gradient_case(dtype, density, index_dtype)
    sampled = triton_kernels.linear_weight_grad_values(grad_output, inputs, [indices], strategy=strategy)[0]
    assert_matches_reference(sampled, grad_output, inputs, indices)


@needs_kernel_device
@pytest.mark.parametrize("strategy", ["sddmm", "gemm"])
def test_sampled_weight_gradient_reads_non_contiguous_and_mixed_dtype_inputs(strategy):
    generator = torch.Generator().manual_seed(3)
    grad_output = torch.randn(37, 29, generator=generator).to(DEVICE).t()  # (29 tokens, 37 out), transposed view
    inputs = torch.randn(29, 106, generator=generator).to(DEVICE)[:, ::2]  # (29, 53), every other column
    indices = random_indices(37 * 53, 0.1, torch.int64, seed=4)
    sampled = triton_kernels.linear_weight_grad_values(grad_output, inputs, [indices], strategy=strategy)[0]
    assert_matches_reference(sampled, grad_output, inputs, indices)

    # bf16 gradients with fp32 inputs: inputs are rounded to bf16 first, as in the reference.
    sampled = triton_kernels.linear_weight_grad_values(grad_output.bfloat16(), inputs, [indices], strategy=strategy)
    assert_matches_reference(sampled[0], grad_output.bfloat16(), inputs, indices)


@needs_kernel_device
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_masked_gemm_covers_edge_tiles_and_skips_empty_ones(dtype):
    grad_output, inputs, _ = sampled_gradient_case(dtype, 0.1, torch.int32, n_tokens=40)
    # Entries only in tile rows 0 and 1 (rows < 64), including the ragged last tile column (cols 32..52).
    rows = torch.tensor([0, 5, 31, 32, 36, 36, 3])
    cols = torch.tensor([0, 52, 31, 40, 0, 52, 33])
    indices = (rows * 53 + cols).to(DEVICE)
    sampled = triton_kernels._gemm_sampled(grad_output, inputs, indices, SMALL_GEMM)
    assert_matches_reference(sampled, grad_output, inputs, indices)
    plan = triton_kernels.tile_plan(indices, 37, 53, SMALL_GEMM.block_m, SMALL_GEMM.block_n)
    assert sorted(plan.tile_ids.tolist()) == [0, 1, 2, 3]  # 2 x 2 tiles, all hit

    one_tile = torch.tensor([33, 53 + 35], device=DEVICE)  # (0, 33) and (1, 35): both in tile (0, 1)
    plan = triton_kernels.tile_plan(one_tile, 37, 53, SMALL_GEMM.block_m, SMALL_GEMM.block_n)
    assert plan.tile_ids.tolist() == [1]
    sampled = triton_kernels._gemm_sampled(grad_output, inputs, one_tile, SMALL_GEMM)
    assert_matches_reference(sampled, grad_output, inputs, one_tile)


@needs_kernel_device
def test_masked_gemm_with_many_tiles_keeps_index_order():
    grad_output, inputs, indices = sampled_gradient_case(
        torch.float32, 0.1, torch.int64, n_tokens=20, out_features=70, in_features=75, seed=5
    )
    shuffled = indices[torch.randperm(indices.numel(), generator=torch.Generator().manual_seed(0)).to(DEVICE)]
    sampled = triton_kernels._gemm_sampled(grad_output, inputs, shuffled, SMALL_GEMM)
    assert_matches_reference(sampled, grad_output, inputs, shuffled)


@needs_kernel_device
def test_several_index_sets_and_degenerate_shapes():
    grad_output, inputs, dense_set = sampled_gradient_case(torch.float32, 0.5, torch.int32)
    sparse_set = random_indices(37 * 53, 0.001, torch.int64, seed=9)
    empty_set = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    sampled = triton_kernels.linear_weight_grad_values(grad_output, inputs, [dense_set, sparse_set, empty_set])
    for values, indices in zip(sampled, [dense_set, sparse_set]):
        assert_matches_reference(values, grad_output, inputs, indices)
    assert sampled[2].shape == (0,) and sampled[2].dtype == torch.float32

    no_tokens = triton_kernels.linear_weight_grad_values(grad_output[:0], inputs[:0], [dense_set])[0]
    assert torch.equal(no_tokens, torch.zeros(dense_set.numel(), device=DEVICE))


@needs_kernel_device
def test_sddmm_accumulates_over_token_chunks_when_copies_exceed_the_budget(monkeypatch):
    monkeypatch.setattr(triton_kernels, "SDDMM_COPY_BUDGET_BYTES", 0)
    monkeypatch.setattr(triton_kernels, "SDDMM_BLOCK_TOKENS", 16)  # 37 x 53 fp32 budget -> 16-token chunks
    grad_output, inputs, indices = sampled_gradient_case(torch.float32, 0.1, torch.int32, n_tokens=40)
    other_indices = random_indices(37 * 53, 0.01, torch.int64, seed=2)
    sampled = triton_kernels.linear_weight_grad_values(grad_output, inputs, [indices, other_indices], strategy="sddmm")
    assert_matches_reference(sampled[0], grad_output, inputs, indices)
    assert_matches_reference(sampled[1], grad_output, inputs, other_indices)


def test_auto_strategy_switches_at_the_density_cutoff(monkeypatch):
    sizes_by_strategy = {"sddmm": [], "gemm": []}

    def fake_sddmm(grad_output, inputs, index_sets):
        sizes_by_strategy["sddmm"] += [indices.numel() for indices in index_sets]
        return [indices.float() for indices in index_sets]

    def fake_gemm(grad_output, inputs, indices):
        sizes_by_strategy["gemm"].append(indices.numel())
        return indices.float()

    monkeypatch.setattr(triton_kernels, "_sddmm_sampled", fake_sddmm)
    monkeypatch.setattr(triton_kernels, "_gemm_sampled", fake_gemm)
    grad_output, inputs = torch.zeros(4, 100, dtype=torch.bfloat16), torch.zeros(4, 100, dtype=torch.bfloat16)
    at_cutoff = round(triton_kernels.SDDMM_MAX_DENSITY[torch.bfloat16] * 100 * 100)
    sampled = triton_kernels.linear_weight_grad_values(
        grad_output, inputs, [torch.arange(at_cutoff + 1), torch.arange(at_cutoff)]
    )
    assert sizes_by_strategy == {"sddmm": [at_cutoff], "gemm": [at_cutoff + 1]}
    assert [values.numel() for values in sampled] == [at_cutoff + 1, at_cutoff]  # results keep the input order


def test_tile_plan_is_built_once_per_index_tensor():
    indices = torch.tensor([3, 70, 4000, 9999])
    plan = triton_kernels.tile_plan(indices, 100, 100, 64, 64)
    assert triton_kernels.tile_plan(indices, 100, 100, 64, 64) is plan
    assert triton_kernels.tile_plan(indices.clone(), 100, 100, 64, 64) is not plan
    assert triton_kernels.tile_plan(indices, 100, 100, 32, 32) is not plan
    indices[0] = 5  # an in-place edit bumps the version: the stale plan must not be reused
    edited = triton_kernels.tile_plan(indices, 100, 100, 64, 64)
    assert edited is not plan and edited.tile_bits.numel() == plan.tile_bits.numel()
    # One bit per weight entry of the non-empty tiles, nothing per frozen tile.
    assert plan.tile_bits.numel() == plan.tile_ids.numel() * 64 * 64 // 8


@needs_kernel_device
def test_sara_linear_layers_give_the_same_outputs_and_gradients_on_both_backends(monkeypatch):
    from peft import get_peft_model

    from peft_sara import SaRAConfig

    monkeypatch.setenv("TRITON_INTERPRET", "1" if DEVICE == "cpu" else "0")
    triton_calls = []
    for name in ("linear_weight_grad_values",):
        kernel = getattr(triton_kernels, name)
        monkeypatch.setattr(triton_kernels, name, lambda *a, _k=kernel, _n=name: triton_calls.append(_n) or _k(*a))
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("PEFT_SARA_KERNEL", backend)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16)).to(DEVICE)
        config = SaRAConfig(trainable_fraction=0.1, target_modules=["0", "2"], init_weights=False)
        peft_model = get_peft_model(model, config)
        base_weights = [peft_model.base_model.model[i].get_base_layer().weight.detach().clone() for i in (0, 2)]
        inputs = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        output = peft_model(inputs)
        output.square().sum().backward()
        value_grads = {name: p.grad.clone() for name, p in peft_model.named_parameters() if p.requires_grad}
        assert value_grads and all("sara_values" in name for name in value_grads)
        for i, base in zip((0, 2), base_weights):
            assert torch.equal(peft_model.base_model.model[i].get_base_layer().weight, base)
        results[backend] = (output.detach(), value_grads)
    assert set(triton_calls) == {"linear_weight_grad_values"}
    (ref_output, ref_grads), (triton_output, triton_grads) = results["reference"], results["triton"]
    torch.testing.assert_close(triton_output, ref_output, rtol=1e-6, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(triton_grads[name], grad, rtol=1e-5, atol=1e-5)


def test_kernels_compile_for_hopper_without_a_gpu():
    """Catches what the interpreter accepts but the GPU compiler rejects (types, layouts, scans)."""
    if triton_kernels._interpreted():  # compile in a process where Triton is not in interpreter mode
        environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        environment["TRITON_INTERPRET"] = "0"
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-W",
                "ignore",
                f"{__file__}::test_kernels_compile_for_hopper_without_a_gpu",
            ],
            cwd=Path(__file__).resolve().parents[1],
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert completed.returncode == 0 and "1 passed" in completed.stdout, completed.stdout[-4000:]
        return
    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    integers = dict.fromkeys(
        [
            "n_tokens",
            "out_features",
            "in_features",
            "tiles_per_row",
            "stride_grad_token",
            "stride_grad_out",
            "stride_inputs_token",
            "stride_inputs_in",
            "count",
            "stride_grad_row",
            "stride_inputs_row",
        ],
        "i32",
    )
    gemm_pointers = {
        "out_ptr": "*fp32",
        "tile_ids_ptr": "*i32",
        "tile_starts_ptr": "*i32",
        "tile_bits_ptr": "*u8",
        "destinations_ptr": "*i32",
    }
    cases = [
        (
            triton_kernels._sddmm_kernel,
            {"grad_t_ptr": "*fp16", "inputs_t_ptr": "*fp16", "indices_ptr": "*i64", "out_ptr": "*fp32"},
            {"BLOCK_ENTRIES": triton_kernels.SDDMM_BLOCK_ENTRIES, "BLOCK_TOKENS": triton_kernels.SDDMM_BLOCK_TOKENS},
            {"enable_fp_fusion": triton_kernels.FP_FUSION},
        ),
    ]
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        config = triton_kernels.gemm_config(dtype)
        pointers = {"grad_ptr": f"*{name}", "inputs_ptr": f"*{name}", **gemm_pointers}
        constants = {
            "BLOCK_M": config.block_m,
            "BLOCK_N": config.block_n,
            "BLOCK_K": config.block_k,
            "DOT_IN_FP32": False,
            "EXACT_FP32": dtype == torch.float32,
        }
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        options["enable_fp_fusion"] = triton_kernels.FP_FUSION
        cases.append((triton_kernels._masked_gemm_kernel, pointers, constants, options))
    for kernel, pointers, constants, options in cases:
        names = kernel.arg_names
        signature = {n: pointers.get(n) or integers.get(n) or "constexpr" for n in names}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.asm["ptx"]


def test_kernel_tests_pass_in_an_interpreter_subprocess():
    if DEVICE is not None:
        pytest.skip(f"the kernel tests ran in this process (on {DEVICE}).")
    environment = {key: value for key, value in os.environ.items() if key != "PEFT_SARA_KERNEL"}
    environment["TRITON_INTERPRET"] = "1"
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", __file__],
        cwd=Path(__file__).resolve().parents[1],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0 and " passed" in completed.stdout, (
        completed.stdout[-6000:] + completed.stderr[-3000:]
    )
