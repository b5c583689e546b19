"""What the training-step parts share: the spec ``benchmarks.train_step`` hands its children, one method at one
batch size within a part's budget, and the per-batch summaries, ratios and tables."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks import train_step
from benchmarks.gpu_suite.budget import Budget, CaseLog
from benchmarks.gpu_suite.settings import SuiteSettings
from benchmarks.measure import mib
from benchmarks.processes import failure_status, run_in_fresh_process
from benchmarks.report import (
    format_table,
)
from benchmarks.train_methods import FLOOR, REFERENCE_LORA, make_plan
from benchmarks.train_step_report import add_ratios
from benchmarks.workload import preset_summary
from peft_sara.presets import PRESETS


def train_spec(
    settings: SuiteSettings,
    preset_name: str,
    batch_size: int,
    device: torch.device,
    threads: int,
    seed: int,
    **overrides: Any,
) -> dict[str, Any]:
    """The spec ``benchmarks.train_step`` hands its measuring children, for one preset and batch size."""
    preset = PRESETS[preset_name]
    return {
        "preset": preset_name,
        "batch_size": batch_size,
        "seed": seed,
        "threads": threads,
        "device": str(device),
        "sara_selection": {"trainable_fraction": preset.sara_fraction},
        "steps": settings.steps,
        "warmup": settings.warmup,
        "profile": 0,
        "compile": False,
        "compile_backend": settings.compile_backend,
        "dtype": settings.dtype,
        "gradient_checkpointing": False,
        "save_adapter": True,
        **overrides,
    }


def measure_case(
    log: CaseLog, spec: dict[str, Any], plan: dict[str, Any], method: str, label: str, kind: str
) -> dict[str, Any] | None:
    """One method at one batch size in a fresh process, within the part's budget; None when skipped."""
    if not log.should_run(kind, label):
        return None
    start = time.monotonic()
    result = train_step.measure_method(spec, plan, method, timeout_s=log.budget.timeout(log.part))
    seconds = time.monotonic() - start
    log.record(kind, seconds)
    result["case_wall_s"] = seconds
    if result["status"] == "ok":
        warmup = sum(sum(step.values()) for step in result.get("warmup_wall_s", []))
        steps = [sum(step.values()) for step in result["steps_wall_s"]]
        detail = (
            f"step {statistics.median(steps) * 1e3:.1f} ms, warmup {warmup:.1f} s, "
            f"peak {mib(result['peak_bytes']):.0f} MiB"
        )
    else:
        detail = f"{result['status'].upper()}: {result['error'].strip().splitlines()[-1][:200]}"
    print(f"[{log.budget.elapsed():6.1f}s] {label}: {detail} ({seconds:.1f} s)", flush=True)
    return result


def make_plan_in_budget(log: CaseLog, spec: dict[str, Any], label: str) -> dict[str, Any] | None:
    """SaRA's targets and the matched settings of the other methods (``make_plan``), or None on failure."""
    if not log.should_run("plan", f"{label} plan"):
        return None
    start = time.monotonic()
    try:
        plan = run_in_fresh_process(make_plan, spec, timeout_s=log.budget.timeout(log.part))
    except (RuntimeError, TimeoutError) as error:
        log.skipped.append(f"{label}: plan failed ({failure_status(error)}), part not run")
        print(f"[{log.budget.elapsed():6.1f}s] {log.skipped[-1]}\n{str(error)[-2000:]}", flush=True)
        return None
    log.record("plan", time.monotonic() - start)
    print(
        f"[{log.budget.elapsed():6.1f}s] {label}: {plan['model_parameters'] / 1e6:.1f}M parameters, SaRA trains "
        f"{plan['sara_trainable'] / 1e6:.2f}M entries in {plan['num_target_layers']} layers",
        flush=True,
    )
    return plan


@dataclass
class StepResults:
    """Measured methods of one preset, per batch size, with the plan they share."""

    preset: str
    plan: dict[str, Any] | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    raw: dict[int, dict[str, dict[str, Any]]] = field(default_factory=lambda: defaultdict(dict))


def steps_part(
    part: str,
    settings: SuiteSettings,
    budget: Budget,
    results: StepResults,
    batch_sizes: Sequence[int],
    methods: Sequence[str],
    spec_for: Callable[[int], dict[str, Any]],
    method_name: Callable[[str], str] = str,
    guesses_s: dict[str, float] | None = None,
) -> list[str]:
    """Run ``methods`` at ``batch_sizes`` into ``results`` (its plan made first if missing); returns the skip notes."""
    log = CaseLog(part, budget, guesses_s)
    if results.plan is None:
        results.spec = spec_for(batch_sizes[0])
        results.plan = make_plan_in_budget(log, results.spec, part)
        if results.plan is None:
            return log.skipped
    for number, batch_size in enumerate(batch_sizes):
        spec = {**spec_for(batch_size), "save_adapter": number == 0}  # adapter sizes do not depend on the batch
        for method in methods:
            name = method_name(method)
            result = measure_case(log, spec, results.plan, method, f"{part} bs{batch_size} {name}", kind=method)
            if result is not None:
                results.raw[batch_size][name] = {**result, "method": name}
    return log.skipped


def summarize_batch(raw: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Successful methods (train_step's summary, ratios to full FT, LoRA r=8 and the floor) and failed ones."""
    ok = {name: train_step.summarize_rounds([dict(result)]) for name, result in raw.items() if result["status"] == "ok"}
    failed = {name: result for name, result in raw.items() if result["status"] != "ok"}
    add_ratios(ok)
    floor, lora = ok.get(FLOOR), ok.get(REFERENCE_LORA)
    for result in ok.values():
        result["step_vs_floor"] = result["step_s"] / floor["step_s"] if floor else None
        result["peak_vs_lora_r8"] = result["peak_bytes"] / lora["peak_bytes"] if lora else None
    return ok, failed


STEP_COLUMNS = [
    ("method", "method", ""),
    ("status", "status", ""),
    ("trainable_M", "trainable M", ".2f"),
    ("step_ms", "step ms", ".1f"),
    ("step_vs_floor", "/floor", ".2f"),
    ("step_vs_lora_r8", "/lora8", ".2f"),
    ("step_vs_full_ft", "/full", ".2f"),
    ("warmup_s", "warmup s", ".1f"),
    ("peak_MiB", "peak MiB", ".0f"),
    ("cost_MiB", "cost MiB", ".0f"),
    ("peak_vs_lora_r8", "peak/lora8", ".2f"),
    ("memory_cost_vs_lora_r8", "cost/lora8", ".2f"),
    ("adapter_MiB", "adapter MiB", ".1f"),
]


def step_rows(ok: dict[str, dict[str, Any]], failed: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method for :data:`STEP_COLUMNS` (failed methods show their status only)."""
    rows = []
    for name, result in ok.items():
        rows.append(
            {
                "method": name,
                "status": "ok",
                "trainable_M": result["trainable_params"] / 1e6,
                "step_ms": result["step_s"] * 1e3,
                "step_vs_floor": result["step_vs_floor"],
                "step_vs_lora_r8": result["step_vs_lora_r8"],
                "step_vs_full_ft": result["step_vs_full_ft"],
                "warmup_s": sum(sum(step.values()) for step in result.get("warmup_wall_s", [])),
                "peak_MiB": mib(result["peak_bytes"]),
                "cost_MiB": mib(result["memory_cost_bytes"]),
                "peak_vs_lora_r8": result["peak_vs_lora_r8"],
                "memory_cost_vs_lora_r8": result["memory_cost_vs_lora_r8"],
                "adapter_MiB": mib(result["adapter_bytes"]),
            }
        )
    rows += [{"method": name, "status": result["status"]} for name, result in failed.items()]
    return rows


def finish_steps(results: StepResults) -> dict[str, Any]:
    """The JSON of one preset's step measurements: per batch size, summaries, failures and the table."""
    batches = {}
    for batch_size in sorted(results.raw):
        ok, failed = summarize_batch(results.raw[batch_size])
        rows = step_rows(ok, failed)
        batches[str(batch_size)] = {
            "methods": ok,
            "failed": failed,
            "rows": rows,
            "table": format_table(rows, STEP_COLUMNS),
        }
    spec = results.spec
    return {
        "preset": preset_summary(PRESETS[results.preset]),
        "dtype": spec.get("dtype"),
        "gradient_checkpointing": spec.get("gradient_checkpointing"),
        "steps": spec.get("steps"),
        "warmup": spec.get("warmup"),
        "plan": None
        if results.plan is None
        else {key: value for key, value in results.plan.items() if not key.endswith("target_names")},
        "batches": batches,
    }


def target_row(name: str, value: float | None, limit: float) -> dict[str, Any]:
    """A target's report row: met when ``value <= limit``, None when the method did not run."""
    return {"target": name, "measured": value, "limit": limit, "met": None if value is None else value <= limit}
