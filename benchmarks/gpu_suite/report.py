"""The suite's markdown report and the summary printed at the end of the log."""

from __future__ import annotations

from typing import Any

from benchmarks.gpu_suite.steps import STEP_COLUMNS
from benchmarks.report import (
    format_markdown_table,
)


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report: kernels' cutoffs, the step tables per preset and batch size, targets, skips."""
    machine = report["machine"]
    lines = [
        f"# GPU suite ({'tiny, ' if report['tiny'] else ''}{machine.get('device_name') or machine['device']})",
        "",
        f"torch {machine['torch']}, diffusers {machine['diffusers']}, peft {machine['peft']}, commit "
        f"{machine['git_commit']}, {machine['time_utc']}; ran {report['duration_s']:.0f} s "
        f"(budget {sum(report['settings']['shares_s'].values()):.0f} s).",
        "",
    ]
    kernels = report.get("kernels")
    if kernels:
        lines += ["## Kernels", ""]
        if kernels.get("note") or kernels.get("error"):
            lines += [kernels.get("note") or f"{kernels['status']}: {kernels['error'][-500:]}", ""]
        cutoffs = [{"dtype": dtype, **choice} for dtype, choice in kernels.get("cutoffs", {}).items()]
        if cutoffs:
            lines += [
                "SDDMM / masked-GEMM cutoff per dtype (SDDMM at density <= cutoff): the one with the least mean "
                "slowdown against the faster strategy at each measured point.",
                "",
                format_markdown_table(
                    cutoffs,
                    [
                        ("dtype", "dtype", ""),
                        ("cutoff", "measured cutoff", "g"),
                        ("mean_slowdown", "mean slowdown", ".3f"),
                        ("worst_slowdown", "worst slowdown", ".3f"),
                        ("current_setting", "current setting", "g"),
                        ("current_mean_slowdown", "its mean slowdown", ".3f"),
                        ("points", "points", "d"),
                    ],
                ),
                "",
            ]
            crossovers = [
                {"dtype": dtype, **row} for dtype, choice in kernels["cutoffs"].items() for row in choice["crossovers"]
            ]
            lines += [
                format_markdown_table(
                    crossovers,
                    [
                        ("dtype", "dtype", ""),
                        ("tokens", "tokens", "d"),
                        ("shape", "out x in", ""),
                        ("gemm_faster_from_density", "GEMM faster from density", "g"),
                    ],
                ),
                "",
            ]
        if kernels.get("speedups"):
            lines += [
                "Medians over shapes and densities: speedup of the Triton sampled gradient over the PyTorch reference, "
                "and the time to build an effective weight out of place:",
                "",
                format_markdown_table(
                    kernels["speedups"],
                    [
                        ("dtype", "dtype", ""),
                        ("tokens", "tokens", "d"),
                        ("grad_speedup_median", "sampled grad (auto)", ".2f"),
                        ("effective_weight_ms_median", "effective weight ms", ".4f"),
                    ],
                ),
                "",
            ]
    for key in ("sd15", "sdxl"):
        steps = report.get(key)
        if not steps:
            continue
        plan, preset = steps["plan"] or {}, steps["preset"]
        checkpointing = ", gradient checkpointing" if steps["gradient_checkpointing"] else ""
        pixels = preset["latent_size"] * 8
        lines += [
            f"## Train step: `{preset['name']}`, {pixels} px ({steps['dtype']}{checkpointing})",
            "",
            f"{preset['description']}. {(plan.get('model_parameters') or 0) / 1e6:.1f}M parameters; SaRA trains "
            f"{(plan.get('sara_trainable') or 0) / 1e6:.2f}M entries; medians of {steps['steps']} steps after "
            f"{steps['warmup']} warmup; memory is `torch.cuda.max_memory_allocated` over the steps (RSS on CPU).",
            "",
        ]
        for batch, found in steps["batches"].items():
            lines += [f"Batch {batch}:", "", format_markdown_table(found["rows"], STEP_COLUMNS), ""]
            for name, failure in found["failed"].items():
                message = failure["error"].strip().splitlines()[-1][:300] if failure.get("error") else ""
                lines.append(f"- `{name}`: {failure['status']} {message}")
            if found["failed"]:
                lines.append("")
    if report["targets"]:
        lines += ["## Targets (issue 12)", "", format_markdown_table(report["targets"], TARGET_COLUMNS), ""]
    if report["skipped"]:
        lines += ["## Skipped to stay in the budget", ""] + [f"- {note}" for note in report["skipped"]] + [""]
    return "\n".join(lines)


TARGET_COLUMNS = [
    ("target", "target", ""),
    ("measured", "measured", ".3f"),
    ("limit", "limit", "g"),
    ("met", "met", ""),
]


def print_summary(report: dict[str, Any]) -> None:
    """The step tables, the targets and the skipped cases, at the end of the log."""
    for key in ("sd15", "sdxl"):
        for batch, found in ((report[key] or {}).get("batches") or {}).items():
            print(f"\n{key} batch {batch}:\n{found['table']}")
    print()
    for target in report["targets"]:
        value = "n/a" if target["measured"] is None else f"{target['measured']:.3f}"
        verdict = {True: "met", False: "NOT met", None: "n/a"}[target["met"]]
        print(f"  {target['target']}: measured {value} (limit {target['limit']:g}) -> {verdict}")
    for note in report["skipped"]:
        print(f"  skipped: {note}")
