"""The ``checkpoint-<step>/`` folders of a training run: one subfolder per :class:`TrainedComponent`, each holding
:func:`save_training_state`'s files (the adapter in PEFT format and ``sara_training_state.safetensors``).

``peft_sara.load_sara_adapter(pipe, "out/checkpoint-500")`` loads such a folder's adapters for a look;
:func:`resume_from_checkpoint` continues the run bitwise.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

from .checkpoint import load_training_state, save_training_state
from .components import TrainedComponent

CHECKPOINT_PREFIX = "checkpoint-"


def checkpoint_folder(output_dir: str | os.PathLike, step: int) -> str:
    """The checkpoint folder of ``step`` in ``output_dir``: ``output_dir/checkpoint-<step>``."""
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")


def checkpoint_steps(output_dir: str | os.PathLike) -> list[int]:
    """Steps of the ``checkpoint-<step>`` folders in ``output_dir``, oldest first (none if it does not exist)."""
    if not os.path.isdir(output_dir):
        return []
    suffixes = [name[len(CHECKPOINT_PREFIX) :] for name in os.listdir(output_dir) if name.startswith(CHECKPOINT_PREFIX)]
    return sorted(int(suffix) for suffix in suffixes if suffix.isdigit())


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint folder in ``output_dir``, or None if it has none."""
    steps = checkpoint_steps(output_dir)
    return checkpoint_folder(output_dir, steps[-1]) if steps else None


def remove_old_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[str]:
    """Delete the oldest checkpoint folders of ``output_dir`` so that at most ``keep`` remain; the deleted folders.

    Call it with ``limit - 1`` before saving to keep at most ``limit`` checkpoints after the save.
    """
    steps = checkpoint_steps(output_dir)
    removed = [checkpoint_folder(output_dir, step) for step in steps[: max(len(steps) - keep, 0)]]
    for folder in removed:
        shutil.rmtree(folder)
    return removed


def save_training_checkpoint(path: str | os.PathLike, components: Sequence[TrainedComponent]) -> None:
    """Save a resumable checkpoint of every component into ``path``, one subfolder per component: its adapter in
    PEFT format plus its optimizer, LR scheduler, SaRA helper and the RNG states (:func:`save_training_state`).
    The adapters only: no copy of the base model."""
    for component in components:
        save_training_state(
            os.path.join(path, component.name),
            component.model,
            component.optimizer,
            component.lr_scheduler,
            component.helper,
        )


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
