"""Writing results: what the numbers were measured on (machine, library versions, commit), plain-text and markdown
tables, and the result JSON under ``benchmarks/results/``."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from peft_sara.presets import ModelPreset

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def package_version(package: str) -> str | None:
    """The installed version of ``package``, or None if it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """What the numbers were measured on (call in the parent: it does not touch CUDA)."""
    return {
        "device": str(device),
        "device_name": _cpu_model() if device.type == "cpu" else None,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "load_average_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": package_version("diffusers"),
        "peft": package_version("peft"),
        "peft_sara": package_version("peft-sara"),
        "git_commit": _git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def finish_machine_info(machine: dict[str, Any], device_name: str | None = None) -> None:
    """Add the load average at the end of the run, and the GPU's name once a child has reported it."""
    machine["load_average_at_end"] = list(os.getloadavg())
    if device_name:
        machine["device_name"] = device_name


def cuda_device_name(device: torch.device) -> str | None:
    """GPU name (call in a child: initialises CUDA)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` are (key, header, format spec); missing values print as '-'."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            line.append("-" if value is None else format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    out = []
    for number, line in enumerate(cells):
        out.append(
            "  ".join(
                cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(line, widths))
            )
        )
        if number == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


def format_markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """The same table as :func:`format_table`, as GitHub markdown."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |"]
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, spec) if spec else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_path(out: Path | None, benchmark: str, preset: ModelPreset, batch_size: int, device: torch.device) -> Path:
    """``--out``, or the default ``benchmarks/results/<benchmark>-<preset>-bs<B>-<device type>.json``."""
    return out or RESULTS_DIR / f"{benchmark}-{preset.name}-bs{batch_size}-{device.type}.json"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_results(path: Path, payload: dict[str, Any]) -> None:
    """Write a benchmark's result JSON and say where."""
    write_json(path, payload)
    print(f"\nwrote {path}")
