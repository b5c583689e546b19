"""What one suite run measures: its parts, shapes, step counts and time shares (``FULL`` on a GPU, ``TINY`` for CI)."""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks import kernels as kernel_benchmark

PARTS = ("sd15", "sdxl", "sd15-compiled", "kernels")
COMPILED = "sara_compiled"  # the name of the compiled SaRA rows in the sd15 tables


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
