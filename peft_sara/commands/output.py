"""Printing results: aligned tables for people, ``--json`` for scripts; shared options of the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any


def parse_arguments(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    check: Callable[[argparse.Namespace], str | None] | None = None,
    libraries: bool = True,
) -> argparse.Namespace:
    """Parse a subcommand's arguments (``check(args)`` returns an error message, or ``None``), then (``libraries``)
    :func:`use_libraries`: the subcommand modules import nothing heavy before this point, so ``--help`` and argument
    errors answer at once. A subcommand that reads files only (``inspect``) passes ``libraries=False``: then only the
    Hub's progress bars are hidden under ``--quiet``, and nothing imports PEFT."""
    args = parser.parse_args(argv)
    problem = check(args) if check is not None else None
    if problem:
        parser.error(problem)
    if libraries:
        use_libraries(args)
    elif getattr(args, "quiet", False):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    return args


def use_libraries(args: argparse.Namespace) -> None:
    """Register SaRA with PEFT (which imports PEFT, transformers and torch) and, under ``--quiet``, hide the
    libraries' progress bars."""
    from ..registration import register

    register()
    if getattr(args, "quiet", False):
        hide_library_progress_bars()


def hide_library_progress_bars() -> None:
    """``--quiet``: no progress bars from the libraries either (transformers' "Loading weights", diffusers' pipeline
    loading, Hub downloads)."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()


def add_common_options(parser: argparse.ArgumentParser, json_output: bool = True) -> None:
    """``--json`` (where a table is printed) and ``--quiet`` (no progress bars)."""
    if json_output:
        parser.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def format_value(value: Any) -> str:
    """A table cell: floats in 4 significant digits, ``None`` as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "x".join(str(item) for item in value)
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], file=None) -> None:
    """Rows as an aligned text table; ``columns`` are (key, heading) pairs."""
    file = file or sys.stdout
    cells = [[format_value(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max([len(heading)] + [len(line[i]) for line in cells]) for i, (_, heading) in enumerate(columns)]
    print("  ".join(heading.ljust(width) for (_, heading), width in zip(columns, widths)), file=file)
    print("  ".join("-" * width for width in widths), file=file)
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)), file=file)


def print_json(payload: Any) -> None:
    """``payload`` as indented JSON on stdout."""
    print(json.dumps(payload, indent=2, default=str))


def human_bytes(size: int | None) -> str:
    """``1.2 MiB``-style size."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} GiB"


__all__ = [
    "parse_arguments",
    "use_libraries",
    "add_common_options",
    "format_value",
    "print_table",
    "print_json",
    "human_bytes",
]
