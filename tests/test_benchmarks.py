"""Smoke tests of the benchmark scripts: each runs end to end on a toy preset and writes the documented JSON fields.

The two scripts start together in subprocesses (one torch thread each) so the module stays well under a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.train_step import METHODS

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
        "--merge-repeats",
        "1",
    )
    yield {"train": (train, train_out), "inference": (inference, inference_out)}
    for process, _ in (train, train_out), (inference, inference_out):
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
    }
    assert all(seconds > 0 for seconds in report["times_s"].values())
    checks = report["checks"]
    assert checks["merged_matches_unmerged"] is True
    assert checks["unmerge_restores_base_bitwise"] is True
    assert checks["base_output_restored_bitwise"] is True
    assert checks["adapter_changes_output"] is True


@pytest.mark.slow
def test_train_step_runs_every_method_on_a_unet_with_convolutions(tmp_path):
    out = tmp_path / "train-unet.json"
    report = _finish(
        _start("benchmarks.train_step", out, "--preset", "tiny", "--steps", "1", "--warmup", "0", "--rounds", "1"), out
    )
    assert list(report["methods"]) == list(METHODS)
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
    assert {"grad/reference", "patch+restore/reference"} <= ops
    assert all(row["ms"] > 0 and row["nnz"] == 38 for row in report["rows"])
