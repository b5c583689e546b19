"""Part 3, ``sd15-compiled``: SaRA through ``torch.compile`` on the SD1.5-config UNet, as ``sara_compiled`` rows in
part 1's tables (its targets are part 1's). The first case's duration (compilation included) is guessed from the
settings, so a tight budget skips it rather than overrunning."""

from __future__ import annotations

import torch

from benchmarks.gpu_suite.budget import Budget
from benchmarks.gpu_suite.settings import COMPILED, SuiteSettings
from benchmarks.gpu_suite.steps import StepResults, steps_part
from benchmarks.gpu_suite.training import sd15_spec

PART = "sd15-compiled"


def run(
    settings: SuiteSettings, budget: Budget, results: StepResults, device: torch.device, threads: int, seed: int
) -> list[str]:
    """Measure compiled SaRA at the compile batch sizes into part 1's ``results``; returns the skip notes."""
    return steps_part(
        PART,
        settings,
        budget,
        results,
        settings.compile_batch_sizes,
        ["sara"],
        lambda batch_size: sd15_spec(settings, batch_size, device, threads, seed, compile=True),
        method_name=lambda _: COMPILED,
        guesses_s={"sara": settings.compile_guess_s},
    )
