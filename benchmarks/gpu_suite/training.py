"""Part 1, ``sd15``: one training step of the SD1.5-config UNet per method (frozen floor, full fine-tuning, LoRA, SHiRA,
Super-Tuning, masked dense gradients, SaRA) at each batch size, and the step-time and memory targets for SaRA."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.gpu_suite.budget import Budget
from benchmarks.gpu_suite.settings import COMPILED, SuiteSettings
from benchmarks.gpu_suite.steps import StepResults, steps_part, target_row, train_spec

PART = "sd15"


def sd15_spec(
    settings: SuiteSettings, batch_size: int, device: torch.device, threads: int, seed: int, **overrides: Any
) -> dict[str, Any]:
    """The train-step spec of the SD1.5-config preset at ``batch_size`` (``overrides``: e.g. ``compile=True``)."""
    return train_spec(settings, settings.sd15_preset, batch_size, device, threads, seed, **overrides)


def run(
    settings: SuiteSettings, budget: Budget, results: StepResults, device: torch.device, threads: int, seed: int
) -> list[str]:
    """Measure the part's methods at each batch size into ``results``; returns the notes of what it skipped."""
    return steps_part(
        PART,
        settings,
        budget,
        results,
        settings.batch_sizes,
        settings.sd15_methods,
        lambda batch_size: sd15_spec(settings, batch_size, device, threads, seed),
    )


def targets(sd15: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's SD1.5 targets for SaRA, eager and compiled: step time against LoRA r=8 and the frozen floor at
    batch >= 4, peak memory against LoRA r=8 at every batch (None where a method did not run)."""
    rows = []
    case = f"{sd15['preset']['name']} {sd15['dtype']}" if sd15.get("preset") else ""
    for batch, found in sd15.get("batches", {}).items():
        methods = found["methods"]
        for name in ("sara", COMPILED):
            if name not in methods:
                continue
            sara = methods[name]
            if int(batch) >= 4:
                rows.append(
                    target_row(f"{case} bs{batch}: {name} step <= 0.8 x LoRA r=8", sara["step_vs_lora_r8"], 0.8)
                )
                rows.append(
                    target_row(f"{case} bs{batch}: {name} step <= 1.3 x frozen floor", sara["step_vs_floor"], 1.3)
                )
            rows.append(target_row(f"{case} bs{batch}: {name} peak memory <= LoRA r=8's", sara["peak_vs_lora_r8"], 1.0))
    return rows
