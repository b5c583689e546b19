"""Crash safety of every folder saver (peft_sara.atomic.folder_writer): a kill at any instant leaves the old folder or
the new one, whole (kill injection at random instants, as SQLite tests its commit), and the protocol's recovery
states, each set up by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from torch import nn

import peft_sara
from peft_sara.atomic import NEW_NAME, OLD_NAME, STAGING_MARK, folder_writer, recover_folder
from peft_sara.training import (
    checkpoint_folder,
    latest_checkpoint,
    load_training_state,
    remove_old_checkpoints,
    save_training_state,
)
from peft_sara.training.checkpoint_folders import checkpoint_steps

REPO_ROOT = Path(__file__).resolve().parent.parent


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kill injection forks")
def test_kill_injection_leaves_old_or_new_folder_for_every_saver(tmp_path):
    """50 SIGKILLs per saver at random instants over the save (benchmarks.kill_injection, seeded): every folder is
    the complete old or the complete new one, byte for byte, or (PEFT's in-place save_pretrained only) refused by every
    reader; both outcomes occur (the kills span the save)."""
    out = tmp_path / "kills.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.kill_injection", "--kills", "50", "--seed", "0", "--json", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.is_file(), result.stdout[-2000:] + result.stderr[-4000:]
    savers = json.loads(out.read_text())["savers"]
    assert set(savers) == {
        "pipeline_adapter",
        "training_state",
        "checkpoint_rotation",
        "peft_lora_export",
        "merged_model",
        "peft_save_pretrained",
        "accelerate_save_state",
    }
    for name, counts in savers.items():
        assert counts["kills"] >= 50, (name, counts)
        assert counts["other"] == 0 and counts["failed"] == 0, (name, counts, result.stderr[-3000:])
        # PEFT's own save_pretrained writes in place: a kill may leave a folder every reader refuses, never a mix
        # that loads. Every folder saver of peft-sara leaves the old or the new folder.
        if name != "peft_save_pretrained":
            assert counts["refused"] == 0, (name, counts)
        assert counts["old_intact"] + counts["new_intact"] + counts["refused"] == counts["kills"], (name, counts)
        assert counts["old_intact"] > 0 and counts["new_intact"] > 0, (name, counts)
    assert result.returncode == 0


# ------------------------------------------------------------------------------------------------- the protocol
def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def test_a_new_folder_is_published_whole_and_an_error_publishes_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), folder_writer(target) as staging:
        _write(staging, {"a.txt": "new"})
        raise RuntimeError("boom")
    assert not target.exists() and os.listdir(tmp_path) == []
    with folder_writer(target) as staging:
        _write(staging, {"a.txt": "new", "sub/b.txt": "new"})
        assert not target.exists()  # nothing is visible before the publish
    assert _files(target) == {"a.txt": b"new", "sub/b.txt": b"new"}
    assert os.listdir(tmp_path) == ["out"]


def test_a_save_over_a_folder_replaces_its_own_entries_and_keeps_the_others(tmp_path):
    target = tmp_path / "out"
    _write(target, {"unet/w": "old", "text_encoder/w": "old", "README.md": "old", "checkpoint-5/s": "user"})
    with pytest.raises(RuntimeError), folder_writer(target) as staging:
        _write(staging, {"unet/w": "new"})
        raise RuntimeError
    assert _files(target) == {
        "unet/w": b"old",
        "text_encoder/w": b"old",
        "README.md": b"old",
        "checkpoint-5/s": b"user",
    }
    with folder_writer(target) as staging:
        _write(staging, {"unet/w": "new", "text_encoder/w": "new", "README.md": "new"})
    assert _files(target) == {
        "unet/w": b"new",
        "text_encoder/w": b"new",
        "README.md": b"new",
        "checkpoint-5/s": b"user",
    }


@pytest.mark.parametrize("moved", [0, 1, 2])
def test_recovery_rolls_a_committed_save_forward_wherever_it_was_killed(tmp_path, moved):
    """A kill after the commit (staging renamed to .sara-new) and after `moved` of the 2 entries were moved in: the
    next reader gets the whole new folder."""
    target = tmp_path / "out"
    _write(target, {"unet/w": "old", "text_encoder/w": "old", "notes": "user"})
    _write(target / NEW_NAME, {"unet/w": "new", "text_encoder/w": "new"})
    (target / OLD_NAME).mkdir()
    for name in ["text_encoder", "unet"][:moved]:  # the writer moves entries in sorted order
        os.rename(target / name, target / OLD_NAME / name)
        os.rename(target / NEW_NAME / name, target / name)
    assert recover_folder(target) is True
    assert _files(target) == {"unet/w": b"new", "text_encoder/w": b"new", "notes": b"user"}
    assert recover_folder(target) is False  # nothing left to do


def test_recovery_removes_the_old_entries_of_a_finished_save(tmp_path):
    target = tmp_path / "out"
    _write(target, {"unet/w": "new"})
    _write(target / OLD_NAME, {"unet/w": "old"})
    assert recover_folder(target) is True
    assert _files(target) == {"unet/w": b"new"}


def test_the_next_writer_removes_dead_stagings_and_never_a_live_one(tmp_path):
    from peft_sara.atomic import _HOST

    target = tmp_path / "out"
    _write(target, {"a": "old"})
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that is no longer alive
    dead = target / f"{STAGING_MARK}{_HOST}-{child.pid}-0000"
    live = target / f"{STAGING_MARK}{_HOST}-{os.getppid()}-0000"
    dead_sibling = tmp_path / f".out{STAGING_MARK}{_HOST}-{child.pid}-0000"
    for folder in (dead, live, dead_sibling):
        _write(folder, {"a": "partial"})
    with folder_writer(target) as staging:
        _write(staging, {"a": "new"})
    assert not dead.exists() and not dead_sibling.exists() and live.exists()
    assert (target / "a").read_text() == "new"


def test_a_file_where_a_folder_should_go_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(NotADirectoryError), folder_writer(tmp_path / "out"):
        pass
    assert (tmp_path / "out").read_text() == "x"


# ------------------------------------------------------------------------------------------------- checkpoints
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


def _trained(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(_Tiny(), peft_sara.SaRAConfig(target_modules=["proj"], trainable_fraction=0.5))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(2, 8)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def test_latest_checkpoint_names_only_published_checkpoints(tmp_path):
    model, optimizer = _trained(tmp_path)
    save_training_state(checkpoint_folder(tmp_path, 1), model, optimizer)
    # A kill while staging checkpoint 2 leaves a hidden staging folder, never a `checkpoint-2`.
    (tmp_path / f".checkpoint-2{STAGING_MARK}host-1-0").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    assert checkpoint_steps(tmp_path) == [1]
    assert latest_checkpoint(tmp_path) == checkpoint_folder(tmp_path, 1)


def test_rotation_never_removes_the_newest_checkpoint(tmp_path):
    """The former order (`remove_old_checkpoints(limit - 1)` before saving), killed during the save with limit 1, must
    still leave a complete checkpoint: the newest one is never removed."""
    model, optimizer = _trained(tmp_path)
    for step in (1, 2):
        save_training_state(checkpoint_folder(tmp_path, step), model, optimizer)
    assert remove_old_checkpoints(tmp_path, keep=0) == [checkpoint_folder(tmp_path, 1)]
    assert checkpoint_steps(tmp_path) == [2]
    load_training_state(latest_checkpoint(tmp_path), model, optimizer)  # complete: resumes
    (tmp_path / ".checkpoint-1.sara-deleting").mkdir()  # a kill during an earlier rotation's delete
    assert remove_old_checkpoints(tmp_path, keep=1) == []
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]


def test_the_demo_pretrained_cache_is_published_whole(tmp_path, monkeypatch):
    """The demo's pretrained-base cache goes through the folder writer: a save that dies midway leaves no cache
    entry (a reader would take any folder with its record for a cached model), a complete one leaves exactly it."""
    from diffusers import UNet2DModel

    from peft_sara.demo.diffusion import PRETRAIN_INFO_NAME, _save_atomically

    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        layers_per_block=1,
        norm_num_groups=4,
    )
    cache = tmp_path / "cache" / "key"

    def dies_after_the_weights(folder, *args, **kwargs):
        (Path(folder) / "diffusion_pytorch_model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(unet, "save_pretrained", dies_after_the_weights)
        with pytest.raises(KeyboardInterrupt):
            _save_atomically(unet, {"losses": [1.0], "seconds": 1.0}, cache)
    assert not cache.exists() and os.listdir(cache.parent) == []
    for _ in range(2):  # a first save, then one over it
        _save_atomically(unet, {"losses": [1.0], "seconds": 1.0}, cache)
        assert sorted(os.listdir(cache)) == sorted(
            ["config.json", "diffusion_pytorch_model.safetensors", PRETRAIN_INFO_NAME]
        )
        assert os.listdir(cache.parent) == ["key"]
    reloaded = UNet2DModel.from_pretrained(cache)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), reloaded.state_dict().values()))


def _distributed_save(target: Path, parts: dict[int, str], fail_rank: int | None = None) -> list[BaseException]:
    """Two "processes" (threads with a shared barrier) each write their part of one folder."""
    import threading

    from peft_sara.atomic import distributed_folder_writer

    barrier = threading.Barrier(len(parts))
    errors: list[BaseException] = []

    def rank(index: int) -> None:
        try:
            with distributed_folder_writer(target, index == 0, barrier.wait) as staging:
                (staging / f"rank{index}.bin").write_text(parts[index])
                if index == fail_rank:
                    raise RuntimeError("boom")
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(index,)) for index in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def test_a_distributed_save_is_published_whole_once_every_process_has_written(tmp_path):
    """DeepSpeed's save_state (every rank writes its part) through distributed_folder_writer: the checkpoint folder
    appears complete or not at all, a killed job's staging never names a checkpoint and is removed by the next save."""
    run = tmp_path / "run"
    target = Path(checkpoint_folder(run, 5))
    staging = run / f".checkpoint-5{STAGING_MARK}distributed"
    staging.mkdir(parents=True)  # a killed job's leftover, half written
    (staging / "rank0.bin").write_text("stale")
    assert latest_checkpoint(run) is None
    assert _distributed_save(target, {0: "a0", 1: "a1"}) == []
    assert _files(target) == {"rank0.bin": b"a0", "rank1.bin": b"a1"}
    assert sorted(os.listdir(run)) == ["checkpoint-5"] and latest_checkpoint(run) == str(target)
    assert _distributed_save(target, {0: "b0", 1: "b1"}) == []  # the same step saved again: replaced whole
    assert _files(target) == {"rank0.bin": b"b0", "rank1.bin": b"b1"}
    errors = _distributed_save(checkpoint_folder(run, 6), {0: "c0", 1: "c1"}, fail_rank=0)
    assert any(str(err) == "boom" for err in errors)
    assert sorted(os.listdir(run)) == ["checkpoint-5"] and latest_checkpoint(run) == str(target)
