"""Crash-safe file writes: a file is either its old content or its complete new content, never a torn mix.

Every writer in peft-sara goes through :func:`atomic_write`: the content is written to a temporary file in the same
folder, flushed and fsynced, then renamed over the target (``os.replace`` is atomic on POSIX and Windows), and the
folder is fsynced so the rename itself survives a power loss. A killed process leaves at most a ``.tmp-*`` file that
no reader looks at.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO

import torch
from safetensors.torch import save as safetensors_bytes

TEMP_PREFIX = ".tmp-"


def _fsync_directory(directory: str) -> None:
    if os.name != "posix":  # Windows cannot open a folder; its rename is durable once it returns
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_umask() -> int:
    umask = os.umask(0o022)  # os.umask only reads by setting: done once, at import
    os.umask(umask)
    return umask


_FILE_MODE = 0o666 & ~_read_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` keeps its previous content (or stays absent).
    """
    if "w" not in mode:
        raise ValueError(f"atomic_write opens files for writing only, got mode {mode!r}.")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(prefix=TEMP_PREFIX + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as file:
            yield file
            file.flush()
            os.chmod(temp_path, _FILE_MODE)  # mkstemp creates 0600; give the usual umask-based mode
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise
    _fsync_directory(directory)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w", encoding="utf-8") as file:
        file.write(text)


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` made atomic (the bytes are built in memory, then written in one go)."""
    payload = safetensors_bytes(tensors, metadata=metadata)
    with atomic_write(path) as file:
        file.write(payload)
