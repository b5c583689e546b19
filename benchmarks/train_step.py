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
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/train_step.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from peft import LoraConfig, ShiraConfig, SupertuningConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

import peft_sara
from benchmarks.common import (
    DTYPES,
    Batch,
    MemoryProbe,
    ModelPreset,
    PhaseClock,
    add_common_arguments,
    add_selection_arguments,
    build_model,
    child_setup,
    cuda_device_name,
    diffusion_loss,
    directory_bytes,
    finish_machine_info,
    format_table,
    make_batch,
    max_rss_bytes,
    median,
    mib,
    preset_summary,
    results_path,
    run_in_fresh_process,
    setup_run,
    target_layers,
    write_results,
)
from peft_sara.masks import select_trainable_indices
from peft_sara.training import sara_layers

METHODS: dict[str, str] = {
    "frozen_forward": "frozen base, forward only (torch.no_grad)",
    "floor": "frozen base, forward + backward to the input latents only (no trainable parameters)",
    "full_ft": "full fine-tuning, AdamW on every parameter",
    "lora_r8": "PEFT LoRA r=8 (alpha 8) on SaRA's target modules (Linear + Conv2d)",
    "lora_r64": "PEFT LoRA r=64 (alpha 64) on SaRA's target modules (Linear + Conv2d)",
    "lora_matched": "PEFT LoRA on SaRA's target modules at the rank whose trainable count matches SaRA's",
    "shira": "PEFT SHiRA (random sparse support) on SaRA's Linear targets, r matched to SaRA's Linear count",
    "supertuning": "PEFT Super-Tuning bottom-k (select_top=False) on SaRA's Linear targets, SaRA's Linear count",
    "masked_dense": "target weights fully trainable, dense grads masked to SaRA's entries after backward, AdamW",
    "sara": "peft-sara SaRA, AdamW on the sparse values",
}
DEFAULT_METHODS = tuple(method for method in METHODS if method != "lora_r64")  # `--methods all` adds LoRA r=64
REFERENCE_FULL, REFERENCE_LORA, FLOOR = "full_ft", "lora_r8", "floor"
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 1e-2


# ------------------------------------------------------------------------------------------------ the plan
def sara_config(plan_or_args: dict[str, Any], **overrides: Any) -> peft_sara.SaRAConfig:
    """The SaRA config of this run: default diffusers targets, selection by fraction or threshold."""
    selection = plan_or_args["sara_selection"]
    return peft_sara.SaRAConfig(**selection, **overrides)


def model_dtype(spec: dict[str, Any]) -> torch.dtype:
    """The dtype the run's model is built in (``--dtype``; adapters keep PEFT's float32 weights)."""
    return DTYPES[spec.get("dtype", "float32")]


def make_plan(spec: dict[str, Any]) -> dict[str, Any]:
    """SaRA's targets and per-layer trainable counts, and the matched settings of the other methods (in a child)."""
    preset, device = child_setup(spec)
    model = build_model(preset, spec["seed"], device, model_dtype(spec))
    total_params = sum(param.numel() for param in model.parameters())
    peft_model = get_peft_model(model, sara_config(spec))
    layers = []
    for name, layer in sara_layers(peft_model.get_base_model()):
        base = layer.get_base_layer()
        is_conv = isinstance(base, nn.Conv2d)
        kernel = base.kernel_size[0] * base.kernel_size[1] if is_conv else 1
        groups = base.groups if is_conv else 1
        layers.append(
            {
                "name": name,
                "kind": "conv" if is_conv else "linear",
                "in": layer.in_features,
                "out": layer.out_features,
                "numel": base.weight.numel(),
                "sara_count": layer.num_trainable("default"),
                # LoRA's trainable count per unit of rank: A is (r, in/groups, k, k), B is (out, r, 1, 1) / Linear.
                "lora_per_rank": layer.in_features // groups * kernel + layer.out_features,
            }
        )
    linear = [layer for layer in layers if layer["kind"] == "linear"]
    sara_total = sum(layer["sara_count"] for layer in layers)
    sara_linear = sum(layer["sara_count"] for layer in linear)
    linear_numel = sum(layer["numel"] for layer in linear)

    lora_matched_rank = max(1, round(sara_total / sum(layer["lora_per_rank"] for layer in layers)))
    # SHiRA trains r * (in + out) entries per layer (at most in * out): one global r.
    shira_rank = max(1, round(sara_linear / sum(layer["in"] + layer["out"] for layer in linear)))
    shira_rank = min([shira_rank] + [layer["in"] * layer["out"] // (layer["in"] + layer["out"]) for layer in linear])
    return {
        "sara_selection": spec["sara_selection"],
        "model_parameters": total_params,
        "sara_trainable": sara_total,
        "sara_trainable_linear": sara_linear,
        "targeted_weight_entries": sum(layer["numel"] for layer in layers),
        "linear_weight_entries": linear_numel,
        "target_names": [layer["name"] for layer in layers],
        "linear_target_names": [layer["name"] for layer in linear],
        "num_target_layers": {"linear": len(linear), "conv": len(layers) - len(linear)},
        "lora_matched_rank": lora_matched_rank,
        "shira_rank": shira_rank,
        "supertuning_sparsity": 1.0 - sara_linear / linear_numel,
    }


# ------------------------------------------------------------------------------------------------ one method
class TrainingStep:
    """One method's model, optimizer and step; ``mode`` is 'forward', 'input_grad' or 'train'."""

    def __init__(self, model: nn.Module, batch: Batch, mode: str, optimizer=None, grad_masks=(), save=None):
        self.model, self.batch, self.mode = model, batch, mode
        self.optimizer, self.grad_masks, self.save = optimizer, list(grad_masks), save

    def run(self, clock: PhaseClock) -> None:
        if self.mode == "forward":
            with torch.no_grad():
                diffusion_loss(self.model, self.batch)
            clock.mark("forward")
            return
        loss = diffusion_loss(self.model, self.batch)
        clock.mark("forward")
        loss.backward()
        clock.mark("backward")
        if self.mode == "input_grad":
            for tensor in self.batch.inputs.values():
                if isinstance(tensor, torch.Tensor):  # (SDXL's added_cond_kwargs is a dict)
                    tensor.grad = None
            clock.mark("optimizer")
            return
        for param, mask in self.grad_masks:
            param.grad.mul_(mask)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.mark("optimizer")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [param for param in self.model.parameters() if param.requires_grad]


def _adamw(params: Sequence[nn.Parameter], weight_decay: float = WEIGHT_DECAY) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=weight_decay)


def _peft_step(model: nn.Module, batch: Batch, config) -> TrainingStep:
    peft_model = get_peft_model(model, config)
    params = [param for param in peft_model.parameters() if param.requires_grad]
    return TrainingStep(peft_model, batch, "train", _adamw(params), save=peft_model.save_pretrained)


def _save_tensors(tensors: dict[str, torch.Tensor]):
    def save(directory: str) -> None:
        save_file(
            {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()},
            os.path.join(directory, "weights.safetensors"),
        )

    return save


def setup_method(
    method: str, model: nn.Module, batch: Batch, preset: ModelPreset, plan: dict[str, Any], seed: int
) -> TrainingStep:
    """Prepare ``method`` on ``model`` (in place) and return its step."""
    if method in ("frozen_forward", "floor"):
        model.requires_grad_(False)
        if method == "floor":
            batch.inputs[preset.input_key].requires_grad_(True)
            return TrainingStep(model, batch, "input_grad")
        return TrainingStep(model, batch, "forward")
    if method == "full_ft":
        model.requires_grad_(True)
        return TrainingStep(
            model, batch, "train", _adamw(list(model.parameters())), save=_save_tensors(model.state_dict())
        )
    if method in ("lora_r8", "lora_r64", "lora_matched"):
        rank = {"lora_r8": 8, "lora_r64": 64}.get(method, plan["lora_matched_rank"])
        return _peft_step(
            model, batch, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=plan["target_names"])
        )
    if method == "shira":
        return _peft_step(
            model,
            batch,
            ShiraConfig(r=plan["shira_rank"], random_seed=seed, target_modules=plan["linear_target_names"]),
        )
    if method == "supertuning":
        return _peft_step(
            model,
            batch,
            SupertuningConfig(
                sparsity=plan["supertuning_sparsity"], select_top=False, target_modules=plan["linear_target_names"]
            ),
        )
    if method == "sara":
        return _peft_step(model, batch, sara_config(plan))
    if method == "masked_dense":
        model.requires_grad_(False)
        layers = target_layers(model, plan["target_names"])
        grad_masks = []
        for layer in layers.values():
            weight = layer.weight
            weight.requires_grad_(True)
            indices, _ = select_trainable_indices(weight, **plan["sara_selection"])
            mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
            mask[indices.long()] = True
            grad_masks.append((weight, mask.view_as(weight)))
        # No weight decay: AdamW's decay would move the frozen entries, which a masked baseline must keep.
        optimizer = _adamw([weight for weight, _ in grad_masks], weight_decay=0.0)
        step = TrainingStep(
            model,
            batch,
            "train",
            optimizer,
            grad_masks,
            save=_save_tensors({f"{name}.weight": layer.weight for name, layer in layers.items()}),
        )
        return step
    raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")


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


def failure_status(error: Exception) -> str:
    """'timeout', 'oom' or 'error' for what :func:`run_in_fresh_process` raised (the child's traceback is its text)."""
    if isinstance(error, TimeoutError):
        return "timeout"
    message = str(error)
    return "oom" if "OutOfMemoryError" in message or "out of memory" in message.lower() else "error"


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
