"""Running a measurement in a fresh forked process, so memory peaks do not mix and an out-of-memory or hung case only
loses itself; and what such a failure was."""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from typing import Any


def _die_with_parent() -> None:
    """Ask Linux to kill this process if its parent dies (so an interrupted run leaves no orphans)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def run_in_fresh_process(fn: Callable[..., dict], *args: Any, timeout_s: float | None = None) -> dict:
    """Run ``fn(*args)`` in a forked child and return its (picklable) result; re-raise its errors here.

    The parent must not have run any torch computation or initialised CUDA (fork keeps neither safe); it has only
    imported the libraries, so every child starts from the same clean state and pays no import time. A child still
    running after ``timeout_s`` seconds is killed and :class:`TimeoutError` raised.
    """
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def child() -> None:
        _die_with_parent()
        try:
            result = ("ok", fn(*args))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            result = ("error", traceback.format_exc())
        sender.send(result)
        sender.close()

    process = context.Process(target=child)
    process.start()
    sender.close()
    if timeout_s is not None and not receiver.poll(timeout_s):
        process.kill()
        process.join()
        raise TimeoutError(f"The benchmark child process ran past its {timeout_s:.0f} s limit and was stopped.")
    try:
        status, payload = receiver.recv()
    except EOFError:
        process.join()
        raise RuntimeError(
            f"The benchmark child process died without a result (exit code {process.exitcode}; "
            "-9 usually means it was killed for memory)."
        ) from None
    process.join()
    if status == "error":
        raise RuntimeError(f"The benchmark child process failed:\n{payload}")
    return payload


def failure_status(error: Exception) -> str:
    """'timeout', 'oom' or 'error' for what :func:`run_in_fresh_process` raised (the child's traceback is its text)."""
    if isinstance(error, TimeoutError):
        return "timeout"
    message = str(error)
    return "oom" if "OutOfMemoryError" in message or "out of memory" in message.lower() else "error"
