"""Every GPU measurement of the project in one command, inside a time budget (default 7 minutes on one H100 / H200).

Four parts, run in this order, each in fresh processes forked from this one (so memory peaks are clean):

1. ``sd15``: one training step of the SD1.5-config UNet (random weights, 512 px = 64x64 latents, bf16) at batch 4 / 8 /
   1: frozen floor, full fine-tuning, LoRA r=8 and r=64, SHiRA, Super-Tuning, masked dense gradients and SaRA
   (``benchmarks/train_step.py``): step time and ``torch.cuda.max_memory_allocated``.
2. ``sdxl``: the SDXL-config UNet (2.6B parameters, 1024 px = 128x128 latents), batch 1, bf16 with gradient
   checkpointing: floor, full fine-tuning, LoRA r=8 and SaRA. A method that runs out of memory is recorded, not fatal.
3. ``sd15-compiled``: SaRA through ``torch.compile`` at batch 4, in the same tables as part 1.
4. ``kernels``: the masked-weight ops (patch + restore, sampled weight gradient), Triton against the PyTorch reference,
   at SD1.5 layer shapes, densities 0.1-50 %, bf16 / fp16 / fp32 and 1K-16K tokens (``benchmarks/kernels.py``), and
   the SDDMM / masked-GEMM density cutoff per dtype that these numbers favour. Its (dtype, tokens) cases run in
   priority order, so it also takes whatever time the other parts left.

Budget: part *i* must end by the start plus the sum of the shares of parts 1..*i*, so time an early part leaves unused
passes to the later ones. Before each case the suite estimates its duration from the cases already run (or a prior
guess, for the compilation) and skips it, with a note in the results, if it would end past its part's limit; a case
still running at the limit plus a short grace is killed and recorded as ``timeout``. Prints progress and tables, and writes ``gpu_suite-<device>.json`` and
``gpu_suite-<device>.md`` to ``--out-dir``, else ``$OUT``, else ``benchmarks/results/``.

    python -m benchmarks.gpu_suite                          # on the GPU machine
    python -m benchmarks.gpu_suite --tiny --device cpu      # toy shapes on CPU (CI smoke test)
    python -m benchmarks.gpu_suite --parts sd15,sdxl --budget-s 300
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/gpu_suite.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from diffusers.utils import logging as diffusers_logging

from benchmarks import kernels as kernel_benchmark
from benchmarks import train_step
from benchmarks.common import (
    DTYPES,
    PRESETS,
    RESULTS_DIR,
    SHORT_DTYPE_NAMES,
    finish_machine_info,
    format_markdown_table,
    format_table,
    machine_info,
    mib,
    model_class,
    preset_summary,
    resolve_device,
    run_in_fresh_process,
    write_results,
)
from peft_sara import kernels as sara_kernels
from peft_sara.kernels import reference

PARTS = ("sd15", "sdxl", "sd15-compiled", "kernels")
COMPILED = "sara_compiled"
GRACE_S = 20.0  # how far past its part's limit a running case may go before it is killed
SDXL_MEMORY_LIMIT_BYTES = 16 * 2**30


# ------------------------------------------------------------------------------------------------ what runs
@dataclass(frozen=True)
class SuiteSettings:
    """Shapes, step counts and time shares of one suite run (``FULL`` on a GPU, ``TINY`` for CI on CPU)."""

    sd15_preset: str
    sdxl_preset: str
    sd15_methods: tuple[str, ...]
    sdxl_methods: tuple[str, ...]
    batch_sizes: tuple[int, ...]  # in the order they run: the target batch first, so a tight budget drops the others
    compile_batch_sizes: tuple[int, ...]
    steps: int
    warmup: int
    sdxl_steps: int
    sdxl_warmup: int
    dtype: str  # of the training steps (the model; PEFT keeps adapter weights in float32)
    compile_backend: str
    kernel_cases: tuple[tuple[str, int, str], ...]  # (dtype, tokens, "out x in" shapes), in priority order
    kernel_densities: str
    compile_guess_s: float  # expected seconds of the first compiled case (compilation included)
    shares_s: dict[str, float] = field(default_factory=dict)  # per part, in PARTS order


FULL = SuiteSettings(
    sd15_preset="sd15",
    sdxl_preset="sdxl",
    sd15_methods=("floor", "full_ft", "lora_r8", "lora_r64", "shira", "supertuning", "masked_dense", "sara"),
    sdxl_methods=("floor", "full_ft", "lora_r8", "sara"),
    batch_sizes=(4, 8, 1),
    compile_batch_sizes=(4,),
    steps=5,
    warmup=2,
    sdxl_steps=3,
    sdxl_warmup=1,
    dtype="bfloat16",
    compile_backend="inductor",
    # Every dtype at 4096 tokens (SD1.5 at 512 px, batch 1, first level) on three SD1.5 shapes, then the token sweep on
    # one shape (the level-2 feed-forward output): both strategies' costs grow linearly in the tokens, so this checks
    # that density alone decides.
    kernel_cases=(
        ("bf16", 4096, kernel_benchmark.DEFAULT_SHAPES),
        ("fp16", 4096, kernel_benchmark.DEFAULT_SHAPES),
        ("fp32", 4096, kernel_benchmark.DEFAULT_SHAPES),
        ("bf16", 16384, "640x2560"),
        ("bf16", 1024, "640x2560"),
        ("fp32", 16384, "640x2560"),
        ("fp32", 1024, "640x2560"),
        ("fp16", 16384, "640x2560"),
        ("fp16", 1024, "640x2560"),
    ),
    kernel_densities=kernel_benchmark.DEFAULT_DENSITIES,
    compile_guess_s=60.0,
    shares_s={"sd15": 170.0, "sdxl": 90.0, "sd15-compiled": 80.0, "kernels": 80.0},
)
TINY = SuiteSettings(
    sd15_preset="tiny",
    sdxl_preset="tiny-sdxl",
    # The methods the ratios and targets need (train_step's own test runs every method).
    sd15_methods=("floor", "full_ft", "lora_r8", "sara"),
    sdxl_methods=("floor", "lora_r8", "sara"),
    batch_sizes=(2,),
    compile_batch_sizes=(2,),
    steps=1,
    warmup=1,
    sdxl_steps=1,
    sdxl_warmup=1,
    dtype="bfloat16",
    compile_backend="eager",  # dynamo's capture only: the compiled path runs, without minutes of code generation
    kernel_cases=(("bf16", 16, "16x24,32x48"), ("fp32", 32, "16x24")),
    kernel_densities="0.01,0.1,0.5",
    compile_guess_s=0.0,
    shares_s={"sd15": 120.0, "sdxl": 60.0, "sd15-compiled": 60.0, "kernels": 60.0},
)


class Budget:
    """The run's time limit as one deadline per part: part *i* ends by the start plus the shares of parts 1..*i*."""

    def __init__(self, shares_s: dict[str, float], clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.start = clock()
        self.ends: dict[str, float] = {}
        total = 0.0
        for part, share in shares_s.items():
            total += share
            self.ends[part] = self.start + total

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return self.clock() - self.start

    def left(self, part: str) -> float:
        """Seconds until ``part`` must end (negative once past)."""
        return self.ends[part] - self.clock()

    def fits(self, part: str, estimate_s: float) -> bool:
        """Whether a case expected to take ``estimate_s`` would end before ``part``'s limit."""
        return estimate_s <= self.left(part)

    def timeout(self, part: str) -> float:
        """Seconds a case started now may run before it is killed: to the part's limit plus a short grace."""
        return max(1.0, self.left(part) + GRACE_S)


class CaseLog:
    """Durations of the cases a part ran, the estimate for the next one, and the notes of what it skipped."""

    def __init__(self, part: str, budget: Budget, guesses_s: dict[str, float] | None = None) -> None:
        self.part, self.budget = part, budget
        self.guesses_s = guesses_s or {}
        self.durations: dict[str, list[float]] = defaultdict(list)
        self.skipped: list[str] = []

    def estimate(self, kind: str) -> float:
        """Expected seconds of a case of ``kind``: the mean of that kind so far, else its guess, else the part's mean
        so far, else zero (a part's first case always runs)."""
        same = self.durations.get(kind)
        every = [seconds for values in self.durations.values() for seconds in values]
        if same:
            return statistics.fmean(same)
        if kind in self.guesses_s:
            return self.guesses_s[kind]
        return statistics.fmean(every) if every else 0.0

    def should_run(self, kind: str, label: str) -> bool:
        """Whether the case fits the part's budget; records a note when it does not."""
        estimate = self.estimate(kind)
        if self.budget.fits(self.part, estimate):
            return True
        left = self.budget.left(self.part)
        self.skipped.append(f"{label}: skipped, {max(left, 0.0):.0f} s left of the budget, ~{estimate:.0f} s needed")
        print(f"[{self.budget.elapsed():6.1f}s] {self.skipped[-1]}", flush=True)
        return False

    def record(self, kind: str, seconds: float) -> None:
        self.durations[kind].append(seconds)


# ------------------------------------------------------------------------------------------------ part 4: kernels
def run_kernel_cases(settings: SuiteSettings, device_name: str, allowance_s: float) -> dict[str, Any]:
    """Every (dtype, tokens, shapes) case of ``benchmarks.kernels`` that fits ``allowance_s`` (in a child process)."""
    device = torch.device(device_name)
    triton_kernels = None
    if device.type == "cuda" and sara_kernels.triton_available():
        from peft_sara.kernels import triton_kernels  # optional: needs Triton and a GPU
    start, durations, rows, skipped = time.perf_counter(), [], [], []
    for dtype, tokens, shapes in settings.kernel_cases:
        estimate = statistics.fmean(durations) if durations else 0.0
        if time.perf_counter() - start + estimate > allowance_s:
            skipped.append(f"kernels {dtype} N={tokens}: skipped, the part's budget ({allowance_s:.0f} s) is spent")
            print(skipped[-1], flush=True)
            continue
        case_start = time.perf_counter()
        args = kernel_benchmark.parse_args(
            ["--dtype", dtype, "--tokens", str(tokens)] + ["--shapes", shapes, "--densities", settings.kernel_densities]
        )
        with contextlib.redirect_stdout(io.StringIO()):  # one line per timed op: the JSON keeps them
            report = kernel_benchmark.benchmark(args, device, reference, triton_kernels)
        rows += [{**row, "dtype": dtype} for row in report["rows"]]
        durations.append(time.perf_counter() - case_start)
        print(
            f"  kernels {dtype} N={tokens}: {len(report['rows'])} timings in {durations[-1]:.1f} s; GEMM faster than "
            f"SDDMM from density {report['sddmm_slower_from_density'] or '-'}",
            flush=True,
        )
    setting = None
    if triton_kernels is not None:
        setting = {
            short: triton_kernels.SDDMM_MAX_DENSITY.get(DTYPES[name]) for short, name in SHORT_DTYPE_NAMES.items()
        }
    return {
        "triton": triton_kernels is not None,
        "rows": rows,
        "skipped": skipped,
        "sddmm_max_density_setting": setting,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def choose_sddmm_cutoffs(
    rows: Sequence[dict[str, Any]], current: dict[str, float | None] | None = None
) -> dict[str, dict[str, Any]]:
    """Per dtype, the SDDMM density cutoff the measurements favour, with how much each choice loses.

    A cutoff ``c`` means "SDDMM at density <= c, masked GEMM above". Among 0 and the measured densities, the chosen one
    minimises the mean slowdown against the faster strategy of each measured (shape, tokens, density) point, all
    points weighted alike; ties go to the smaller cutoff. Also reports, per (shape, tokens), the smallest density at
    which the GEMM was faster (the crossover), and the slowdown of the ``current`` setting.
    """
    points: dict[str, dict[tuple[str, int, float], dict[str, float]]] = defaultdict(dict)
    for row in rows:
        strategy = {"grad/triton-sddmm": "sddmm", "grad/triton-gemm": "gemm"}.get(row["op"])
        if strategy is not None:
            key = (row["shape"], row["tokens"], row["density"])
            points[row["dtype"]].setdefault(key, {})[strategy] = row["ms"]
    chosen = {}
    for dtype, measured in points.items():
        measured = {key: ms for key, ms in measured.items() if len(ms) == 2}
        if not measured:
            continue

        def slowdowns(cutoff: float, measured=measured) -> list[float]:
            return [
                (ms["sddmm"] if density <= cutoff else ms["gemm"]) / min(ms.values())
                for (_, _, density), ms in measured.items()
            ]

        candidates = [0.0] + sorted({density for _, _, density in measured})
        mean_slowdown, cutoff = min((statistics.fmean(slowdowns(candidate)), candidate) for candidate in candidates)
        crossovers = defaultdict(list)
        for (shape, tokens, density), ms in sorted(measured.items()):
            crossovers[(shape, tokens)].append((density, ms["gemm"] < ms["sddmm"]))
        setting = (current or {}).get(dtype)
        chosen[dtype] = {
            "cutoff": cutoff,
            "gemm_from_density": next((d for d in candidates if d > cutoff), None),
            "mean_slowdown": mean_slowdown,
            "worst_slowdown": max(slowdowns(cutoff)),
            "current_setting": setting,
            "current_mean_slowdown": None if setting is None else statistics.fmean(slowdowns(setting)),
            "points": len(measured),
            "crossovers": [
                {
                    "shape": shape,
                    "tokens": tokens,
                    "gemm_faster_from_density": next((density for density, faster in series if faster), None),
                }
                for (shape, tokens), series in crossovers.items()
            ],
        }
    return chosen


def kernel_speedups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dtype and tokens: median speedup of Triton over the reference (sampled gradient, auto; patch + restore)."""
    times: dict[tuple[str, int, str, float], dict[str, float]] = defaultdict(dict)
    for row in rows:
        times[(row["dtype"], row["tokens"], row["shape"], row["density"])][row["op"]] = row["ms"]
    ratios: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (dtype, tokens, _, _), ops in times.items():
        for name, fast, slow in (
            ("grad", "grad/triton-auto", "grad/reference"),
            ("patch_restore", "patch+restore/triton", "patch+restore/reference"),
        ):
            if fast in ops and slow in ops and ops[fast] > 0:
                ratios[(dtype, tokens)][name].append(ops[slow] / ops[fast])
    return [
        {
            "dtype": dtype,
            "tokens": tokens,
            "grad_speedup_median": statistics.median(found["grad"]) if found["grad"] else None,
            "patch_restore_speedup_median": statistics.median(found["patch_restore"])
            if found["patch_restore"]
            else None,
        }
        for (dtype, tokens), found in sorted(ratios.items())
    ]


def kernels_part(settings: SuiteSettings, device: torch.device, budget: Budget) -> dict[str, Any]:
    """Part 4: the kernel micro-benchmarks in one child process, and the cutoffs chosen from them."""
    part = "kernels"
    print(f"[{budget.elapsed():6.1f}s] kernels: {len(settings.kernel_cases)} (dtype, tokens, shapes) cases", flush=True)
    try:
        report = run_in_fresh_process(
            run_kernel_cases, settings, str(device), budget.left(part), timeout_s=budget.timeout(part)
        )
    except (RuntimeError, TimeoutError) as error:
        return {"status": train_step.failure_status(error), "error": str(error)[-2000:], "rows": []}
    report["cutoffs"] = choose_sddmm_cutoffs(report["rows"], report["sddmm_max_density_setting"])
    report["speedups"] = kernel_speedups(report["rows"])
    report["status"] = "ok"
    if not report["triton"]:
        report["note"] = "no Triton timings (no CUDA device or no Triton): reference only, no cutoff chosen"
    for dtype, choice in report["cutoffs"].items():
        current = choice["current_mean_slowdown"]
        print(
            f"  {dtype}: SDDMM up to density {choice['cutoff']:g} (GEMM from {choice['gemm_from_density']}): mean "
            f"slowdown {choice['mean_slowdown']:.3f}x against the faster strategy per point; the current setting "
            f"{choice['current_setting']}: {'n/a' if current is None else f'{current:.3f}x'}",
            flush=True,
        )
    return report


# ------------------------------------------------------------------------------------------------ parts 1-3: steps
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
    """SaRA's targets and the matched settings of the other methods (``train_step.make_plan``), or None on failure."""
    if not log.should_run("plan", f"{label} plan"):
        return None
    start = time.monotonic()
    try:
        plan = run_in_fresh_process(train_step.make_plan, spec, timeout_s=log.budget.timeout(log.part))
    except (RuntimeError, TimeoutError) as error:
        log.skipped.append(f"{label}: plan failed ({train_step.failure_status(error)}), part not run")
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
    train_step.add_ratios(ok)
    floor, lora = ok.get(train_step.FLOOR), ok.get(train_step.REFERENCE_LORA)
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


# ------------------------------------------------------------------------------------------------ targets, report
def check_gpu_targets(sd15: dict[str, Any], sdxl: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's GPU targets with the measured values (None where a method did not run)."""
    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float) -> None:
        met = None if value is None else value <= limit
        targets.append({"target": name, "measured": value, "limit": limit, "met": met})

    case = f"{sd15['preset']['name']} {sd15['dtype']}" if sd15.get("preset") else ""
    for batch, found in sd15.get("batches", {}).items():
        methods = found["methods"]
        for name in ("sara", COMPILED):
            if name not in methods:
                continue
            sara = methods[name]
            if int(batch) >= 4:
                add(f"{case} bs{batch}: {name} step <= 0.8 x LoRA r=8", sara["step_vs_lora_r8"], 0.8)
                add(f"{case} bs{batch}: {name} step <= 1.3 x frozen floor", sara["step_vs_floor"], 1.3)
            add(f"{case} bs{batch}: {name} peak memory <= LoRA r=8's", sara["peak_vs_lora_r8"], 1.0)
    for batch, found in sdxl.get("batches", {}).items():
        sara = found["methods"].get("sara")
        if sara is not None:
            add(
                f"{sdxl['preset']['name']} {sdxl['dtype']} bs{batch}, gradient checkpointing: SaRA peak memory <= 16 GiB",
                sara["peak_bytes"] / 2**30,
                SDXL_MEMORY_LIMIT_BYTES / 2**30,
            )
    return targets


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
                "Median speedup of Triton over the PyTorch reference over shapes and densities:",
                "",
                format_markdown_table(
                    kernels["speedups"],
                    [
                        ("dtype", "dtype", ""),
                        ("tokens", "tokens", "d"),
                        ("grad_speedup_median", "sampled grad (auto)", ".2f"),
                        ("patch_restore_speedup_median", "patch + restore", ".2f"),
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


def output_dir(flag: Path | None) -> Path:
    """``--out-dir``, else ``$OUT`` (the device tool's output folder), else ``benchmarks/results/``."""
    if flag is not None:
        return flag
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy shapes and a CPU-friendly compile (CI smoke test)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of: {', '.join(PARTS)}")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="total seconds for all parts (default 420 on a GPU: under 8 minutes with start-up); shares scale with it",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: usable cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=None, help="folder for the JSON and markdown (default: $OUT)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = [name for name in parts if name not in PARTS]
    if unknown:
        raise SystemExit(f"Unknown part(s) {unknown}; choose from {', '.join(PARTS)}.")
    settings = TINY if args.tiny else FULL
    shares = {part: settings.shares_s[part] for part in PARTS if part in parts}
    if args.budget_s is not None:
        scale = args.budget_s / sum(shares.values())
        shares = {part: share * scale for part, share in shares.items()}
    settings = SuiteSettings(**{**asdict(settings), "shares_s": shares})
    diffusers_logging.set_verbosity_error()  # not one "kept in float32" note per process
    model_class("unet")  # import it once here rather than in every child
    resolved = resolve_device(args.device, args.threads)
    device, threads = resolved.device, resolved.threads
    if device.type != "cuda" and not args.tiny:
        print("No CUDA device: the full suite is meant for a GPU (use --tiny on CPU). Running it anyway.", flush=True)
    machine = machine_info(device, threads)
    budget = Budget(shares)
    print(
        f"GPU suite{' (tiny)' if args.tiny else ''} on {device}: parts {', '.join(shares)}; budget "
        + ", ".join(f"{part} {share:.0f} s" for part, share in shares.items()),
        flush=True,
    )

    report: dict[str, Any] = {"benchmark": "gpu_suite", "tiny": args.tiny, "settings": asdict(settings)}
    skipped: list[str] = []
    sd15 = StepResults(settings.sd15_preset)
    sdxl = StepResults(settings.sdxl_preset)

    def sd15_spec(batch_size: int, **overrides: Any) -> dict[str, Any]:
        return train_spec(settings, settings.sd15_preset, batch_size, device, threads, args.seed, **overrides)

    def sdxl_spec(batch_size: int) -> dict[str, Any]:
        return train_spec(
            settings,
            settings.sdxl_preset,
            batch_size,
            device,
            threads,
            args.seed,
            steps=settings.sdxl_steps,
            warmup=settings.sdxl_warmup,
            gradient_checkpointing=True,
        )

    if "sd15" in shares:
        skipped += steps_part("sd15", settings, budget, sd15, settings.batch_sizes, settings.sd15_methods, sd15_spec)
    if "sdxl" in shares:
        skipped += steps_part("sdxl", settings, budget, sdxl, (1,), settings.sdxl_methods, sdxl_spec)
    if "sd15-compiled" in shares:
        skipped += steps_part(
            "sd15-compiled",
            settings,
            budget,
            sd15,
            settings.compile_batch_sizes,
            ["sara"],
            lambda batch_size: sd15_spec(batch_size, compile=True),
            method_name=lambda _: COMPILED,
            guesses_s={"sara": settings.compile_guess_s},
        )
    if "kernels" in shares:
        report["kernels"] = kernels_part(settings, device, budget)
        skipped += report["kernels"].get("skipped", [])

    report["sd15"] = finish_steps(sd15) if sd15.raw or sd15.plan else None
    report["sdxl"] = finish_steps(sdxl) if sdxl.raw or sdxl.plan else None
    report["targets"] = check_gpu_targets(report["sd15"] or {}, report["sdxl"] or {})
    report["skipped"] = skipped
    report["duration_s"] = budget.elapsed()
    device_names = [
        result.get("device_name")
        for found in (sd15, sdxl)
        for methods in found.raw.values()
        for result in methods.values()
    ] + [(report.get("kernels") or {}).get("device_name")]
    finish_machine_info(machine, next((name for name in device_names if name), None))
    report["machine"] = machine

    print_summary(report)
    folder = output_dir(args.out_dir)
    stem = f"gpu_suite-{'tiny-' if args.tiny else ''}{device.type}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.md").write_text(render_markdown(report) + "\n")
    print(f"\nwrote {folder / f'{stem}.md'}")
    write_results(folder / f"{stem}.json", report)
    print(f"total {budget.elapsed():.0f} s", flush=True)
    return report


if __name__ == "__main__":
    main()
