"""Keeping third-party import noise out of the command line's output (``peft-sara ...``, ``python -m peft_sara.demo``).

Optional dependencies log about their own optional parts as they are imported: torchao that a compiled kernel for
another GPU generation is absent, torch that torchao registers an enum the deprecated way, bitsandbytes that it did
not fetch a CPU kernel from the Hub, diffusers that this torchao release moved its tensor classes, transformers that
it uses its PIL image processor because torchvision is absent. None of it concerns the command being run, and a user cannot tell which lines
matter. :func:`drop_import_noise` drops exactly those records (by logger and message); the entry points call it
unless ``--verbose`` / ``--debug`` is given. The library filters nothing else, except the two lines about the Hub
kernel lookup that :mod:`peft_sara.hub_kernels` switches off (dropped there, during its own import of bitsandbytes;
listed here too for a bitsandbytes imported before peft-sara).
"""

from __future__ import annotations

import logging

# (logger, text the message contains): the import-time records dropped.
IMPORT_NOISE: tuple[tuple[str, str], ...] = (
    ("torchao", "Failed to load "),  # torchao's compiled kernels for other hardware (e.g. _C_mxfp8.so)
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),  # torchao's enum registration
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),  # the Hub kernel not fetched
    ("kernels._internals.hf_hub", "publisher trust check"),  # the same lookup, from the kernels package
    # diffusers' torchao support, on a torchao release whose tensor classes moved (shown as diffusers loads a model)
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"),
    # transformers picking its PIL image processor where torchvision is absent (a pipeline's feature extractor)
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
)


class _DropImportNoise(logging.Filter):
    def __init__(self, texts: tuple[str, ...]) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


_kept: list[bool] = []  # set by keep_import_noise(): --verbose / --debug was given


def keep_import_noise() -> None:
    """Show every record from here on: undo :func:`drop_import_noise` and make later calls do nothing (``--verbose``
    given to ``peft-sara`` also holds for the subcommand it runs)."""
    _kept.append(True)
    for name, _ in IMPORT_NOISE:
        logger = logging.getLogger(name)
        for existing in [item for item in logger.filters if isinstance(item, _DropImportNoise)]:
            logger.removeFilter(existing)


def drop_import_noise() -> None:
    """Drop the records of :data:`IMPORT_NOISE` from here on (idempotent; only those loggers, only those messages),
    unless :func:`keep_import_noise` was called."""
    if _kept:
        return
    texts: dict[str, tuple[str, ...]] = {}
    for name, text in IMPORT_NOISE:
        texts[name] = (*texts.get(name, ()), text)
    for name, logger_texts in texts.items():
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropImportNoise) for existing in logger.filters):
            logger.addFilter(_DropImportNoise(logger_texts))


__all__ = ["IMPORT_NOISE", "drop_import_noise", "keep_import_noise"]
