"""What every benchmark script shares: the model presets and inputs, the command-line flags, timing, memory, machine
and library versions, and writing results (JSON under ``benchmarks/results/``, plain-text tables).

Every script runs as ``python -m benchmarks.<name>`` and imports this module as ``benchmarks.common``. Models and
inputs are deterministic given a seed and a device type (weights are drawn on the device), so every method of one
benchmark run sees the same random-init model, the same batch and the same timesteps. Importing this module does not import diffusers, PEFT or Triton (``kernels.py`` must set
``TRITON_INTERPRET`` before Triton is first imported).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

SD15_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD15_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
SDXL_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
SDXL_UP_BLOCKS = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
SDXL_TIME_IDS = 6  # original size, crop top-left, target size: each embedded in addition_time_embed_dim
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ------------------------------------------------------------------------------------------------------ presets
@dataclass(frozen=True)
class ModelPreset:
    """A benchmark model: a diffusers class built from ``config`` with random weights, and the shapes of its inputs."""

    name: str
    family: str  # "unet" (UNet2DConditionModel) or "dit" (SD3Transformer2DModel)
    config: dict[str, Any]
    latent_size: int
    text_tokens: int
    sara_fraction: float  # trainable_fraction given to SaRA (random-init weights: a global threshold means little)
    description: str = ""
    pooled_dim: int = 0  # DiT and SDXL: size of the pooled text embedding

    @property
    def has_time_ids(self) -> bool:
        """Whether the UNet takes SDXL's extra conditioning (``added_cond_kwargs``: pooled text and size ids)."""
        return self.config.get("addition_embed_type") == "text_time"

    @property
    def latent_channels(self) -> int:
        return self.config["in_channels"]

    @property
    def text_dim(self) -> int:
        return self.config["cross_attention_dim"] if self.family == "unet" else self.config["joint_attention_dim"]

    @property
    def input_key(self) -> str:
        """Name of the latent input (the one that requires grad in the 'floor' measurement)."""
        return "sample" if self.family == "unet" else "hidden_states"


PRESETS: dict[str, ModelPreset] = {
    "small": ModelPreset(
        name="small",
        family="unet",
        description="SD1.5-shaped UNet (same block types, cross-attention dim 768), channels / 10, 1 layer per block",
        config=dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64, 128, 128),
            down_block_types=SD15_DOWN_BLOCKS,
            up_block_types=SD15_UP_BLOCKS,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        latent_size=32,
        text_tokens=77,
        sara_fraction=0.07,
    ),
    "sd15": ModelPreset(
        name="sd15",
        family="unet",
        description="Stable Diffusion 1.5 UNet shapes (860M parameters), random weights; meant for a GPU",
        config=dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=SD15_DOWN_BLOCKS,
            up_block_types=SD15_UP_BLOCKS,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        latent_size=64,
        text_tokens=77,
        sara_fraction=0.06,  # threshold 2e-3 selects ~6% of the real SD1.5 UNet (paper)
    ),
    "sdxl": ModelPreset(
        name="sdxl",
        family="unet",
        description="Stable Diffusion XL UNet config (2.57B parameters), random weights, 1024 px; meant for a GPU",
        config=dict(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=SDXL_DOWN_BLOCKS,
            up_block_types=SDXL_UP_BLOCKS,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),  # diffusers' name for the number of heads: 64 channels per head
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # 1280 pooled text + 6 time ids x 256
            norm_num_groups=32,
        ),
        latent_size=128,
        text_tokens=77,
        sara_fraction=0.06,  # as sd15: random weights, so a fraction stands in for the paper's threshold
        pooled_dim=1280,
    ),
    "dit": ModelPreset(
        name="dit",
        family="dit",
        description="SD3-shaped MMDiT (SD3Transformer2DModel), 4 joint blocks of width 256; small enough for CPU",
        config=dict(
            sample_size=32,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=4,
            attention_head_dim=64,
            num_attention_heads=4,
            joint_attention_dim=768,
            caption_projection_dim=256,
            pooled_projection_dim=768,
            pos_embed_max_size=32,
        ),
        latent_size=32,
        text_tokens=77,
        sara_fraction=0.07,
        pooled_dim=768,
    ),
    "tiny": ModelPreset(
        name="tiny",
        family="unet",
        description="toy UNet for the smoke test",
        config=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        latent_size=8,
        text_tokens=6,
        sara_fraction=0.07,
    ),
    "tiny-sdxl": ModelPreset(
        name="tiny-sdxl",
        family="unet",
        description="toy UNet with SDXL's layout (text_time conditioning, linear projections, deeper last block)",
        config=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            cross_attention_dim=32,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=16 + SDXL_TIME_IDS * 8,
            norm_num_groups=8,
        ),
        latent_size=8,
        text_tokens=6,
        sara_fraction=0.07,
        pooled_dim=16,
    ),
    "tiny-dit": ModelPreset(
        name="tiny-dit",
        family="dit",
        description="toy SD3 transformer for the smoke test",
        config=dict(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=16,
            pooled_projection_dim=16,
            pos_embed_max_size=8,
        ),
        latent_size=8,
        text_tokens=5,
        sara_fraction=0.07,
        pooled_dim=16,
    ),
}


def preset_summary(preset: ModelPreset) -> dict[str, Any]:
    """The preset fields recorded in every result JSON."""
    return {
        "name": preset.name,
        "description": preset.description,
        "config": preset.config,
        "latent_size": preset.latent_size,
        "text_tokens": preset.text_tokens,
    }


def model_class(family: str) -> type[nn.Module]:
    """The diffusers class of a preset family. Imported on first use, so importing this module stays light; a
    launcher calls it before forking (:func:`setup_run` does), so its children do not each pay the import (seconds)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    return UNet2DConditionModel if family == "unet" else SD3Transformer2DModel


def build_model(preset: ModelPreset, seed: int, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The preset's model with seeded random weights (drawn in float32 on ``device``), in ``dtype``, in train mode.

    Drawing the weights on the device keeps a 2.6B-parameter GPU model's set-up to seconds; a given seed gives the same
    weights on every run on the same device type (CPU and CUDA weights differ).
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(preset.family)(**preset.config)
    model = model.to(device) if dtype == torch.float32 else model.to(device=device, dtype=dtype)
    return model.train()


@dataclass
class Batch:
    """Model inputs (keyword arguments) and the regression target of the diffusion-style loss."""

    inputs: dict[str, torch.Tensor]
    target: torch.Tensor


def make_batch(
    preset: ModelPreset, batch_size: int, seed: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> Batch:
    """Random latents, timesteps, text embeddings and target, drawn from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed + 1)
    size = preset.latent_size
    latents = torch.randn(batch_size, preset.latent_channels, size, size, generator=generator)
    text = torch.randn(batch_size, preset.text_tokens, preset.text_dim, generator=generator)
    target = torch.randn(batch_size, preset.config["out_channels"], size, size, generator=generator)
    if preset.family == "unet":
        timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
        inputs = {"sample": latents, "timestep": timesteps, "encoder_hidden_states": text}
        if preset.has_time_ids:
            pooled = torch.randn(batch_size, preset.pooled_dim, generator=generator)
            pixels = float(size * 8)  # the VAE's 8x: original size, crop (0, 0), target size, as SDXL pipelines send
            time_ids = torch.tensor([pixels, pixels, 0.0, 0.0, pixels, pixels]).repeat(batch_size, 1)
            inputs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    else:
        timesteps = torch.rand(batch_size, generator=generator) * 1000
        pooled = torch.randn(batch_size, preset.pooled_dim, generator=generator)
        inputs = {
            "hidden_states": latents,
            "timestep": timesteps,
            "encoder_hidden_states": text,
            "pooled_projections": pooled,
        }
    return Batch(_to_device(inputs, device, dtype), target.to(device))


def _to_device(inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``inputs`` (nested dicts too) on ``device``, floating-point tensors in ``dtype``."""
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, dict):
            moved[key] = _to_device(value, device, dtype)
        else:
            moved[key] = value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return moved


def model_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's prediction (``.sample``) for keyword ``inputs``."""
    return model(**inputs, return_dict=False)[0]


def diffusion_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """MSE between the model's prediction and the batch target (the usual noise-prediction loss)."""
    return F.mse_loss(model_output(model, batch.inputs).float(), batch.target.float())


def target_layers(model: nn.Module, target_suffixes: Sequence[str]) -> dict[str, nn.Module]:
    """Full names -> modules of the Linear / Conv2d layers whose name ends with one of ``target_suffixes``.

    Uses PEFT's list rule (exact name or ``.suffix``), so the names are the ones SaRA with the same targets adapts.
    """
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if any(name == suffix or name.endswith("." + suffix) for suffix in target_suffixes):
            layers[name] = module
    return layers


# ------------------------------------------------------------------------------------------------------ timing
def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads (the same number in every process of a benchmark run)."""
    torch.set_num_threads(threads)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on CPU), so a clock read covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Wall-clock and process-CPU time of consecutive phases of one step (synchronising CUDA at each mark)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        synchronize(device)
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def mark(self, phase: str) -> None:
        """Attribute the time since the previous mark to ``phase``."""
        synchronize(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall[phase] = self.wall.get(phase, 0.0) + wall - self._wall
        self.cpu[phase] = self.cpu.get(phase, 0.0) + cpu - self._cpu
        self._wall, self._cpu = wall, cpu


def median(values: Sequence[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------------------------------------------ memory
def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


class MemoryProbe:
    """Peak memory of a window of work, as bytes above a baseline.

    CUDA: ``torch.cuda`` allocator counters. CPU: the process's resident set size; the peak (VmHWM) is reset through
    ``/proc/self/clear_refs`` when the window starts (Linux >= 4.0), so it covers only the window. RSS also counts
    memory the C allocator keeps after frees, so CPU peaks are upper bounds on live tensor memory.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.can_reset_cpu_peak = device.type != "cuda" and self._try_reset_cpu_peak()

    @staticmethod
    def _try_reset_cpu_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            return True
        except OSError:
            return False

    def current(self) -> int:
        """Bytes in use now (CUDA: allocated tensors; CPU: resident set size)."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status_kib("VmRSS") * 1024

    def reset_peak(self) -> None:
        """Start a new peak window."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.can_reset_cpu_peak:
            self._try_reset_cpu_peak()

    def peak(self) -> int:
        """Highest bytes in use since the last :meth:`reset_peak` (without a CPU reset: since process start)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status_kib("VmHWM") * 1024


def max_rss_bytes() -> int:
    """Lifetime peak resident set size of this process (``getrusage().ru_maxrss``; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


def mib(num_bytes: float | None) -> float | None:
    """Bytes in MiB (None stays None)."""
    return None if num_bytes is None else num_bytes / 2**20


# ------------------------------------------------------------------------------------------------------ processes
def _die_with_parent() -> None:
    """Ask Linux to kill this process if its parent dies (so an interrupted run leaves no orphans)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def run_in_fresh_process(fn: Callable[..., dict], *args: Any, timeout_s: float | None = None) -> dict:
    """Run ``fn(*args)`` in a forked child and return its (picklable) result; re-raise its errors here.

    The parent must not have run any torch computation or initialised CUDA (fork keeps neither safe); it has only
    imported the libraries, so every child starts from the same clean state and pays no import time. A child still
    running after ``timeout_s`` seconds is killed and :class:`TimeoutError` raised.
    """
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def child() -> None:
        _die_with_parent()
        try:
            result = ("ok", fn(*args))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            result = ("error", traceback.format_exc())
        sender.send(result)
        sender.close()

    process = context.Process(target=child)
    process.start()
    sender.close()
    if timeout_s is not None and not receiver.poll(timeout_s):
        process.kill()
        process.join()
        raise TimeoutError(f"The benchmark child process ran past its {timeout_s:.0f} s limit and was stopped.")
    try:
        status, payload = receiver.recv()
    except EOFError:
        process.join()
        raise RuntimeError(
            f"The benchmark child process died without a result (exit code {process.exitcode}; "
            "-9 usually means it was killed for memory)."
        ) from None
    process.join()
    if status == "error":
        raise RuntimeError(f"The benchmark child process failed:\n{payload}")
    return payload


# ------------------------------------------------------------------------------------------------------ reporting
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def package_version(package: str) -> str | None:
    """The installed version of ``package``, or None if it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """What the numbers were measured on (call in the parent: it does not touch CUDA)."""
    return {
        "device": str(device),
        "device_name": _cpu_model() if device.type == "cpu" else None,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "load_average_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": package_version("diffusers"),
        "peft": package_version("peft"),
        "peft_sara": package_version("peft-sara"),
        "git_commit": _git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def finish_machine_info(machine: dict[str, Any], device_name: str | None = None) -> None:
    """Add the load average at the end of the run, and the GPU's name once a child has reported it."""
    machine["load_average_at_end"] = list(os.getloadavg())
    if device_name:
        machine["device_name"] = device_name


def cuda_device_name(device: torch.device) -> str | None:
    """GPU name (call in a child: initialises CUDA)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` are (key, header, format spec); missing values print as '-'."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            line.append("-" if value is None else format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    out = []
    for number, line in enumerate(cells):
        out.append(
            "  ".join(
                cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(line, widths))
            )
        )
        if number == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


def format_markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """The same table as :func:`format_table`, as GitHub markdown."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |"]
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, spec) if spec else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_path(out: Path | None, benchmark: str, preset: ModelPreset, batch_size: int, device: torch.device) -> Path:
    """``--out``, or the default ``benchmarks/results/<benchmark>-<preset>-bs<B>-<device type>.json``."""
    return out or RESULTS_DIR / f"{benchmark}-{preset.name}-bs{batch_size}-{device.type}.json"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_results(path: Path, payload: dict[str, Any]) -> None:
    """Write a benchmark's result JSON and say where."""
    write_json(path, payload)
    print(f"\nwrote {path}")


@dataclass
class ThreadsAndDevice:
    """Resolved ``--device`` / ``--threads`` flags."""

    device: torch.device
    threads: int


def _cuda_available() -> dict:
    return {"cuda": torch.cuda.is_available()}


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def resolve_device(device_flag: str, threads_flag: int | None) -> ThreadsAndDevice:
    """``auto`` picks CUDA when present (asked in a child, so this process never initialises CUDA before forking)."""
    if device_flag == "auto":
        device_flag = "cuda" if run_in_fresh_process(_cuda_available)["cuda"] else "cpu"
    return ThreadsAndDevice(torch.device(device_flag), int(threads_flag or usable_cores()))


def child_setup(spec: dict[str, Any]) -> tuple[ModelPreset, torch.device]:
    """In a measuring (child) process: use the run's thread count; return its preset and device."""
    set_threads(spec["threads"])
    return PRESETS[spec["preset"]], torch.device(spec["device"])


# ------------------------------------------------------------------------------------------------------ flags
def add_common_arguments(parser: argparse.ArgumentParser, benchmark: str, batch_size: int = 1) -> None:
    """The flags every model benchmark takes: --preset, --batch-size, --device, --threads, --seed, --out."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: usable cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON path (default benchmarks/results/{benchmark}-<preset>-bs<B>-<device>.json)",
    )


def add_selection_arguments(parser: argparse.ArgumentParser, threshold_help: str) -> None:
    """--sara-fraction or --sara-threshold (see :func:`sara_selection`)."""
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument(
        "--sara-fraction", type=float, default=None, help="SaRA trainable_fraction (default: the preset's)"
    )
    selection.add_argument("--sara-threshold", type=float, default=None, help=threshold_help)


@dataclass
class RunSetup:
    """A benchmark run's resolved flags: the preset, device and threads, the spec its measuring code receives (plain
    data, so it can go to a forked child), and the machine info recorded with the results."""

    preset: ModelPreset
    device: torch.device
    threads: int
    selection: dict[str, float]
    spec: dict[str, Any]
    machine: dict[str, Any]


def setup_run(args: argparse.Namespace, **spec_fields: Any) -> RunSetup:
    """Resolve the common and selection flags of ``args``; ``spec_fields`` are the script's own spec entries."""
    preset = PRESETS[args.preset]
    model_class(preset.family)  # import it once here rather than in every child
    resolved = resolve_device(args.device, args.threads)
    selection = sara_selection(args, preset)
    spec = {
        "preset": preset.name,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "threads": resolved.threads,
        "device": str(resolved.device),
        "sara_selection": selection,
        **spec_fields,
    }
    machine = machine_info(resolved.device, resolved.threads)
    return RunSetup(preset, resolved.device, resolved.threads, selection, spec, machine)


def sara_selection(args: argparse.Namespace, preset: ModelPreset) -> dict[str, float]:
    """SaRAConfig selection keywords: ``--sara-threshold``, else ``--sara-fraction`` or the preset's fraction."""
    if args.sara_threshold is not None:
        return {"threshold": args.sara_threshold}
    return {"trainable_fraction": args.sara_fraction or preset.sara_fraction}
