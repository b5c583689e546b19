"""Multi-process training on an existing engine: 2 CPU processes over gloo, across progressive re-selection and resume.

Re-selection compacts the SaRA values in place, so the DDP wrapper that ``accelerator.prepare`` built once keeps
all-reducing the right Parameters: both ranks end bitwise identical, and equal (to float rounding) to one process
with the same global batch. FSDP2 (``fully_shard``, mixed ``requires_grad``) runs on CPU too. The training script runs
under ``accelerate launch --multi_gpu --num_processes 2`` with ``ACCELERATE_USE_CPU=1`` (accelerate's way to get
several CPU processes; ``--cpu`` alone starts one). Runs happen in subprocesses (``tests/distributed_worker.py``),
concurrently, each on one thread.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
WORKER = TESTS_DIR / "distributed_worker.py"
EXAMPLE = TESTS_DIR / "example_with_rank_dumps.py"
sys.path.insert(0, str(TESTS_DIR))  # helper modules beside this file, with or without tests/__init__.py
import tiny_pipelines  # noqa: E402
from test_train_example import TRAIN_ARGS, script_env, write_image_folder  # noqa: E402

OPTIMIZERS = ("adamw", "sgd")
# SGD is linear in the gradients: a data-parallel run differs from one process only by the order of float additions.
SGD_TOLERANCE = 1e-6

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",  # CPU and gloo everywhere, GPU machine included
        ACCELERATE_USE_CPU="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    env.update(overrides)
    return env


def accelerate_launch(num_processes: int, port: int) -> list[str]:
    """``accelerate launch`` for ``num_processes`` CPU processes (gloo) on this machine."""
    return [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1"),
        *("--num_processes", str(num_processes), "--main_process_port", str(port)),
        *("--mixed_precision", "no", "--dynamo_backend", "no"),
    ]


def start(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / "log.txt", "w") as log:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, cwd: Path, timeout: int = 600) -> None:
    try:
        returncode = process.wait(timeout=timeout)
    finally:
        process.kill()
    log = (cwd / "log.txt").read_text()
    assert returncode == 0, f"exit {returncode}\n{log[-6000:]}"


def load(directory: Path, optimizer: str, run: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(directory / f"{optimizer}-{run}-rank{rank}.pt", weights_only=True)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| over the values tensors (the selection must agree for them to be comparable)."""
    return max(
        (a[key].double() - b[key].double()).abs().max().item() for key in a if "values" in key and a[key].numel()
    )


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory):
    """The worker as one process, as 2 DDP processes under accelerate, and as 2 FSDP2 processes, concurrently."""
    root = tmp_path_factory.mktemp("distributed")
    single, ddp, fsdp2 = root / "single", root / "ddp", root / "fsdp2"
    processes = [
        (start([sys.executable, str(WORKER), "--output_dir", str(single)], single, worker_env()), single),
        (start([*accelerate_launch(2, free_port()), str(WORKER), "--output_dir", str(ddp)], ddp, worker_env()), ddp),
        (
            start(
                [
                    *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
                    *("--master_port", str(free_port()), str(WORKER), "--engine", "fsdp2", "--output_dir", str(fsdp2)),
                ],
                fsdp2,
                worker_env(),
            ),
            fsdp2,
        ),
    ]
    try:
        for process, cwd in processes:
            finish(process, cwd)
    finally:
        for process, _ in processes:
            process.kill()
    return single, ddp, fsdp2


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_ddp_ranks_end_bitwise_identical_across_reselection_and_resume(worker_runs, optimizer):
    _, ddp, _ = worker_runs
    rank0, rank1 = load(ddp, optimizer, "full", 0), load(ddp, optimizer, "full", 1)
    assert any("frozen" in key and value.numel() for key, value in rank0.items()), "no entry was re-selected away"
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # Resumed from the step-4 checkpoint (after the step-3 re-selection) into a model prepared before loading.
    for rank in (0, 1):
        resumed = load(ddp, optimizer, "resumed", rank)
        for key in rank0:
            assert torch.equal(resumed[key], rank0[key]), (rank, key)


def test_ddp_equals_one_process_with_the_same_global_batch(worker_runs):
    single, ddp, _ = worker_runs
    one, two = load(single, "sgd", "full", 0), load(ddp, "sgd", "full", 0)
    for key in one:
        if "indices" in key:  # the same entries were kept and frozen
            assert torch.equal(one[key], two[key]), key
    difference = max_difference(one, two)
    print(f"DDP (2 processes) vs 1 process, SGD: max |difference| of the SaRA values = {difference:.3g}")
    assert difference < SGD_TOLERANCE
    assert all(torch.equal(one[key], load(single, "sgd", "resumed", 0)[key]) for key in one)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fsdp2_with_mixed_requires_grad_trains_across_reselection(worker_runs, optimizer):
    single, ddp, fsdp2 = worker_runs
    rank0, rank1 = load(fsdp2, optimizer, "full", 0), load(fsdp2, optimizer, "full", 1)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    if optimizer == "sgd":
        one = load(single, optimizer, "full", 0)
        assert all(torch.equal(one[key], rank0[key]) for key in one if "indices" in key)
        difference = max_difference(one, rank0)
        print(f"FSDP2 (2 processes) vs 1 process, SGD: max |difference| of the SaRA values = {difference:.3g}")
        assert difference < SGD_TOLERANCE
    # Both engines average the same two gradients: FSDP2's reduce-scatter and DDP's all-reduce agree bitwise.
    assert all(torch.equal(rank0[key], load(ddp, optimizer, "full", 0)[key]) for key in rank0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 over NCCL needs 2 CUDA devices (CPU/gloo runs above)")
def test_fsdp2_on_two_gpus_trains_across_reselection(tmp_path):
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())),
        *(str(WORKER), "--engine", "fsdp2", "--device", "cuda", "--output_dir", str(tmp_path)),
    ]
    env = worker_env()
    env.pop("CUDA_VISIBLE_DEVICES")
    finish(start(command, tmp_path, env), tmp_path)
    for optimizer in OPTIMIZERS:
        rank0, rank1 = load(tmp_path, optimizer, "full", 0), load(tmp_path, optimizer, "full", 1)
        assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory):
    """The training script under ``accelerate launch`` with 2 CPU processes: 4 steps (re-selection and a checkpoint
    at step 2), then a run resumed from that checkpoint."""
    root = tmp_path_factory.mktemp("example-ddp")
    common = [
        *("--pretrained_model_name_or_path", str(tiny_pipelines.build_sd_pipeline(root))),
        *("--train_data_dir", str(write_image_folder(root / "data")), *TRAIN_ARGS),
    ]
    runs = {}
    for name, extra in (("full", []), ("resumed", ["--resume_from_checkpoint", "latest"])):
        output_dir, dumps = root / name, root / f"{name}-ranks"
        dumps.mkdir()
        if name == "resumed":
            output_dir.mkdir()
            shutil.copytree(root / "full" / "checkpoint-2", output_dir / "checkpoint-2")
        command = [*accelerate_launch(2, free_port()), str(EXAMPLE), *common, "--output_dir", str(output_dir), *extra]
        env = worker_env(**{key: value for key, value in script_env(root).items() if key != "PYTHONPATH"})
        env.update(SARA_RANK_DUMP_DIR=str(dumps), HF_HUB_OFFLINE="1")
        finish(start(command, root / f"{name}-log", env), root / f"{name}-log")
        runs[name] = SimpleNamespace(
            output_dir=output_dir,
            ranks=[torch.load(dumps / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)],
            log=(root / f"{name}-log" / "log.txt").read_text(),
        )
    return runs


def test_example_under_accelerate_ddp_keeps_ranks_identical_across_reselection_and_resume(example_runs):
    full, resumed = example_runs["full"], example_runs["resumed"]
    assert "re-selected" in full.log and "Resumed from" in resumed.log and "at step 2" in resumed.log
    for run in (full, resumed):
        rank0, rank1 = run.ranks
        assert any("frozen" in key and value.numel() for key, value in rank0.items())
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), key
    for key in full.ranks[0]:  # resuming continues the 2-process run bitwise
        assert torch.equal(full.ranks[0][key], resumed.ranks[0][key]), key
    saved = load_file(full.output_dir / "unet" / "adapter_model.safetensors")
    assert saved.keys() == load_file(resumed.output_dir / "unet" / "adapter_model.safetensors").keys()
