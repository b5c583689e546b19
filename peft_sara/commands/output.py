"""Printing results: aligned tables for people, ``--json`` for scripts; shared options of the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


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
    "add_common_options",
    "format_value",
    "print_table",
    "print_json",
    "human_bytes",
]
