"""Importing bitsandbytes without a request to the Hugging Face Hub.

On CPUs with AVX512-BF16, importing bitsandbytes (PEFT, transformers and diffusers all import it as they load) asks
the Hub whether the publisher of a CPU 4-bit kernel (``kernels-community/quantization-bitsandbytes``) is trusted, and
downloads the kernel: a network request at import that nobody asked for, which fails offline and prints a warning.
:func:`import_bitsandbytes_offline` imports bitsandbytes first, with ``huggingface_hub``'s offline switch on for the
duration, so the kernel lookup reads only the local Hub cache (a kernel already cached still loads). bitsandbytes
then uses its built-in CPU kernels. A user who wants bitsandbytes to fetch the Hub kernel imports bitsandbytes
before ``peft_sara``.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

# The log records the lookup leaves behind when it finds nothing in the cache (bitsandbytes' fallback notice and the
# kernels package's "skipping publisher trust check"): noise about a download we chose not to make.
_DROPPED_MESSAGES = ("kernels-community", "publisher trust check")
_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


def _drop_kernel_lookup_records(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(text in message for text in _DROPPED_MESSAGES)


def import_bitsandbytes_offline() -> None:
    """Import bitsandbytes (when installed and not imported yet) without letting it reach the Hub."""
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    constants.HF_HUB_OFFLINE = True
    for logger in loggers:
        logger.addFilter(_drop_kernel_lookup_records)
    try:
        import bitsandbytes  # noqa: F401
    finally:
        constants.HF_HUB_OFFLINE = offline
        for logger in loggers:
            logger.removeFilter(_drop_kernel_lookup_records)


__all__ = ["import_bitsandbytes_offline"]
