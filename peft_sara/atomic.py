"""Crash-safe writes: a file, or a whole saved folder, is either its old content or its complete new content.

Files: :func:`atomic_write` writes a temporary sibling, fsyncs it and renames it over the target (``os.replace`` is
atomic on POSIX and Windows), then fsyncs the folder.

Folders: every saver that publishes a folder (an adapter, a pipeline adapter with ``unet/`` + ``text_encoder/``, a
training checkpoint, an export, a merged model) writes through :func:`folder_writer`, the one folder writer::

    with folder_writer(target) as staging:   # an empty folder on the same filesystem
        ...write every file into staging...
    # here target holds all of it, published as one unit; on an exception target is untouched

The protocol (docs/RELIABILITY.md), which a kill at any instant leaves recoverable to the old or the new folder:

1. Stage: everything is written into a fresh staging folder: ``.<name>.sara-tmp-<host>-<pid>-<random>`` beside
   ``target`` when ``target`` does not exist yet, ``target/.sara-tmp-<host>-<pid>-<random>`` when it does. Every
   staged file and folder is fsynced.
2. Publish a new folder: ``rename(staging, target)``: one atomic step.
3. Publish over an existing folder (under an exclusive ``flock`` of ``target``): commit by renaming the staging folder
   to ``target/.sara-new`` (from here on the save is decided: recovery rolls it forward), then for each entry the save
   wrote, move the old entry (if any) into ``target/.sara-old/`` and the new one into place; then delete
   ``target/.sara-old`` and ``target/.sara-new``. Entries of ``target`` that the save does not write (other adapters'
   subfolders, a training run's ``checkpoint-*/``, logs) are left alone.
4. Recover (:func:`recover_folder`; the next writer of the folder, and peft-sara's readers, run it first, under the
   same lock): a ``.sara-new`` is rolled forward (the moves of step 3 are each idempotent), a ``.sara-old`` deleted.
   Staging folders of dead processes of this host are deleted by the next writer (uncommitted: nothing of them was
   published). A staging folder is never deleted by a reader, and never while its process lives.

Distributed saves (:func:`distributed_folder_writer`: DeepSpeed's ``accelerator.save_state``, where every process
writes its part of one folder) stage into one shared folder, ``.<name>.sara-tmp-distributed`` beside the target, and the
main process publishes it as above once every process has written (``wait_for_everyone`` before and after).

Readers outside peft-sara (PEFT's ``from_pretrained``, diffusers) do not run the recovery: a kill inside step 3 (a few
renames) leaves the entries split between old and new until the next peft-sara read or save of the folder, or a call
of :func:`recover_folder`. One writer per folder at a time (a second one waits for the lock to publish).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

import torch
from safetensors.torch import save as safetensors_bytes

try:  # POSIX: folder locks. Windows has no flock: one writer per folder is then the caller's to ensure.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

TEMP_PREFIX = ".tmp-"
STAGING_MARK = ".sara-tmp-"
NEW_NAME = ".sara-new"
OLD_NAME = ".sara-old"


def _fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: str | os.PathLike) -> None:
    if os.name != "posix":  # Windows cannot open a folder; its rename is durable once it returns
        return
    _fsync_path(directory)


def _read_umask() -> int:
    umask = os.umask(0o022)  # os.umask only reads by setting: done once, at import
    os.umask(umask)
    return umask


_FILE_MODE = 0o666 & ~_read_umask()
_DIR_MODE = 0o777 & ~_read_umask()


# ------------------------------------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` keeps its previous content (or stays absent).
    """
    if "w" not in mode:
        raise ValueError(f"atomic_write opens files for writing only, got mode {mode!r}.")
    if _inside_staging(Path(os.path.abspath(path))):  # the folder writer publishes (and fsyncs) the whole folder
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, mode, encoding=encoding if "b" not in mode else None) as file:
            yield file
        return
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


# ------------------------------------------------------------------------------------------------- folders
_local = threading.local()  # the staging folders this thread is writing (a nested folder_writer writes in place)
_HOST = socket.gethostname().replace("-", "_") or "host"


def _active_stagings() -> list[Path]:
    if not hasattr(_local, "stagings"):
        _local.stagings = []
    return _local.stagings


def _inside_staging(path: Path) -> bool:
    return any(path == staging or staging in path.parents for staging in _active_stagings())


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (the staged content), folders after their content."""
    if os.name != "posix":
        return
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            _fsync_path(path)
        _fsync_directory(directory)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` of ``folder`` (released by the kernel if the process dies), re-entrant per thread."""
    held = getattr(_local, "locks", None)
    if held is None:
        held = _local.locks = {}
    key = os.path.realpath(folder)
    if fcntl is None or key in held:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    held[key] = fd
    try:
        with contextlib.suppress(OSError):  # a filesystem without folder locks (some network mounts): unlocked
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        del held[key]
        os.close(fd)  # closing the descriptor releases the lock


def _unique(path: Path) -> Path:
    candidate, counter = path, 0
    while os.path.lexists(candidate):
        counter += 1
        candidate = path.with_name(f"{path.name}.{counter}")
    return candidate


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _roll_forward(target: Path) -> bool:
    """Step 3/4 of the protocol, under the lock: move a committed ``.sara-new`` into place, delete ``.sara-old``.
    Returns whether anything was left to do (a save had been interrupted after its commit)."""
    new, old = target / NEW_NAME, target / OLD_NAME
    pending = new.is_dir() or os.path.lexists(old)
    if new.is_dir():
        old.mkdir(exist_ok=True)
        for name in sorted(os.listdir(new)):
            destination = target / name
            if os.path.lexists(destination):
                os.rename(destination, _unique(old / name))
            os.rename(new / name, destination)
        _fsync_directory(target)
        os.rmdir(new)
    if os.path.lexists(old):
        _remove(old)
    if pending:
        _fsync_directory(target)
    return pending


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _dead_stagings(directory: Path, prefix: str) -> list[Path]:
    """Staging folders in ``directory`` named ``<prefix><host>-<pid>-<random>`` of dead processes of this host."""
    dead = []
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if not name.startswith(prefix):
                continue
            host, _, rest = name[len(prefix) :].partition("-")
            pid = rest.partition("-")[0]
            if host == _HOST and pid.isdigit() and not _pid_alive(int(pid)):
                dead.append(directory / name)
    return dead


def recover_folder(target: str | os.PathLike) -> bool:
    """Finish or clean up a save of ``target`` interrupted by a kill (step 4 of the protocol in the module docstring):
    afterwards ``target`` holds the complete old or the complete new folder. Cheap when there is nothing to do (one
    ``stat``). Returns whether an interrupted save was found."""
    target = Path(target)
    if not (target / NEW_NAME).exists() and not (target / OLD_NAME).exists():
        return False
    with _locked(target):
        return _roll_forward(target)


def _staging_name() -> str:
    return f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _new_staging(target: Path) -> Path:
    if target.exists():
        staging = target / f"{STAGING_MARK}{_staging_name()}"
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}{STAGING_MARK}{_staging_name()}"
    staging.mkdir(mode=_DIR_MODE)
    return staging


def _clean_dead_stagings(target: Path) -> None:
    for staging in _dead_stagings(target.parent, f".{target.name}{STAGING_MARK}") + (
        _dead_stagings(target, STAGING_MARK) if target.is_dir() else []
    ):
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, target: Path) -> None:
    """Steps 2-3: make the complete, fsynced ``staging`` the content of ``target``."""
    if not target.exists():
        try:
            os.rename(staging, target)
            _fsync_directory(target.parent)
            return
        except OSError as err:  # created meanwhile by someone else: publish over it
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR) or not target.is_dir():
                raise
    with _locked(target):
        _roll_forward(target)  # an earlier interrupted save of this folder goes first
        os.rename(staging, target / NEW_NAME)  # the commit
        _fsync_directory(target)
        if staging.parent != target:
            _fsync_directory(staging.parent)
        _roll_forward(target)


@contextlib.contextmanager
def folder_writer(target: str | os.PathLike) -> Iterator[Path]:
    """Write a folder as one unit: yields an empty staging folder to write into; on success its entries replace those
    of ``target`` as described in the module docstring (a kill at any instant leaves the old or the new folder, once
    recovered); on an exception the staging folder is removed and ``target`` is unchanged. Inside another
    ``folder_writer``'s staging folder, writes in place (the outer writer publishes everything at once)."""
    target = Path(os.path.abspath(target))
    if _inside_staging(target):
        target.mkdir(parents=True, exist_ok=True)
        yield target
        return
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"'{target}' exists and is not a folder: cannot save a folder there.")
    if target.is_dir():
        recover_folder(target)
    _clean_dead_stagings(target)
    staging = _new_staging(target)
    stagings = _active_stagings()
    stagings.append(staging)
    try:
        yield staging
        _fsync_tree(staging)
        stagings.remove(staging)
        _publish(staging, target)
    except BaseException:
        if staging in stagings:
            stagings.remove(staging)
        shutil.rmtree(staging, ignore_errors=True)
        raise


DISTRIBUTED_STAGING = "distributed"


@contextlib.contextmanager
def distributed_folder_writer(
    target: str | os.PathLike, is_main_process: bool, wait_for_everyone: Callable[[], None]
) -> Iterator[Path]:
    """:func:`folder_writer` for a folder every process of a distributed job writes a part of (DeepSpeed's
    ``accelerator.save_state``: each rank its optimizer partition). Every process calls it with the same ``target``
    and the job's barrier; each yields the same staging folder, ``.<name>.sara-tmp-distributed`` beside ``target``
    (on the filesystem the processes share, as DeepSpeed's checkpoints need), and the main process publishes it as
    one unit once every process has written::

        with distributed_folder_writer(path, accelerator.is_main_process, accelerator.wait_for_everyone) as staging:
            accelerator.save_state(staging, exclude_frozen_parameters=True)

    A kill at any instant leaves the previous ``target`` (or none) or the complete new one; a staging folder left by a
    killed job is removed by the next save of the same ``target`` (one job per output folder) and never names a
    checkpoint. An exception in one process publishes nothing; the others wait at the barrier, as at any collective.
    """
    target = Path(os.path.abspath(target))
    staging = target.parent / f".{target.name}{STAGING_MARK}{DISTRIBUTED_STAGING}"
    if is_main_process:
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"'{target}' exists and is not a folder: cannot save a folder there.")
        if target.is_dir():
            recover_folder(target)
        _clean_dead_stagings(target)
        if os.path.lexists(staging):  # a killed job's: nothing of it was published
            _remove(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir(mode=_DIR_MODE)
    wait_for_everyone()
    stagings = _active_stagings()
    stagings.append(staging)
    try:
        yield staging
    except BaseException:
        if is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        stagings.remove(staging)
    wait_for_everyone()  # every part is written
    if is_main_process:
        _fsync_tree(staging)
        _publish(staging, target)
    wait_for_everyone()  # published before any process goes on (and rotates checkpoints)


def _hub_cache() -> Path | None:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    return Path(HF_HUB_CACHE).resolve()


def refuse_overlapping_output(output: str | os.PathLike, inputs: Sequence[str | os.PathLike | None]) -> None:
    """Raise ``ValueError`` before anything is written if ``output`` is an input, lies inside one or contains one
    (symlinks resolved), or lies inside the Hugging Face Hub cache (which every later load reads). Inputs that are not
    local paths (Hub ids, None) are skipped: pass every folder the command reads, the implicit ones included (the
    base model an adapter records, the cache snapshot a Hub id resolved to)."""
    target = Path(output).resolve()
    cache = _hub_cache()
    if cache is not None and (target == cache or target.is_relative_to(cache)):
        raise ValueError(
            f"The output '{output}' lies inside the Hugging Face Hub cache ({cache}): writing it would corrupt a "
            "downloaded model or adapter. Choose an output path outside the cache."
        )
    for source in inputs:
        if source is None or not os.path.exists(source):
            continue
        source_path = Path(source).resolve()
        if target == source_path or target.is_relative_to(source_path) or source_path.is_relative_to(target):
            relation = (
                "is" if target == source_path else "lies inside" if target.is_relative_to(source_path) else "contains"
            )
            raise ValueError(
                f"The output '{output}' {relation} the input '{source}': writing it would destroy the input. Choose "
                "an output path outside the inputs."
            )


def is_protocol_name(name: str) -> bool:
    """Whether ``name`` (an entry of a folder) belongs to the folder writer's protocol, not to the saved content."""
    return name in (NEW_NAME, OLD_NAME) or STAGING_MARK in name or name.startswith(TEMP_PREFIX)


__all__ = [
    "atomic_write",
    "distributed_folder_writer",
    "folder_writer",
    "is_protocol_name",
    "recover_folder",
    "refuse_overlapping_output",
    "save_safetensors_atomic",
    "write_text_atomic",
]
