"""Training-memory planning: the peak memory of a SaRA, LoRA or full fine-tuning step of a diffusers denoiser,
predicted on fake tensors (no GPU, no weights, no download) and checked against real CPU runs.

    from peft_sara.planning import MethodSpec, PlanRequest, plan_training_memory, resolve_model

    plan = plan_training_memory(PlanRequest(resolve_model("sdxl"), MethodSpec("sara", fraction=0.02), 1024))
    print(plan.peak_bytes, plan.breakdown)

Modules: ``presets`` (model configs, threshold -> fraction), ``inputs`` (a step's batch), ``build`` (model and
method on real or fake tensors), ``tracker`` (the step, traced or measured), ``analytic`` (quantized weights, 8-bit
AdamW), ``plan`` (the API), ``report`` (tables).
"""

from .build import METHODS, MethodSpec
from .plan import DTYPES, PARTS, Measurement, MemoryPlan, PlanRequest, measure_training_memory, plan_training_memory
from .presets import PRESETS, ModelSpec, fraction_for_threshold, resolve_model

__all__ = [
    "DTYPES",
    "METHODS",
    "PARTS",
    "PRESETS",
    "Measurement",
    "MemoryPlan",
    "MethodSpec",
    "ModelSpec",
    "PlanRequest",
    "fraction_for_threshold",
    "measure_training_memory",
    "plan_training_memory",
    "resolve_model",
]
