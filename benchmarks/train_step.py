"""Time and memory of one training step: SaRA against full fine-tuning, LoRA, SHiRA, Super-Tuning and a masked baseline.

Every method runs on the same seeded random-init model, the same batch and the same loss (MSE between the model's
prediction and a random target, random timesteps and text embeddings), each in a fresh process forked from this one,
so their memory peaks do not mix. Methods run round-robin for ``--rounds`` rounds, so a change of load on a shared
machine hits all of them alike. A method that fails (out of memory, say) is recorded as such and the others go on.
Prints the tables and the ratios to full fine-tuning and to LoRA r=8, and writes
``benchmarks/results/train_step-<preset>-bs<B>-<device>.json``.

    python -m benchmarks.train_step --preset small --batch-size 4 --threads 1
    python -m benchmarks.train_step --preset sd15 --batch-size 4 --device cuda --dtype bfloat16 --rounds 2 --steps 10
    python -m benchmarks.train_step --preset sdxl --device cuda --dtype bfloat16 --gradient-checkpointing \
        --methods floor,full_ft,lora_r8,sara --rounds 1
    python -m benchmarks.train_step --methods floor,full_ft,lora_r8,sara --profile 15
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/train_step.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.flags import add_common_arguments, add_selection_arguments, child_setup, setup_run
from benchmarks.measure import DTYPES, MemoryProbe, PhaseClock, directory_bytes, max_rss_bytes, median, mib
from benchmarks.processes import failure_status, run_in_fresh_process
from benchmarks.report import cuda_device_name, finish_machine_info, results_path, write_results
from benchmarks.train_methods import (
    DEFAULT_METHODS,
    LEARNING_RATE,
    METHODS,
    WEIGHT_DECAY,
    TrainingStep,
    make_plan,
    model_dtype,
    setup_method,
)
from benchmarks.train_step_report import add_ratios, check_targets, render_tables
from benchmarks.workload import make_batch, preset_summary
from peft_sara.presets import build_model


def run_method(spec: dict[str, Any], plan: dict[str, Any], method: str) -> dict[str, Any]:
    """Measure one method (runs in a fresh child process)."""
    preset, device = child_setup(spec)
    probe = MemoryProbe(device)
    dtype = model_dtype(spec)
    model = build_model(preset, spec["seed"], device, dtype)
    if spec.get("gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    batch = make_batch(preset, spec["batch_size"], spec["seed"], device, dtype)
    memory_after_build = probe.current()

    probe.reset_peak()
    step = setup_method(method, model, batch, preset, plan, spec["seed"])
    if spec.get("compile"):
        step.model = torch.compile(step.model, backend=spec.get("compile_backend", "inductor"))
    setup_peak = probe.peak()
    memory_after_setup = probe.current()

    probe.reset_peak()
    warmup_wall, wall, cpu = [], [], []
    for index in range(spec["warmup"] + spec["steps"]):
        clock = PhaseClock(device)
        step.run(clock)
        if index >= spec["warmup"]:
            wall.append(clock.wall)
            cpu.append(clock.cpu)
        else:
            warmup_wall.append(clock.wall)
    peak = probe.peak()

    trainable = step.trainable_parameters()
    result = {
        "method": method,
        "description": METHODS[method],
        "trainable_params": sum(param.numel() for param in trainable),
        "status": "ok",
        "steps_wall_s": wall,
        "steps_cpu_s": cpu,
        "warmup_wall_s": warmup_wall,  # includes torch.compile's compilation with --compile
        "memory_after_build_bytes": memory_after_build,
        "memory_after_setup_bytes": memory_after_setup,
        "setup_peak_bytes": setup_peak,
        "peak_bytes": peak,
        "peak_measure": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else (
            "RSS high-water mark (VmHWM, reset after setup)"
            if probe.can_reset_cpu_peak
            else "RSS high-water mark since process start (could not reset)"
        ),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
        "process_max_rss_bytes": max_rss_bytes(),
        "adapter_bytes": None,
        "device_name": cuda_device_name(device),
    }
    if method == "masked_dense":
        result["trainable_params"] = sum(int(mask.sum()) for _, mask in step.grad_masks)
        result["dense_params_in_optimizer"] = sum(param.numel() for param, _ in step.grad_masks)
    if spec.get("profile"):
        result["profile_top_ops"] = profile_step(step, device, spec["profile"])
    if step.save is not None and spec.get("save_adapter", True):
        with tempfile.TemporaryDirectory() as directory:
            step.save(directory)
            result["adapter_bytes"] = directory_bytes(Path(directory))
    return result


def measure_method(
    spec: dict[str, Any], plan: dict[str, Any], method: str, timeout_s: float | None = None
) -> dict[str, Any]:
    """:func:`run_method` in a fresh process; a failure (out of memory, an error, ``timeout_s`` passed) comes back as
    ``{"method", "status": "oom" | "error" | "timeout", "error": <the child's traceback>}`` instead of raising."""
    try:
        return run_in_fresh_process(run_method, spec, plan, method, timeout_s=timeout_s)
    except (RuntimeError, TimeoutError) as error:
        return {"method": method, "status": failure_status(error), "error": str(error)[-4000:]}


def summarize_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's result over all its rounds: medians of every timed step, medians of the per-round memory."""
    wall = [step for result in rounds for step in result.pop("steps_wall_s")]
    cpu = [step for result in rounds for step in result.pop("steps_cpu_s")]
    summary = dict(rounds[-1])  # counts, sizes and the profile do not change between rounds
    summary.update(
        {
            "rounds": len(rounds),
            "phases_s": {phase: median([step[phase] for step in wall]) for phase in wall[0]},
            "step_s": median([sum(step.values()) for step in wall]),
            "step_s_all": [sum(step.values()) for step in wall],
            "phases_cpu_s": {phase: median([step[phase] for step in cpu]) for phase in cpu[0]},
            "step_cpu_s": median([sum(step.values()) for step in cpu]),
            "step_cpu_s_all": [sum(step.values()) for step in cpu],
        }
    )
    for key in (
        "memory_after_build_bytes",
        "memory_after_setup_bytes",
        "setup_peak_bytes",
        "peak_bytes",
        "process_max_rss_bytes",
    ):
        values = [result[key] for result in rounds]
        summary[key] = int(median(values))
        summary[f"{key}_all"] = values
    summary["peak_delta_bytes"] = summary["peak_bytes"] - summary["memory_after_build_bytes"]
    return summary


def profile_step(step: TrainingStep, device: torch.device, top: int) -> list[dict[str, Any]]:
    """The ``top`` operators by self time in one extra (untimed) step, under ``torch.profiler``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        step.run(PhaseClock(device))
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(profiler.key_averages(), key=lambda event: getattr(event, key), reverse=True)
    total = sum(getattr(event, key) for event in events) or 1
    return [
        {
            "op": event.key,
            "self_ms": getattr(event, key) / 1e3,
            "share": getattr(event, key) / total,
            "calls": event.count,
        }
        for event in events[:top]
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "train_step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method and round before timing")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="fresh processes per method, run round-robin across methods; medians pool all rounds' steps",
    )
    parser.add_argument(
        "--methods",
        default="default",
        help=f"comma-separated subset of: {', '.join(METHODS)}; 'default': all but lora_r64; 'all'",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="dtype of the model and inputs (PEFT keeps adapter weights in float32; full FT trains in this dtype)",
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="diffusers' enable_gradient_checkpointing() on the model"
    )
    add_selection_arguments(parser, "SaRA threshold instead of a fraction (pre-trained weights only)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run every method's model through torch.compile; warmup steps absorb the compilation",
    )
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend with --compile")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, profile one more step per method and print / store its N top operators by self time",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    presets_of_methods = {"all": list(METHODS), "default": list(DEFAULT_METHODS)}
    methods = presets_of_methods.get(args.methods) or [name.strip() for name in args.methods.split(",")]
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise SystemExit(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    run = setup_run(
        args,
        steps=args.steps,
        warmup=args.warmup,
        profile=args.profile,
        compile=args.compile,
        compile_backend=args.compile_backend,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    preset, selection, spec, machine, device = run.preset, run.selection, run.spec, run.machine, run.device
    print(
        f"preset {preset.name}: {preset.description}; batch {args.batch_size}; {args.dtype}"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; device {device}; "
        f"{run.threads} threads; {args.rounds} rounds of {args.warmup} warmup + {args.steps} timed steps per method",
        flush=True,
    )
    plan = run_in_fresh_process(make_plan, spec)
    print(
        f"model {plan['model_parameters'] / 1e6:.2f}M parameters; SaRA ({selection}) trains "
        f"{plan['sara_trainable'] / 1e6:.3f}M of {plan['targeted_weight_entries'] / 1e6:.2f}M targeted weight "
        f"entries in {plan['num_target_layers']} layers ({plan['sara_trainable_linear'] / 1e6:.3f}M in Linear); "
        f"LoRA matched rank {plan['lora_matched_rank']}, SHiRA r {plan['shira_rank']}, "
        f"Super-Tuning sparsity {plan['supertuning_sparsity']:.4f}",
        flush=True,
    )

    # Round-robin over methods (each round in a rotated order), so load changes on a shared machine spread evenly.
    rounds: dict[str, list[dict[str, Any]]] = {method: [] for method in methods}
    failed: dict[str, dict[str, Any]] = {}
    for round_index in range(args.rounds):
        offset = round_index % len(methods)
        for method in methods[offset:] + methods[:offset]:
            if method in failed:
                continue
            if args.profile and round_index < args.rounds - 1:
                spec_for_round = {**spec, "profile": 0}
            else:
                spec_for_round = spec
            result = measure_method(spec_for_round, plan, method)
            if result["status"] != "ok":
                failed[method] = result
                print(f"  round {round_index + 1}/{args.rounds}  {method:15s} {result['status'].upper()}", flush=True)
                print(result["error"], flush=True)
                continue
            rounds[method].append(result)
            steps = [sum(step.values()) for step in result["steps_wall_s"]]
            print(
                f"  round {round_index + 1}/{args.rounds}  {method:15s} median step {median(steps):.3f} s  "
                f"peak {mib(result['peak_bytes']):.0f} MiB",
                flush=True,
            )
    results = {method: summarize_rounds(rounds[method]) for method in methods if method not in failed}
    add_ratios(results)
    targets = check_targets(results, device)
    finish_machine_info(
        machine, next((result["device_name"] for result in results.values() if result["device_name"]), None)
    )

    table = render_tables(results, device)
    print()
    print(table)
    print()
    for method, failure in failed.items():
        print(f"  {method}: {failure['status']} (not in the tables)")
    for target in targets:
        value = "n/a" if target["measured"] is None else f"{target['measured']:.3f}"
        verdict = {True: "met", False: "NOT met", None: "n/a"}[target["met"]]
        print(f"  {target['target']}: measured {value} (limit {target['limit']}) -> {verdict}")
    for method, result in results.items():
        if "profile_top_ops" in result:
            print(f"\nprofile of one {method} step (self time):")
            for row in result["profile_top_ops"]:
                print(f"  {row['self_ms']:10.1f} ms  {row['share']:6.1%}  {row['calls']:6d}x  {row['op']}")

    out = results_path(args.out, "train_step", preset, args.batch_size, device)
    payload = {
        "benchmark": "train_step",
        "preset": preset_summary(preset),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "compile": args.compile,
        "compile_backend": args.compile_backend if args.compile else None,
        "dtype": args.dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "seed": args.seed,
        "threads": run.threads,
        "optimizer": {
            "name": "AdamW",
            "lr": LEARNING_RATE,
            "weight_decay": WEIGHT_DECAY,
            "masked_dense_weight_decay": 0.0,
        },
        "loss": "MSE(model(latents, random timesteps, random text embeddings), random target)",
        "machine": machine,
        "plan": {key: value for key, value in plan.items() if not key.endswith("target_names")},
        "methods": results,
        "failed": failed,
        "targets": targets,
        "table": table,
    }
    write_results(out, payload)
    return payload


if __name__ == "__main__":
    main()
