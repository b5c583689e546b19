"""Part 2, ``sdxl``: the SDXL-config UNet (2.6B parameters, 1024 px) at batch 1 with gradient checkpointing, and the
target that SaRA trains it in 16 GiB. A method that runs out of memory is recorded, not fatal."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.gpu_suite.budget import Budget
from benchmarks.gpu_suite.settings import SuiteSettings
from benchmarks.gpu_suite.steps import StepResults, steps_part, target_row, train_spec

PART = "sdxl"
SDXL_MEMORY_LIMIT_BYTES = 16 * 2**30


def run(
    settings: SuiteSettings, budget: Budget, results: StepResults, device: torch.device, threads: int, seed: int
) -> list[str]:
    """Measure the part's methods at batch 1 into ``results``; returns the notes of what it skipped."""

    def sdxl_spec(batch_size: int) -> dict[str, Any]:
        return train_spec(
            settings,
            settings.sdxl_preset,
            batch_size,
            device,
            threads,
            seed,
            steps=settings.sdxl_steps,
            warmup=settings.sdxl_warmup,
            gradient_checkpointing=True,
        )

    return steps_part(PART, settings, budget, results, (1,), settings.sdxl_methods, sdxl_spec)


def targets(sdxl: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's SDXL target: SaRA's peak memory, with gradient checkpointing, within 16 GiB."""
    rows = []
    for batch, found in sdxl.get("batches", {}).items():
        sara = found["methods"].get("sara")
        if sara is not None:
            rows.append(
                target_row(
                    f"{sdxl['preset']['name']} {sdxl['dtype']} bs{batch}, gradient checkpointing: SaRA peak memory <= 16 GiB",
                    sara["peak_bytes"] / 2**30,
                    SDXL_MEMORY_LIMIT_BYTES / 2**30,
                )
            )
    return rows
