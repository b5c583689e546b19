"""The training-memory planner (``peft_sara.planning``), checked and applied.

``validate``: on models that run on this machine (the benchmark presets, the test toy, a ~220M-parameter SD1.5-shaped
UNet at 256 px), the planned peak (fake tensors) against the measured peak of the same step on real tensors (the CPU
allocator's running total from the profiler's memory events, plus what was live before the step), for SaRA, LoRA and
full fine-tuning.

``scale``: the plans for SD1.5 512 px, SDXL / SD3 / Flux.1-dev 1024 px in bfloat16, batch 1 and 4, with and without
gradient checkpointing; Flux also on a 4-bit base: SaRA 2% / 6%, LoRA r16 / r32, full fine-tuning.

    python -m benchmarks.memory_plan validate          # ~10 minutes on 2 cores
    python -m benchmarks.memory_plan scale             # ~25 minutes on 2 cores (each plan 10-20 s)

Each writes ``benchmarks/results/memory_plan-<part>.json`` and a Markdown table (``.md``) beside it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python benchmarks/memory_plan.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import RESULTS_DIR, machine_info, write_json, write_results
from peft_sara.planning import (  # noqa: E402
    PRESETS,
    MethodSpec,
    ModelSpec,
    PlanRequest,
    measure_training_memory,
    plan_training_memory,
)
from peft_sara.planning.report import gib, markdown_table  # noqa: E402
from peft_sara.presets import PRESETS as BENCHMARK_PRESETS

GIB = 2**30
METHODS = {
    "SaRA 2%": MethodSpec("sara", fraction=0.02),
    "SaRA 6%": MethodSpec("sara", fraction=0.06),
    "LoRA r16": MethodSpec("lora", rank=16),
    "LoRA r32": MethodSpec("lora", rank=32),
    "full FT": MethodSpec("full"),
}
VALIDATION_METHODS = ("SaRA 6%", "LoRA r16", "full FT")


def benchmark_model(name: str) -> tuple[ModelSpec, int]:
    """A ``peft_sara.presets`` benchmark preset as a planner model, with its native resolution."""
    preset = BENCHMARK_PRESETS[name]
    class_name = "UNet2DConditionModel" if preset.family == "unet" else "SD3Transformer2DModel"
    spec = ModelSpec(name, class_name, dict(preset.config), preset.text_tokens, preset.pooled_dim)
    return spec, preset.latent_size * spec.vae_scale


def validation_cases(quick: bool) -> list[tuple[ModelSpec, int, int, bool]]:
    """(model, resolution, batch size, gradient checkpointing) of every validated configuration (float32)."""
    small, small_px = benchmark_model("small")
    dit, dit_px = benchmark_model("dit")
    cases = [(PRESETS["tiny"], 64, 2, False), (small, small_px, 2, False), (small, small_px, 2, True)]
    if not quick:
        cases += [(dit, dit_px, 2, False), (dit, dit_px, 2, True), (PRESETS["sd15-half"], 256, 1, False)]
    return cases


def validate(quick: bool) -> dict:
    """Planned vs measured peak for each validation case and method."""
    rows = []
    for (model, resolution, batch, checkpointing), label in itertools.product(
        validation_cases(quick), VALIDATION_METHODS
    ):
        request = PlanRequest(model, METHODS[label], resolution, batch, "float32", checkpointing)
        plan = plan_training_memory(request)
        measured = measure_training_memory(request)
        error = plan.peak_bytes / measured.measured_bytes - 1
        rows.append(
            {
                "model": model.name,
                "params_m": round(plan.parameters / 1e6, 1),
                "resolution": resolution,
                "batch": batch,
                "checkpointing": "yes" if checkpointing else "no",
                "method": label,
                "planned_mib": round(plan.peak_bytes / 2**20, 1),
                "measured_mib": round(measured.measured_bytes / 2**20, 1),
                "tracked_real_mib": round(measured.tracked_bytes / 2**20, 1),
                "error": f"{error:+.1%}",
                "error_fraction": error,
                "plan_s": round(plan.seconds, 1),
                "measure_s": round(measured.seconds, 1),
            }
        )
        print(rows[-1], flush=True)
    return {"rows": rows, "max_abs_error": max(abs(row["error_fraction"]) for row in rows)}


VALIDATION_COLUMNS = (
    ("model", "model"),
    ("params_m", "params (M)"),
    ("resolution", "px"),
    ("batch", "batch"),
    ("checkpointing", "grad ckpt"),
    ("method", "method"),
    ("planned_mib", "planned MiB"),
    ("measured_mib", "measured MiB"),
    ("error", "error"),
)


def scale_cases() -> list[tuple[str, int, bool, str, str | None]]:
    """(model preset, batch size, gradient checkpointing, method label, base quantization) of the scale table, the
    configurations of the two questions (SDXL, Flux on a 4-bit base) first."""
    cases = []
    for name, quantization in (("sdxl", None), ("flux-dev", "4bit"), ("flux-dev", None), ("sd3", None), ("sd15", None)):
        labels = [label for label in METHODS if not (quantization and label == "full FT")]
        for batch, checkpointing, label in itertools.product((1, 4), (True, False), labels):
            cases.append((name, batch, checkpointing, label, quantization))
    return cases


def scale(out: Path, models: Sequence[str] | None = None) -> dict:
    """The plans of the scale table (bfloat16, AdamW), written to ``out`` after each plan; plans already in ``out``
    are kept (an interrupted run resumes)."""
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {(row["model"], row["batch"], row["checkpointing"], row["method"]) for row in rows}
    for name, batch, checkpointing, label, quantization in scale_cases():
        if models and name not in models:
            continue
        model_label = name + (" (4-bit base)" if quantization else "")
        if (model_label, batch, "yes" if checkpointing else "no", label) in done:
            continue
        model = PRESETS[name]
        resolution = 512 if name == "sd15" else 1024
        request = PlanRequest(
            model, METHODS[label], resolution, batch, "bfloat16", checkpointing, "adamw", quantization
        )
        plan = plan_training_memory(request)
        row = {
            "model": model_label,
            "resolution": resolution,
            "batch": batch,
            "checkpointing": "yes" if checkpointing else "no",
            "method": label,
            "peak_gib": gib(plan.peak_bytes),
            **{f"{part}_gib": gib(value) for part, value in plan.breakdown.items()},
            "trainable_m": round(plan.trainable_parameters / 1e6, 1),
            "plan": plan.to_dict(),
        }
        rows.append(row)
        write_json(out, {"rows": rows})
        print({key: value for key, value in row.items() if key != "plan"}, flush=True)
    rows.sort(key=lambda row: (row["model"], row["batch"], row["checkpointing"], list(METHODS).index(row["method"])))
    return {"rows": rows}


SCALE_COLUMNS = (
    ("model", "model"),
    ("batch", "batch"),
    ("checkpointing", "grad ckpt"),
    ("method", "method"),
    ("trainable_m", "trainable (M)"),
    ("peak_gib", "peak GiB"),
    ("weights_gib", "weights"),
    ("adapter_gib", "adapter"),
    ("gradients_gib", "grads"),
    ("optimizer_gib", "optimizer"),
    ("activations_gib", "activations"),
    ("temporaries_gib", "temporaries"),
)


def peak_pivot(rows: Sequence[dict]) -> str:
    """Peak GiB per configuration (rows) and method (columns), as Markdown."""
    cells: dict[tuple, dict[str, str]] = {}
    for row in rows:
        cells.setdefault((row["model"], row["batch"], row["checkpointing"]), {})[row["method"]] = row["peak_gib"]
    pivot = [{"model": model, "batch": batch, "ckpt": ckpt, **peaks} for (model, batch, ckpt), peaks in cells.items()]
    return markdown_table(
        pivot, [("model", "model"), ("batch", "batch"), ("ckpt", "grad ckpt")] + [(m, m) for m in METHODS]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("validate", "scale"))
    parser.add_argument("--quick", action="store_true", help="validate: the toy and small presets only")
    parser.add_argument("--models", nargs="+", default=None, help="scale: only these presets (default: all four)")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: benchmarks/results/)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = args.out or RESULTS_DIR / f"memory_plan-{args.part}.json"
    payload = validate(args.quick) if args.part == "validate" else scale(out, args.models)
    payload["machine"] = machine_info(torch.device("cpu"), args.threads)
    payload["wall_s"] = round(time.perf_counter() - start, 1)
    write_results(out, payload)
    if args.part == "validate":
        table = markdown_table(payload["rows"], VALIDATION_COLUMNS)
    else:
        table = "peak GiB\n\n" + peak_pivot(payload["rows"]) + "\n\nat the peak, GiB\n\n"
        table += markdown_table(payload["rows"], SCALE_COLUMNS)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    if args.part == "validate":
        print(f"\nlargest |error|: {payload['max_abs_error']:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
