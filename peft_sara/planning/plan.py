"""Plan the peak memory of a training step without running it for real: the model, adapter, optimizer and one step
run on fake tensors under torch's ``MemTracker``; what cannot run fake (quantized base weights, 8-bit AdamW) is
computed (:mod:`peft_sara.planning.analytic`). :func:`measure_training_memory` runs the same step for real, to check
a plan against the CPU allocator.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .analytic import OPTIMIZERS, QUANTIZATIONS, adamw8bit_state_bytes, quantized_linear_weights, quantized_weight_bytes
from .build import MethodSpec, apply_method, build_model, sara_on_fake_weights, trainable_parameters
from .inputs import TrainingBatch, training_batch
from .presets import ModelSpec
from .tracker import StepPeak, initialize_optimizer_state, measured_step_peak, tracked_step_peak

Progress = Callable[[str], None] | None

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The plan's breakdown, in the order it is printed; the parts add up to the peak.
PARTS = ("weights", "adapter", "gradients", "optimizer", "activations", "temporaries", "inputs")


@dataclass(frozen=True)
class PlanRequest:
    """One training configuration: the model, how it is trained, the batch, and where memory can be saved.

    ``dtype`` is the base model's dtype (adapters stay float32, PEFT's default; full fine-tuning keeps parameters,
    gradients and AdamW moments in it). ``base_quantization`` (``"4bit"`` / ``"8bit"``) stores the base's Linear
    weights with bitsandbytes; ``optimizer`` is ``"adamw"`` (PyTorch, ``foreach``) or ``"adamw8bit"``
    (bitsandbytes).
    """

    model: ModelSpec
    method: MethodSpec
    resolution: int
    batch_size: int = 1
    dtype: str = "bfloat16"
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    base_quantization: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}.")
        if self.base_quantization is not None and self.base_quantization not in QUANTIZATIONS:
            raise ValueError(f"Unknown base quantization {self.base_quantization!r}: use one of {QUANTIZATIONS}.")
        if self.base_quantization is not None and self.method.method == "full":
            raise ValueError("Full fine-tuning cannot train a quantized base: plan SaRA or LoRA on it instead.")
        if self.batch_size < 1:
            raise ValueError(f"The batch size must be >= 1, got {self.batch_size}.")

    def describe(self) -> dict[str, object]:
        """The request as plain values (for JSON and tables)."""
        method = {key: value for key, value in asdict(self.method).items() if value is not None}
        if self.method.method != "lora":
            method.pop("rank")
        return {
            "model": self.model.name,
            "model_class": self.model.class_name,
            **method,
            "resolution": self.resolution,
            "batch_size": self.batch_size,
            "dtype": self.dtype,
            "gradient_checkpointing": self.gradient_checkpointing,
            "optimizer": self.optimizer,
            "base_quantization": self.base_quantization,
        }


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted peak bytes of one training step and what is live at that moment (``PARTS``, adding up to it)."""

    request: PlanRequest
    peak_bytes: int
    breakdown: dict[str, int]
    parameters: int
    trainable_parameters: int
    assumptions: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """The plan as JSON-ready values: ``peak_bytes``, ``breakdown`` (bytes per part) and the request."""
        return {
            **self.request.describe(),
            "peak_bytes": self.peak_bytes,
            "breakdown": dict(self.breakdown),
            "parameters": self.parameters,
            "trainable_parameters": self.trainable_parameters,
            "assumptions": list(self.assumptions),
            "seconds": round(self.seconds, 2),
        }


@dataclass
class _Setup:
    model: nn.Module
    batch: TrainingBatch
    optimizer: torch.optim.Optimizer
    linear_weights: list[tuple[int, int]]


def _training_setup(request: PlanRequest, fake: bool, seed: int = 0, progress: Progress = None) -> _Setup:
    dtype = DTYPES[request.dtype]
    _report(progress, f"building {request.model.name} ({request.model.class_name})")
    denoiser = build_model(request.model, dtype, fake=fake, seed=seed)
    linear_weights = quantized_linear_weights(denoiser)
    if request.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if request.method.method != "full":
        _report(progress, f"adding the {request.method.method} adapter")
    model = apply_method(denoiser, request.method, fake=fake)
    _report(progress, "creating the optimizer state")
    batch = training_batch(request.model, request.resolution, request.batch_size, dtype)
    # foreach: PyTorch's default on CUDA (the for-loop it uses on CPU has smaller temporaries)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4, weight_decay=1e-2, foreach=True)
    initialize_optimizer_state(optimizer)
    return _Setup(model, batch, optimizer, linear_weights)


def _adapter_bytes(model: nn.Module, method: str) -> int:
    """Bytes of the adapter: trainable parameters and SaRA's index buffers (nothing for full fine-tuning)."""
    if method == "full":
        return 0
    trainable = sum(param.numel() * param.element_size() for param in trainable_parameters(model))
    buffers = sum(buffer.numel() * buffer.element_size() for name, buffer in model.named_buffers() if "sara_" in name)
    return trainable + buffers


def _breakdown(peak: StepPeak, adapter_bytes: int) -> dict[str, int]:
    at_peak = peak.at_peak
    return {
        "weights": at_peak.get("parameters", 0) + at_peak.get("buffers", 0) - adapter_bytes,
        "adapter": adapter_bytes,
        **{part: at_peak.get(part, 0) for part in PARTS[2:]},
    }


def _report(progress: Progress, stage: str) -> None:
    if progress is not None:
        progress(stage)


def plan_training_memory(request: PlanRequest, progress: Progress = None) -> MemoryPlan:
    """Predict the peak memory of one training step of ``request`` (see the module docstring for what is traced and
    what is computed). Nothing is allocated. ``progress(stage)``, if given, is called as each stage starts."""
    start = time.perf_counter()
    method = request.method
    sara = sara_on_fake_weights(method.fraction, plain_weights=request.base_quantization is None)
    with FakeTensorMode(), sara if method.method == "sara" else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
        warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
        setup = _training_setup(request, fake=True, progress=progress)
        _report(progress, "tracing one training step (forward, backward, optimizer step)")
        peak = tracked_step_peak(setup.model, setup.batch, setup.optimizer)
        adapter_bytes = _adapter_bytes(setup.model, method.method)
        parameters = sum(param.numel() for param in setup.model.parameters())
        trainable = [param.numel() for param in trainable_parameters(setup.model)]
    breakdown = _breakdown(peak, adapter_bytes)
    assumptions = [
        "text encoders and VAE not in the step (cached embeddings / latents); MSE loss in float32",
        "PyTorch AdamW (foreach) state exists before the step, as in every step after the first",
        "CUDA context, cuBLAS/cuDNN workspaces and allocator fragmentation not included: keep ~1 GB headroom",
    ]
    if method.method == "sara":
        assumptions.append(
            f"SaRA trains {method.fraction:.4g} of each targeted weight (selection needs real weights: the entry "
            "count is modelled, the positions are placeholders)"
        )
    if method.method != "full":
        assumptions.append("adapter parameters in float32 (PEFT's autocast_adapter_dtype default)")
    if request.base_quantization is not None:
        dtype_bytes = DTYPES[request.dtype].itemsize
        dense = sum(numel for _, numel in setup.linear_weights) * dtype_bytes
        quantized = sum(
            quantized_weight_bytes(rows, numel, request.base_quantization) for rows, numel in setup.linear_weights
        )
        dequantized = max(numel for _, numel in setup.linear_weights) * dtype_bytes
        breakdown["weights"] -= dense - quantized
        breakdown["temporaries"] += dequantized
        assumptions.append(
            f"Linear weights in bitsandbytes {request.base_quantization} computed, not traced "
            "(4bit: NF4, fp32 absmax per 64, no double quantization; 8bit: int8 + fp32 row scales), plus one "
            f"dequantized weight ({dequantized / 2**20:.0f} MiB) live during each quantized matmul"
        )
    if request.optimizer == "adamw8bit":
        breakdown["optimizer"] = adamw8bit_state_bytes(trainable)
        assumptions.append("bitsandbytes AdamW8bit state computed (uint8 moments + fp32 absmax per 256)")
    _report(progress, "done")
    return MemoryPlan(
        request,
        sum(breakdown.values()),
        breakdown,
        parameters,
        sum(trainable),
        assumptions,
        time.perf_counter() - start,
    )


@dataclass(frozen=True)
class Measurement:
    """Peak bytes of a real CPU training step: by the allocator (``measured_bytes``) and by the same ``MemTracker``
    the plan uses, on real tensors (``tracked_bytes``)."""

    measured_bytes: int
    tracked_bytes: int
    seconds: float


def measure_training_memory(request: PlanRequest, seed: int = 0) -> Measurement:
    """Run ``request``'s training step for real on the CPU (random weights, SaRA's real selection by fraction) and
    measure its peak. Quantized bases and 8-bit AdamW are not measured here (the plan computes them)."""
    if request.base_quantization is not None or request.optimizer != "adamw":
        raise ValueError("Measurement runs plain bases with PyTorch AdamW; quantization and 8-bit AdamW are computed.")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
        setup = _training_setup(request, fake=False, seed=seed)
    tracked = tracked_step_peak(setup.model, setup.batch, setup.optimizer).peak_bytes
    measured = measured_step_peak(setup.model, setup.batch, setup.optimizer)
    return Measurement(measured, tracked, time.perf_counter() - start)
