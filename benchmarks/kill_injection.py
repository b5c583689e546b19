"""Kill injection (as SQLite tests its atomic commit): SIGKILL every folder saver at random instants and check what is
left, as a user would find it.

One process builds tiny models once (a UNet and a CLIP text encoder with SaRA adapters, their optimizers, schedulers
and helpers), then forks a child per try: the child sets the adapter's values (and optimizer state) to version A or
B, reports ready, and saves over the folder the previous try left; the parent SIGKILLs it after a random delay drawn
uniformly over 1.25x the save's measured duration (a child whose save returned waits for its kill). After each kill
the folder is read the way peft-sara's readers read it (``recover_folder`` / ``latest_checkpoint`` first) and its files compared byte for byte with a complete save of the
old and of the new version: "old intact", "new intact", or "other" (a mix, a missing or a torn file: must be 0).
"recovered" counts kills inside the publish step (after the commit), "mixed before recovery" those after which a reader
outside peft-sara (which does not recover) would have seen a mix of old and new entries.

``peft_save_pretrained`` is PEFT's own ``PeftModel.save_pretrained``, which writes in place (the model card, then
``adapter_model.safetensors``, then ``adapter_config.json``); the two versions differ in their values and in a setting
(``lambda_rank``). Its adapter files (not the card, which no loader reads) are compared; a folder that is neither
version is "refused" if ``PeftModel.from_pretrained`` and ``read_sara_config`` + ``read_adapter_weights`` (what every
peft-sara loader reads) both refuse it, else "other".

``accelerate_save_state`` is the DeepSpeed examples' checkpoint (``accelerator.save_state``, every process writes its
part) through ``peft_sara.atomic.distributed_folder_writer``, run here by one CPU process (accelerate without DeepSpeed:
model, optimizer, scheduler and RNG files) over the same checkpoint folder.

    python -m benchmarks.kill_injection                 # 50 kills per saver, JSON to benchmarks/results/
    python -m benchmarks.kill_injection --kills 200 --savers pipeline_adapter checkpoint_rotation
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/kill_injection.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "kill_injection.json"
SAVERS = (
    "pipeline_adapter",
    "training_state",
    "checkpoint_rotation",
    "peft_lora_export",
    "merged_model",
    "peft_save_pretrained",
    "accelerate_save_state",
)
PEFT_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


# ------------------------------------------------------------------------------------------------- the models
class TinyPipeline:
    """What ``save_sara_adapter`` / ``export_adapter`` read of a pipeline: its components."""

    def __init__(self, **components: torch.nn.Module) -> None:
        self.components = components


def _tiny_clip_text() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def _tiny_peft_base() -> torch.nn.Module:
    from collections import OrderedDict

    torch.manual_seed(0)
    layers = OrderedDict(lin0=torch.nn.Linear(64, 128), act=torch.nn.ReLU(), lin1=torch.nn.Linear(128, 64))
    return torch.nn.Sequential(layers).eval()


@dataclass
class World:
    pipe: TinyPipeline
    components: list  # TrainedComponent
    peft_model: Any = None  # a PeftModel, saved with PEFT's own save_pretrained
    accelerator: Any = None  # accelerate_save_state: made by its setup, in the saver's worker


def build_world() -> World:
    import peft_sara
    from peft_sara.presets import PRESETS, build_model
    from peft_sara.training import SaRATrainingHelper, TrainedComponent, add_sara_adapter

    unet = build_model(PRESETS["tiny"], seed=0)
    text_encoder = _tiny_clip_text()
    components = []
    for name, module, targets in (
        ("unet", unet, ["to_q", "to_v", "conv1"]),
        ("text_encoder", text_encoder, ["q_proj", "v_proj"]),
    ):
        params = add_sara_adapter(module, peft_sara.SaRAConfig(threshold=2e-3, target_modules=targets))
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        for param in params:  # one step, so that every parameter has Adam moments to save
            param.grad = torch.ones_like(param)
        optimizer.step()
        optimizer.zero_grad()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        helper = SaRATrainingHelper(module, optimizer, total_steps=100)
        components.append(TrainedComponent(name, module, optimizer, scheduler, helper))
    from peft import get_peft_model

    peft_model = get_peft_model(
        _tiny_peft_base(), peft_sara.SaRAConfig(trainable_fraction=0.2, target_modules=["lin0", "lin1"])
    )
    return World(TinyPipeline(unet=unet, text_encoder=text_encoder), components, peft_model)


def set_version(world: World, version: int) -> None:
    """Give every SaRA value and optimizer moment a value that says which version this is."""
    with torch.no_grad():
        for component in world.components:
            for name, param in component.model.named_parameters():
                if "sara_values" in name:
                    param.fill_(0.01 * (version + 1))
            for state in component.optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.numel() > 1:
                        value.fill_(0.1 * (version + 1))
        if world.peft_model is not None:
            for name, param in world.peft_model.named_parameters():
                if "sara_values" in name:
                    param.fill_(0.01 * (version + 1))
            world.peft_model.peft_config["default"].lambda_rank = 1e-3 * version  # a setting differs too
    torch.manual_seed(version)  # the RNG states a checkpoint holds
    random.seed(version)
    np.random.seed(version)


# ------------------------------------------------------------------------------------------------- the savers
@dataclass
class Saver:
    """How a saver writes version ``v`` (``save(world, root, v, step)``) and what a user reads back."""

    save: Callable[[World, Path, int, int], None]
    target: Callable[[Path, int], Path]  # the folder a user reads (for a step)
    prepare_root: Callable[[Path], None] = lambda root: None
    rotating: bool = False  # checkpoints: each published save is a new step
    files: tuple[str, ...] | None = None  # only these files are compared (None: every file)
    setup: Callable[[World], None] | None = None  # run once in the saver's worker, before any save
    refusal: Callable[[Path], str | None] | None = None  # in-place writers: why every reader refuses a folder


def _save_pipeline_adapter(world: World, root: Path, version: int, step: int) -> None:
    import peft_sara

    peft_sara.save_sara_adapter(world.pipe, root / "adapter", adapter_name="default")


def _foreign_content(root: Path) -> None:
    # A training run's output folder: the final adapter is saved beside checkpoints and other files, which stay.
    (root / "adapter" / "checkpoint-7").mkdir(parents=True)
    (root / "adapter" / "checkpoint-7" / "state.txt").write_text("not the saver's")
    (root / "adapter" / "notes.txt").write_text("not the saver's either")


def _save_training_state(world: World, root: Path, version: int, step: int) -> None:
    from peft_sara.training import save_training_state

    unet = world.components[0]
    save_training_state(str(root / "state"), unet.model, unet.optimizer, unet.lr_scheduler, unet.helper)


def _save_checkpoint_rotation(world: World, root: Path, version: int, step: int) -> None:
    from peft_sara.training import checkpoint_folder, remove_old_checkpoints, save_training_checkpoint

    output_dir = root / "run"
    save_training_checkpoint(checkpoint_folder(output_dir, step), world.components)
    remove_old_checkpoints(output_dir, keep=1)  # --checkpoints_total_limit 1, as the examples rotate


def _checkpoint_target(root: Path, step: int) -> Path:
    from peft_sara.training import latest_checkpoint

    latest = latest_checkpoint(root / "run")  # runs the recovery, as a resuming script does
    return Path(latest) if latest is not None else root / "run" / "none"


def _save_peft_lora(world: World, root: Path, version: int, step: int) -> None:
    from peft_sara.conversion import export_adapter

    export_adapter(world.pipe, root / "lora", "peft-lora", rank=2, adapter_name="default")


def _save_merged(world: World, root: Path, version: int, step: int) -> None:
    from peft_sara.conversion import save_merged

    save_merged(world.components[0].model, root / "merged", adapter_name="default")


def _save_peft(world: World, root: Path, version: int, step: int) -> None:
    world.peft_model.save_pretrained(root / "peft")


def _refused_by_every_reader(folder: Path) -> str | None:
    """If PEFT's ``from_pretrained`` and peft-sara's folder reading (``read_sara_config`` + ``read_adapter_weights``,
    which every peft-sara loader runs) both refuse ``folder``: why (``half-written``: weights and config of two saves;
    ``unreadable``: a torn or missing file), else None."""
    from peft import PeftModel

    from peft_sara.adapter_files import read_adapter_weights, read_sara_config

    def peft_sara_read() -> None:
        read_sara_config(folder)
        read_adapter_weights(folder)

    refused, reasons = 0, set()
    for read in (lambda: PeftModel.from_pretrained(_tiny_peft_base(), str(folder)), peft_sara_read):
        try:
            read()
        except Exception as err:  # the refusal being counted (a torn file, a half-written save)
            refused += 1
            reasons.add("half-written" if "two different saves" in str(err) else "unreadable")
    return ("half-written" if reasons == {"half-written"} else "unreadable") if refused == 2 else None


def _setup_accelerator(world: World) -> None:
    import logging

    from accelerate import Accelerator

    logging.getLogger("accelerate").setLevel(logging.ERROR)  # a warning per save about tied frozen-entry buffers
    world.accelerator = Accelerator(cpu=True)
    unet = world.components[0]
    world.accelerator.prepare(unet.model, unet.optimizer, unet.lr_scheduler)


def _save_accelerate_state(world: World, root: Path, version: int, step: int) -> None:
    from peft_sara.atomic import distributed_folder_writer

    accelerator = world.accelerator
    with distributed_folder_writer(root / "ds", accelerator.is_main_process, accelerator.wait_for_everyone) as staging:
        accelerator.save_state(str(staging))


SAVER_TABLE: dict[str, Saver] = {
    "pipeline_adapter": Saver(_save_pipeline_adapter, lambda root, step: root / "adapter", _foreign_content),
    "training_state": Saver(_save_training_state, lambda root, step: root / "state"),
    "checkpoint_rotation": Saver(_save_checkpoint_rotation, _checkpoint_target, rotating=True),
    "peft_lora_export": Saver(_save_peft_lora, lambda root, step: root / "lora"),
    "merged_model": Saver(_save_merged, lambda root, step: root / "merged"),
    "peft_save_pretrained": Saver(
        _save_peft, lambda root, step: root / "peft", files=PEFT_ADAPTER_FILES, refusal=_refused_by_every_reader
    ),
    "accelerate_save_state": Saver(_save_accelerate_state, lambda root, step: root / "ds", setup=_setup_accelerator),
}


# ------------------------------------------------------------------------------------------------- checking
def fingerprint(folder: Path, files: tuple[str, ...] | None = None) -> dict[str, str] | None:
    """SHA-256 of every file under ``folder`` that belongs to the saved content (not the writer's staging), or of
    ``files`` only."""
    from peft_sara.atomic import is_protocol_name

    if not folder.is_dir():
        return None
    found = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(is_protocol_name(part) for part in relative.parts) or not path.is_file():
            continue
        if files is not None and str(relative) not in files:
            continue
        found[str(relative)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _interrupted(root: Path) -> bool:
    """Whether a folder under ``root`` holds a committed but unfinished publish (before any reader recovers it)."""
    from peft_sara.atomic import NEW_NAME, OLD_NAME

    return any(path.name in (NEW_NAME, OLD_NAME) for path in root.rglob(".sara-*"))


def _run_child(world: World, saver: Saver, root: Path, version: int, step: int, delay: float | None):
    """Fork a child that saves ``version``; kill it ``delay`` seconds after it is ready (None: let it finish).
    Returns (killed, failed, seconds from ready to exit or kill)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: save, never return into the parent's code
        code = 0
        try:
            os.close(read_end)
            set_version(world, version)
            os.write(write_end, b"r")
            saver.save(world, root, version, step)
            if delay is not None:  # a kill may also land after the save returned: wait for it
                time.sleep(3600)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    os.close(write_end)
    os.read(read_end, 1)
    os.close(read_end)
    start = time.perf_counter()
    if delay is None:
        _, status = os.waitpid(pid, 0)
    else:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    seconds = time.perf_counter() - start
    killed = os.WIFSIGNALED(status)
    failed = os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0
    return killed, failed, seconds


def run_saver(world: World, name: str, kills: int, seed: int, workdir: Path) -> dict[str, Any]:
    from peft_sara.atomic import recover_folder

    saver = SAVER_TABLE[name]
    if saver.setup is not None:
        saver.setup(world)
    root = workdir / name
    root.mkdir()
    saver.prepare_root(root)
    rng = random.Random(seed)
    expected: dict[int, dict[str, str] | None] = {}
    durations = []
    step = 1
    # Calibration: complete saves of both versions give the expected files and the save's duration.
    for version in (0, 1, 0):
        killed, failed, seconds = _run_child(world, saver, root, version, step, None)
        if failed or killed:
            raise RuntimeError(f"{name}: a calibration save failed")
        found = fingerprint(saver.target(root, step), saver.files)
        if version in expected and expected[version] != found:
            raise RuntimeError(f"{name}: two complete saves of the same version differ; the check needs equal bytes")
        expected[version] = found
        durations.append(seconds)
        step += 1 if saver.rotating else 0
    # Kills spread over the median save and a quarter beyond it: the publish and the instants after the save returned
    # (the child waits to be killed then) are included, so both outcomes occur however short the publish step is.
    duration = sorted(durations)[1]
    current = 0  # the version the folder holds now
    counts = {"kills": 0, "old_intact": 0, "new_intact": 0, "refused": 0, "other": 0, "recovered": 0, "completed": 0}
    counts["failed"] = 0
    counts["mixed_before_recovery"] = 0
    counts["refused_half_written"] = 0
    previous_step = step - 1 if saver.rotating else step
    tries = 0
    while counts["kills"] < kills and tries < kills * 4:
        tries += 1
        new = 1 - current
        killed, failed, _ = _run_child(world, saver, root, new, step, rng.uniform(0, duration * 1.25))
        if failed:
            counts["failed"] += 1
        interrupted = _interrupted(root)
        target = saver.target(root, step)  # for checkpoints: the latest complete one
        if not saver.rotating and saver.refusal is None:
            unrecovered = fingerprint(target)  # what a reader outside peft-sara (PEFT, diffusers) sees
            if killed and unrecovered not in (expected[new], expected[current]):
                counts["mixed_before_recovery"] += 1
            recover_folder(target)  # what peft-sara's readers do first
        found = fingerprint(target, saver.files)
        if saver.rotating:
            is_new = target.name.endswith(f"-{step}") and found == expected[new]
            is_old = target.name.endswith(f"-{previous_step}") and found == expected[current]
        else:
            is_new, is_old = found == expected[new], found == expected[current]
        if not killed:
            counts["completed"] += 1
            outcome = "new_intact" if is_new else "other"
        else:
            counts["kills"] += 1
            counts["recovered"] += int(interrupted)
            outcome = "new_intact" if is_new else "old_intact" if is_old else "other"
            reason = saver.refusal(target) if outcome == "other" and saver.refusal is not None else None
            if reason is not None:
                outcome = "refused"
                counts["refused_half_written"] += reason == "half-written"
        if killed or outcome == "other":
            counts[outcome] += 1
        if outcome == "new_intact":
            current = new
            if saver.rotating:
                previous_step, step = step, step + 1
        elif outcome in ("other", "refused"):  # start the next try from a known state
            _run_child(world, saver, root, current, step, None)
    counts["save_seconds"] = round(duration, 4)
    return counts


def _run_all(world: World, args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, Any]]:
    """Each saver in its own forked worker, ``args.jobs`` at a time (each worker forks the savers it kills)."""
    savers = list(enumerate(args.savers))
    running: dict[int, str] = {}
    while savers or running:
        while savers and len(running) < args.jobs:
            index, name = savers.pop(0)
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    counts = run_saver(world, name, args.kills, args.seed * 1000 + index, workdir)
                    (workdir / f"{name}.json").write_text(json.dumps(counts))
                except BaseException:
                    traceback.print_exc()
                    code = 1
                os._exit(code)
            running[pid] = name
        pid, _ = os.wait()
        running.pop(pid, None)
    results = {}
    for name in args.savers:
        path = workdir / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.is_file() else {"kills": 0, "other": -1, "failed": 1}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="kills per saver (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--savers", nargs="+", choices=SAVERS, default=list(SAVERS))
    parser.add_argument("--json", type=Path, default=RESULTS_PATH, help="where to write the counts")
    parser.add_argument(
        "--jobs", type=int, default=1, help="savers run at once in forked workers (default 1: the run waits on I/O)"
    )
    args = parser.parse_args(argv)
    if not hasattr(os, "fork"):
        print("kill injection needs os.fork (POSIX)")
        return 2
    torch.set_num_threads(1)
    world = build_world()
    with tempfile.TemporaryDirectory(prefix="sara-kill-") as workdir:
        results = _run_all(world, args, Path(workdir))
    header = (
        f"{'saver':<22}{'kills':>7}{'old intact':>12}{'new intact':>12}{'refused':>9}{'other':>7}{'recovered':>11}"
        f"{'mixed unrecovered':>19}{'save s':>9}"
    )
    print(header)
    for name, counts in results.items():
        if "old_intact" not in counts:
            print(f"{name:<22} failed (see the traceback above)")
            continue
        print(
            f"{name:<22}{counts['kills']:>7}{counts['old_intact']:>12}{counts['new_intact']:>12}"
            f"{counts['refused']:>9}{counts['other']:>7}"
            f"{counts['recovered']:>11}{counts['mixed_before_recovery']:>19}{counts['save_seconds']:>9.3f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"seed": args.seed, "kills_per_saver": args.kills, "savers": results}, indent=2))
    return 0 if all(counts.get("other") == 0 and counts.get("failed") == 0 for counts in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
