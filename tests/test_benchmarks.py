"""Smoke tests of the benchmark scripts: each runs end to end on a toy preset and writes the documented JSON fields.

The train-step, inference and GPU-suite (``--tiny``) runs start together in subprocesses (one torch thread each) so the
module stays around a minute; the suite's budget, cutoff choice and timeouts are also tested directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_suite import kernels as suite_kernels
from benchmarks.gpu_suite.budget import GRACE_S, Budget, CaseLog
from benchmarks.gpu_suite.settings import TINY
from benchmarks.processes import failure_status, run_in_fresh_process
from benchmarks.train_methods import DEFAULT_METHODS, METHODS
from peft_sara.presets import PRESETS, model_class

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240


def _start(module: str, out: Path, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", module, "--threads", "1", "--device", "cpu", "--out", str(out), *flags]
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, out: Path) -> dict:
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, output
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("benchmarks")
    train_out, inference_out = directory / "train.json", directory / "inference.json"
    train = _start(
        "benchmarks.train_step",
        train_out,
        *("--preset", "tiny-dit", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--rounds", "1"),
        *("--methods", "all"),
    )
    suite_dir = directory / "suite"
    # The compiled part is left out: tracing even the toy UNet takes half a minute (tests/test_compile.py covers it).
    suite = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.gpu_suite", "--tiny", "--device", "cpu", "--threads", "1"]
        + ["--parts", "sd15,sdxl,kernels", "--out-dir", str(suite_dir)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    inference = _start(
        "benchmarks.inference",
        inference_out,
        "--preset",
        "tiny",
        "--repeats",
        "1",
        "--warmup",
        "0",
    )
    suite_out = suite_dir / "gpu_suite-tiny-cpu.json"
    yield {"train": (train, train_out), "inference": (inference, inference_out), "suite": (suite, suite_out)}
    for process in train, inference, suite:
        if process.poll() is None:
            process.kill()


def test_train_step_reports_time_memory_and_ratios_per_method(runs):
    report = _finish(*runs["train"])
    assert report["benchmark"] == "train_step" and report["batch_size"] == 2 and report["rounds"] == 1
    for key in ("cpu_model", "cpu_count", "torch", "torch_threads", "device"):
        assert key in report["machine"]
    assert report["plan"]["sara_trainable"] > 0 and report["plan"]["lora_matched_rank"] >= 1
    assert list(report["methods"]) == list(METHODS)
    for method, result in report["methods"].items():
        assert result["step_s"] > 0 and result["phases_s"]["forward"] > 0, method
        if method != "frozen_forward":
            assert {"backward", "optimizer"} <= set(result["phases_s"]), method
        assert result["peak_bytes"] > 0 and result["process_max_rss_bytes"] > 0, method
        for key in ("peak_delta_bytes", "memory_cost_bytes", "step_vs_full_ft", "step_cpu_vs_lora_r8"):
            assert key in result, (method, key)
    methods = report["methods"]
    assert report["failed"] == {} and report["dtype"] == "float32"
    assert methods["lora_r64"]["trainable_params"] > methods["lora_r8"]["trainable_params"]
    assert methods["floor"]["trainable_params"] == 0 and methods["floor"]["adapter_bytes"] is None
    assert methods["sara"]["trainable_params"] == report["plan"]["sara_trainable"]
    assert methods["full_ft"]["trainable_params"] == report["plan"]["model_parameters"]
    assert 0 < methods["sara"]["adapter_bytes"] < methods["full_ft"]["adapter_bytes"]
    assert methods["full_ft"]["step_vs_full_ft"] == pytest.approx(1.0)
    # The baselines run at SaRA's trainable count (sparse ones on the Linear layers only).
    assert methods["masked_dense"]["trainable_params"] == methods["sara"]["trainable_params"]
    linear_count = report["plan"]["sara_trainable_linear"]
    assert methods["supertuning"]["trainable_params"] == pytest.approx(linear_count, rel=0.05)
    expected_targets = {
        "SaRA step time <= 0.95 x full fine-tuning (wall)",
        "SaRA step time <= 1.05 x LoRA r=8 (CPU time)",
    }
    # On CPU a tiny model's RSS-based cost can round to nothing for LoRA; the ratio exists only when it is measurable.
    if (methods["lora_r8"]["memory_cost_bytes"] or 0) > 0:
        expected_targets.add("SaRA memory cost < LoRA r=8 memory cost")
    assert {target["target"] for target in report["targets"]} >= expected_targets


def test_inference_reports_latencies_and_merge_checks(runs):
    report = _finish(*runs["inference"])
    assert report["benchmark"] == "inference"
    assert set(report["times_s"]) == {
        "base_forward",
        "sara_unmerged_forward",
        "sara_merged_forward",
        "merge",
        "unmerge",
        "effective_weight_floor",
    }
    assert all(seconds > 0 for seconds in report["times_s"].values())
    checks = report["checks"]
    assert checks["merged_matches_unmerged"] is True
    assert checks["floor_matches_unmerged"] is True  # the floor computes the same outputs, with no adapter machinery
    assert checks["unmerge_restores_base_bitwise"] is True
    assert checks["base_output_restored_bitwise"] is True
    assert checks["adapter_changes_output"] is True


@pytest.mark.slow
def test_train_step_runs_every_method_on_a_unet_with_convolutions(tmp_path):
    out = tmp_path / "train-unet.json"
    report = _finish(
        _start("benchmarks.train_step", out, "--preset", "tiny", "--steps", "1", "--warmup", "0", "--rounds", "1"), out
    )
    assert list(report["methods"]) == list(DEFAULT_METHODS)
    assert report["plan"]["num_target_layers"]["conv"] > 0
    assert report["methods"]["sara"]["trainable_params"] == report["plan"]["sara_trainable"]


def test_regularizer_benchmark_reports_overhead_and_rank(tmp_path):
    out = tmp_path / "regularizer.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.regularizer",
        "--preset",
        "tiny",
        "--batch-size",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--train-steps",
        "2",
        "--rank-min-dim",
        "16",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    result = json.loads(out.read_text())
    default = result["timing"]["default (1 layer/step, exact SVD)"]
    assert default["eligible_layers"] > 0 and default["regularizer_s"] > 0
    assert 0 < default["regularizer_pct_of_step"] < 100
    ranks = result["rank"]
    assert all(row["layers"] > 0 and row["mean_effective_rank"] > 0 for row in ranks.values())
    with_all = next(row for name, row in ranks.items() if "all layers" in name)
    assert with_all["total_nuclear_norm"] < ranks["lambda_rank=0"]["total_nuclear_norm"]


def test_kernels_benchmark_runs_as_a_module_and_times_the_reference_on_cpu(tmp_path):
    out = tmp_path / "kernels.json"
    command = [sys.executable, "-m", "benchmarks.kernels", "--tokens", "16", "--shapes", "16x24", "--densities", "0.1"]
    completed = subprocess.run(
        [*command, "--dtype", "fp32", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    report = json.loads(out.read_text())
    assert report["dtype"] == "fp32" and report["torch"]
    ops = {row["op"] for row in report["rows"]}
    assert {"grad/reference", "effective-weight"} <= ops
    assert all(row["ms"] > 0 and row["nnz"] == 38 for row in report["rows"])


def test_cpu_grad_benchmark_compares_the_sddmm_with_the_gemm_at_each_point(tmp_path):
    from benchmarks import cpu_grad

    out = tmp_path / "cpu_grad.json"
    threads = torch.get_num_threads()
    try:
        report = cpu_grad.main(
            ["--shapes", "16x24", "--tokens", "8,32", "--densities", "0.1,0.5", "--threads", "1", "--repeats", "2"]
            + ["--out", str(out)]
        )
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == report
    assert [(row["tokens"], row["density"]) for row in report["rows"]] == [(8, 0.1), (8, 0.5), (32, 0.1), (32, 0.5)]
    assert all(row["gemm_ms"] > 0 and row["sddmm_ms"] > 0 for row in report["rows"])


def test_gpu_suite_tiny_measures_each_part_and_writes_json_and_markdown(runs):
    report = _finish(*runs["suite"])
    assert report["benchmark"] == "gpu_suite" and report["tiny"] is True and report["skipped"] == []
    sd15 = report["sd15"]["batches"]["2"]
    assert sd15["failed"] == {} and set(sd15["methods"]) == set(TINY.sd15_methods)
    sara = sd15["methods"]["sara"]
    assert sara["step_s"] > 0 and sara["peak_bytes"] > 0
    assert sara["step_vs_lora_r8"] > 0 and sara["step_vs_floor"] > 0 and sara["peak_vs_lora_r8"] > 0
    assert report["sd15"]["dtype"] == "bfloat16"
    sdxl = report["sdxl"]
    assert sdxl["gradient_checkpointing"] is True and sdxl["preset"]["name"] == "tiny-sdxl"
    assert set(sdxl["batches"]["1"]["methods"]) == set(TINY.sdxl_methods)
    assert any("16 GiB" in target["target"] and target["met"] for target in report["targets"])
    kernels = report["kernels"]
    assert kernels["status"] == "ok" and kernels["triton"] is False  # reference timings only on CPU
    assert {row["dtype"] for row in kernels["rows"]} == {case[0] for case in TINY.kernel_cases}
    markdown = runs["suite"][1].with_suffix(".md").read_text()
    assert "## Train step: `tiny`" in markdown and "## Targets" in markdown and "| sara | ok |" in markdown


def _kernel_rows(dtype: str, shape: str, tokens: int, sddmm_ms: dict[float, float], gemm_ms: float) -> list[dict]:
    rows = []
    for density, ms in sddmm_ms.items():
        common = {"dtype": dtype, "shape": shape, "tokens": tokens, "density": density}
        rows += [{**common, "op": "grad/triton-sddmm", "ms": ms}, {**common, "op": "grad/triton-gemm", "ms": gemm_ms}]
    return rows


def test_sddmm_cutoff_is_the_density_with_least_mean_slowdown():
    # SDDMM time grows with density, the GEMM's does not: 320x320 crosses over at 0.05, 1280x1280 at 0.1.
    rows = _kernel_rows("bf16", "320x320", 4096, {0.01: 1.0, 0.02: 1.5, 0.05: 3.0, 0.1: 6.0}, gemm_ms=2.0)
    rows += _kernel_rows("bf16", "1280x1280", 4096, {0.01: 1.0, 0.02: 2.0, 0.05: 3.5, 0.1: 7.0}, gemm_ms=4.0)
    rows += _kernel_rows("fp32", "320x320", 4096, {0.01: 3.0, 0.1: 9.0}, gemm_ms=1.0)
    chosen = suite_kernels.choose_sddmm_cutoffs(rows, {"bf16": 0.01, "fp32": 0.05})
    assert chosen["bf16"]["cutoff"] == 0.02 and chosen["bf16"]["gemm_from_density"] == 0.05
    assert chosen["bf16"]["mean_slowdown"] == pytest.approx((7 + 4.0 / 3.5) / 8)  # 1280x1280 loses at 0.05
    assert chosen["bf16"]["current_mean_slowdown"] > chosen["bf16"]["mean_slowdown"]
    crossovers = {row["shape"]: row["gemm_faster_from_density"] for row in chosen["bf16"]["crossovers"]}
    assert crossovers == {"320x320": 0.05, "1280x1280": 0.1}
    assert chosen["fp32"]["cutoff"] == 0.0  # the GEMM always won: never the SDDMM
    point = {"dtype": "bf16", "tokens": 4096, "shape": "320x320", "density": 0.01}
    timed = {
        "grad/reference": 4.0,
        "grad/triton-auto": 1.0,
        "effective-weight": 0.5,
    }
    other_point = {**point, "shape": "1280x1280"}
    rows = [{**point, "op": op, "ms": ms} for op, ms in timed.items()]
    rows.append({**other_point, "op": "effective-weight", "ms": 1.5})  # no gradient timings at this point
    speedups = suite_kernels.kernel_speedups(rows)
    assert speedups == [
        {"dtype": "bf16", "tokens": 4096, "grad_speedup_median": 4.0, "effective_weight_ms_median": 1.0}
    ]


def test_budget_passes_unused_time_on_and_skips_cases_that_would_overrun():
    now = [100.0]
    budget = Budget({"a": 10.0, "b": 20.0}, clock=lambda: now[0])
    log = CaseLog("a", budget)
    assert log.should_run("x", "first case")  # nothing measured yet: a part's first case always runs
    now[0] += 4.0
    log.record("x", 4.0)
    assert log.should_run("x", "second case")
    now[0] += 4.0
    log.record("x", 4.0)
    assert not log.should_run("x", "third case") and "third case: skipped" in log.skipped[0]
    later = CaseLog("b", budget, guesses_s={"slow": 25.0})
    assert budget.left("b") == pytest.approx(22.0)  # part a's 2 unused seconds pass to b
    assert not later.should_run("slow", "compiled case")  # the guess stands in until a case of its kind ran
    assert later.should_run("quick", "other case")
    assert budget.timeout("b") == pytest.approx(22.0 + GRACE_S)


def _sleep(seconds: float) -> dict:
    time.sleep(seconds)
    return {}


def test_child_running_past_its_timeout_is_stopped_and_reported():
    start = time.monotonic()
    with pytest.raises(TimeoutError) as caught:
        run_in_fresh_process(_sleep, 30.0, timeout_s=0.5)
    assert time.monotonic() - start < 10
    assert failure_status(caught.value) == "timeout"
    assert failure_status(RuntimeError("torch.OutOfMemoryError: CUDA out of memory.")) == "oom"
    assert failure_status(RuntimeError("ValueError: bad")) == "error"


@pytest.mark.parametrize(("preset", "parameters"), [("sd15", 859_520_964), ("sdxl", 2_567_463_684)])
def test_gpu_presets_have_the_real_unet_sizes(preset, parameters):
    with torch.device("meta"):
        model = model_class("unet")(**PRESETS[preset].config)
    assert sum(param.numel() for param in model.parameters()) == parameters


def test_load_benchmark_reports_every_operation_for_both_methods(tmp_path):
    from benchmarks.load import OPERATIONS

    out = tmp_path / "load.json"
    report = _finish(_start("benchmarks.load", out, "--preset", "small", "--repeats", "1"), out)
    assert [row["operation"] for row in report["rows"]] == list(OPERATIONS)
    for row in report["rows"]:
        assert row["sara_s"] > 0 and row["lora_s"] > 0 and row["ratio"] > 0, row
        assert len(row["sara_runs_s"]) == len(row["lora_runs_s"]) == 1
    assert report["dtype"] == "float32" and report["preset"]["name"] == "small"
    assert report["sara"]["trainable_parameters"] > 0 and report["lora"]["trainable_parameters"] > 0
