"""``benchmarks.train_step``'s report: memory cost and ratios to full fine-tuning and LoRA r=8, the project's
performance targets for SaRA, and the time and memory tables."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.measure import mib
from benchmarks.report import format_table
from benchmarks.train_methods import FLOOR, REFERENCE_FULL, REFERENCE_LORA


# ------------------------------------------------------------------------------------------------ reporting
def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    """Memory cost (peak minus the floor's peak) and ratios of step time, CPU time and cost to full FT and LoRA r=8."""
    floor = results.get(FLOOR)
    for result in results.values():
        result["memory_cost_bytes"] = None if floor is None else result["peak_bytes"] - floor["peak_bytes"]
    for result in results.values():
        for reference, suffix in ((REFERENCE_FULL, "full_ft"), (REFERENCE_LORA, "lora_r8")):
            base = results.get(reference)
            for key, name in (("step_s", "step"), ("step_cpu_s", "step_cpu"), ("memory_cost_bytes", "memory_cost")):
                value, base_value = result[key], None if base is None else base[key]
                ratio = None if value is None or not base_value or base_value <= 0 else value / base_value
                result[f"{name}_vs_{suffix}"] = ratio


def check_targets(results: dict[str, dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """The project's performance targets for SaRA, with the measured values (nothing is adjusted).

    Step-time targets are checked on wall-clock time and, on CPU, also on process CPU time, which a machine shared
    with other jobs disturbs much less.
    """
    sara = results.get("sara")
    if sara is None:
        return []
    targets = []

    def add(name: str, value: float | None, limit: float) -> None:
        targets.append(
            {"target": name, "measured": value, "limit": limit, "met": None if value is None else value <= limit}
        )

    def ratio(key: str, other: str) -> float | None:
        return sara[key] / results[other][key] if other in results and results[other][key] else None

    clocks = [("step_s", "wall")] + ([("step_cpu_s", "CPU time")] if device.type == "cpu" else [])
    for key, clock in clocks:
        add(f"SaRA step time <= 0.95 x full fine-tuning ({clock})", ratio(key, REFERENCE_FULL), 0.95)
        add(f"SaRA step time <= 1.05 x LoRA r=8 ({clock})", ratio(key, REFERENCE_LORA), 1.05)
        add(f"SaRA step time <= LoRA at matched trainable count ({clock})", ratio(key, "lora_matched"), 1.0)
    add("SaRA memory cost < LoRA r=8 memory cost", sara.get("memory_cost_vs_lora_r8"), 1.0)
    add("SaRA memory cost < full fine-tuning memory cost", sara.get("memory_cost_vs_full_ft"), 1.0)
    add("SaRA memory cost < masked dense baseline", ratio("memory_cost_bytes", "masked_dense"), 1.0)
    return [target for target in targets if target["measured"] is not None]


TIME_COLUMNS = [
    ("method", "method", ""),
    ("trainable_M", "trainable M", ".3f"),
    ("adapter_MiB", "adapter MiB", ".2f"),
    ("forward_s", "fwd s", ".3f"),
    ("backward_s", "bwd s", ".3f"),
    ("optimizer_s", "opt s", ".3f"),
    ("step_s", "step s", ".3f"),
    ("step_vs_full_ft", "/full", ".2f"),
    ("step_vs_lora_r8", "/lora8", ".2f"),
]
CPU_TIME_COLUMNS = [
    ("forward_cpu_s", "cpu fwd", ".3f"),
    ("backward_cpu_s", "cpu bwd", ".3f"),
    ("optimizer_cpu_s", "cpu opt", ".3f"),
    ("step_cpu_s", "cpu step", ".3f"),
    ("step_cpu_vs_full_ft", "/full", ".2f"),
    ("step_cpu_vs_lora_r8", "/lora8", ".2f"),
]
MEMORY_COLUMNS = [
    ("method", "method", ""),
    ("peak_MiB", "peak MiB", ".1f"),
    ("peak_delta_MiB", "peak-build MiB", ".1f"),
    ("cost_MiB", "cost MiB", ".1f"),
    ("memory_cost_vs_full_ft", "cost/full", ".2f"),
    ("memory_cost_vs_lora_r8", "cost/lora8", ".2f"),
    ("setup_peak_delta_MiB", "setup peak-build MiB", ".1f"),
    ("process_max_rss_MiB", "process max RSS MiB", ".1f"),
]


def table_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per method with every column of the time and memory tables."""
    rows = []
    for method, result in results.items():
        row = {
            "method": method,
            "trainable_M": result["trainable_params"] / 1e6,
            "adapter_MiB": mib(result["adapter_bytes"]),
            "step_s": result["step_s"],
            "step_cpu_s": result["step_cpu_s"],
            "peak_MiB": mib(result["peak_bytes"]),
            "peak_delta_MiB": mib(result["peak_delta_bytes"]),
            "cost_MiB": mib(result["memory_cost_bytes"]),
            "setup_peak_delta_MiB": mib(result["setup_peak_bytes"] - result["memory_after_build_bytes"]),
            "process_max_rss_MiB": mib(result["process_max_rss_bytes"]),
        }
        for phase in ("forward", "backward", "optimizer"):
            row[f"{phase}_s"] = result["phases_s"].get(phase)
            row[f"{phase}_cpu_s"] = result["phases_cpu_s"].get(phase)
        for suffix in ("full_ft", "lora_r8"):
            for name in ("step", "step_cpu", "memory_cost"):
                row[f"{name}_vs_{suffix}"] = result.get(f"{name}_vs_{suffix}")
        rows.append(row)
    return rows


def render_tables(results: dict[str, dict[str, Any]], device: torch.device) -> str:
    """The time table (wall clock, plus process CPU time on CPU) and the memory table."""
    rows = table_rows(results)
    time_columns = TIME_COLUMNS + (CPU_TIME_COLUMNS if device.type == "cpu" else [])
    return format_table(rows, time_columns) + "\n\n" + format_table(rows, MEMORY_COLUMNS)
