"""The ``checkpoint-<step>/`` folders of a training run: one subfolder per :class:`TrainedComponent`, each holding
:func:`save_training_state`'s files (the adapter in PEFT format and ``sara_training_state.safetensors``).

``peft_sara.load_sara_adapter(pipe, "out/checkpoint-500")`` loads such a folder's adapters for a look;
:func:`resume_from_checkpoint` continues the run bitwise.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

from ..atomic import folder_writer, recover_folder
from .checkpoint import load_training_state, save_training_state
from .components import TrainedComponent

CHECKPOINT_PREFIX = "checkpoint-"
DELETING_SUFFIX = ".sara-deleting"  # a rotated-out checkpoint while it is deleted


def checkpoint_folder(output_dir: str | os.PathLike, step: int) -> str:
    """The checkpoint folder of ``step`` in ``output_dir``: ``output_dir/checkpoint-<step>``."""
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")


def checkpoint_steps(output_dir: str | os.PathLike) -> list[int]:
    """Steps of the complete ``checkpoint-<step>`` folders in ``output_dir``, oldest first (none if it does not exist).

    A checkpoint folder exists under its name only once complete (:func:`save_training_checkpoint` publishes it as one
    unit); a re-save of a step killed while publishing is finished first (``peft_sara.atomic.recover_folder``)."""
    if not os.path.isdir(output_dir):
        return []
    steps = []
    for name in os.listdir(output_dir):
        suffix = name[len(CHECKPOINT_PREFIX) :]
        if name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
            recover_folder(os.path.join(output_dir, name))
            steps.append(int(suffix))
    return sorted(steps)


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint folder in ``output_dir``, or None if it has none."""
    steps = checkpoint_steps(output_dir)
    return checkpoint_folder(output_dir, steps[-1]) if steps else None


def remove_old_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[str]:
    """Delete the oldest checkpoint folders of ``output_dir`` so that at most ``keep`` remain; the deleted folders.

    Call it right after :func:`save_training_checkpoint` with the run's limit: the old checkpoints go only once the new
    one is complete. The newest checkpoint is never deleted (``keep`` below 1 counts as 1), so the former order
    (``keep=limit - 1`` before saving) cannot leave a run without a complete checkpoint if the save is killed.
    """
    steps = checkpoint_steps(output_dir)
    removed = [checkpoint_folder(output_dir, step) for step in steps[: max(len(steps) - max(keep, 1), 0)]]
    for folder in removed:  # renamed away first (atomic), so a checkpoint name never holds a half-deleted folder
        doomed = os.path.join(output_dir, f".{os.path.basename(folder)}{DELETING_SUFFIX}")
        if os.path.lexists(doomed):
            shutil.rmtree(doomed)
        os.rename(folder, doomed)
        shutil.rmtree(doomed)
    for name in os.listdir(output_dir):  # left by a kill during an earlier rotation
        if name.startswith(f".{CHECKPOINT_PREFIX}") and name.endswith(DELETING_SUFFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return removed


def save_training_checkpoint(
    path: str | os.PathLike, components: Sequence[TrainedComponent], total_limit: int | None = None
) -> None:
    """Save a resumable checkpoint of every component into ``path``, one subfolder per component: its adapter in
    PEFT format plus its optimizer, LR scheduler, SaRA helper and the RNG states (:func:`save_training_state`).
    The adapters only: no copy of the base model.

    The whole checkpoint is published as one unit (``peft_sara.atomic.folder_writer``): a kill leaves the previous
    content of ``path`` (usually nothing) or the complete checkpoint. With ``total_limit``, the oldest checkpoints of
    ``path``'s parent are deleted afterwards so that at most ``total_limit`` remain (:func:`remove_old_checkpoints`).
    """
    with folder_writer(path) as staging:
        for component in components:
            save_training_state(
                staging / component.name,
                component.model,
                component.optimizer,
                component.lr_scheduler,
                component.helper,
            )
    if total_limit is not None:
        remove_old_checkpoints(os.path.dirname(os.path.abspath(path)), keep=total_limit)


def resume_from_checkpoint(
    path: str | os.PathLike, components: Sequence[TrainedComponent], adapter_name: str | None = None
) -> None:
    """Resume every component from :func:`save_training_checkpoint`'s folder, in place (SaRA values keep their size
    and identity, so wrappers built before stay valid), each all or nothing (:func:`load_training_state`).

    Raises ``FileNotFoundError`` naming a component the checkpoint has no subfolder for (a run that did not train it).
    """
    for component in components:
        folder = os.path.join(path, component.name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{path} has no '{component.name}' subfolder: it was saved by a run that did not train "
                f"{component.name} (e.g. without --train_text_encoder). Resume with the same components."
            )
    for component in components:
        load_training_state(
            os.path.join(path, component.name),
            component.model,
            component.optimizer,
            component.lr_scheduler,
            component.helper,
            adapter_name=adapter_name,
        )


__all__ = [
    "CHECKPOINT_PREFIX",
    "checkpoint_folder",
    "checkpoint_steps",
    "latest_checkpoint",
    "remove_old_checkpoints",
    "save_training_checkpoint",
    "resume_from_checkpoint",
]
