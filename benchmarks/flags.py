"""The command-line flags every model benchmark shares (--preset, --batch-size, --device, --threads, --seed, --out,
the SaRA selection) and what they resolve to: the preset, device, thread count and the plain-data spec a measuring
child receives."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import set_threads
from benchmarks.processes import run_in_fresh_process
from benchmarks.report import machine_info
from peft_sara.presets import PRESETS, ModelPreset, model_class


@dataclass
class ThreadsAndDevice:
    """Resolved ``--device`` / ``--threads`` flags."""

    device: torch.device
    threads: int


def _cuda_available() -> dict:
    return {"cuda": torch.cuda.is_available()}


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def resolve_device(device_flag: str, threads_flag: int | None) -> ThreadsAndDevice:
    """``auto`` picks CUDA when present (asked in a child, so this process never initialises CUDA before forking)."""
    if device_flag == "auto":
        device_flag = "cuda" if run_in_fresh_process(_cuda_available)["cuda"] else "cpu"
    return ThreadsAndDevice(torch.device(device_flag), int(threads_flag or usable_cores()))


def child_setup(spec: dict[str, Any]) -> tuple[ModelPreset, torch.device]:
    """In a measuring (child) process: use the run's thread count; return its preset and device."""
    set_threads(spec["threads"])
    return PRESETS[spec["preset"]], torch.device(spec["device"])


def add_common_arguments(parser: argparse.ArgumentParser, benchmark: str, batch_size: int = 1) -> None:
    """The flags every model benchmark takes: --preset, --batch-size, --device, --threads, --seed, --out."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: usable cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON path (default benchmarks/results/{benchmark}-<preset>-bs<B>-<device>.json)",
    )


def add_selection_arguments(parser: argparse.ArgumentParser, threshold_help: str) -> None:
    """--sara-fraction or --sara-threshold (see :func:`sara_selection`)."""
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument(
        "--sara-fraction", type=float, default=None, help="SaRA trainable_fraction (default: the preset's)"
    )
    selection.add_argument("--sara-threshold", type=float, default=None, help=threshold_help)


@dataclass
class RunSetup:
    """A benchmark run's resolved flags: the preset, device and threads, the spec its measuring code receives (plain
    data, so it can go to a forked child), and the machine info recorded with the results."""

    preset: ModelPreset
    device: torch.device
    threads: int
    selection: dict[str, float]
    spec: dict[str, Any]
    machine: dict[str, Any]


def setup_run(args: argparse.Namespace, **spec_fields: Any) -> RunSetup:
    """Resolve the common and selection flags of ``args``; ``spec_fields`` are the script's own spec entries."""
    preset = PRESETS[args.preset]
    model_class(preset.family)  # import it once here rather than in every child
    resolved = resolve_device(args.device, args.threads)
    selection = sara_selection(args, preset)
    spec = {
        "preset": preset.name,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "threads": resolved.threads,
        "device": str(resolved.device),
        "sara_selection": selection,
        **spec_fields,
    }
    machine = machine_info(resolved.device, resolved.threads)
    return RunSetup(preset, resolved.device, resolved.threads, selection, spec, machine)


def sara_selection(args: argparse.Namespace, preset: ModelPreset) -> dict[str, float]:
    """SaRAConfig selection keywords: ``--sara-threshold``, else ``--sara-fraction`` or the preset's fraction."""
    if args.sara_threshold is not None:
        return {"threshold": args.sara_threshold}
    return {"trainable_fraction": args.sara_fraction or preset.sara_fraction}
