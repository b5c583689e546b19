"""What users wait for around an adapter at real size: SaRA vs PEFT LoRA at about the same parameter count.

One process per dtype, both methods alternating (SaRA first in even rounds, LoRA first in odd ones), median of
``--repeats`` rounds, on the same base weights (every fresh model shares the base's tensors, so building one costs
nothing). Operations:

- ``get_peft_model``: SaRA's selection (``trainable_fraction``) vs LoRA's initialisation, on the default UNet targets;
- ``save``: ``PeftModel.save_pretrained`` of that adapter (its values made non-zero first);
- ``from_pretrained``: ``PeftModel.from_pretrained`` of the saved adapter into a fresh base;
- ``fuse`` / ``unfuse``: ``merge_adapter()`` / ``unmerge_adapter()`` of the loaded adapter;
- ``load_pipeline``: ``peft_sara.load_sara_adapter(pipe, folder)`` vs diffusers' ``pipe.load_lora_weights`` on a
  ``StableDiffusionPipeline`` whose UNet has the preset's shapes (tiny text encoder and VAE: only the UNet is adapted);
- ``hotswap``: ``peft_sara.hotswap_adapter`` into an ``enable_sara_hotswap`` slot vs PEFT's
  ``peft.utils.hotswap.hotswap_adapter`` on a loaded LoRA ``PeftModel`` (each swaps in the saved adapter again).

    python -m benchmarks.load --preset sd15 --dtype float32 --threads 1
    python -m benchmarks.load --preset sd15 --dtype bfloat16 --threads 1
    python -m benchmarks.load --preset small --repeats 1          # the smoke test's run

Writes ``benchmarks/results/load-<preset>-<dtype>-cpu.json``.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/load.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks.measure import DTYPES, SHORT_DTYPE_NAMES, median, set_threads
from benchmarks.report import RESULTS_DIR, finish_machine_info, format_table, machine_info, write_results
from benchmarks.workload import preset_summary
from peft_sara.presets import PRESETS, ModelPreset, build_model, model_class

METHODS = ("sara", "lora")
OPERATIONS = ("get_peft_model", "save", "from_pretrained", "fuse", "unfuse", "load_pipeline", "hotswap")
# What the targets say the load must cost, as SaRA / LoRA (None: no target).
TARGET_RATIOS = {"from_pretrained": 1.2, "load_pipeline": 1.2, "hotswap": 1.2}


class FreshBases:
    """Models of the preset that share one set of seeded base weights: each :meth:`new` is a new module tree (no
    adapter, nothing merged) over the same tensors, built on the meta device and assigned in microseconds."""

    def __init__(self, preset: ModelPreset, seed: int, dtype: torch.dtype) -> None:
        self.preset = preset
        model = build_model(preset, seed, "cpu", dtype).eval().requires_grad_(False)
        self.state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
        self.num_parameters = sum(tensor.numel() for tensor in self.state.values())

    def new(self) -> nn.Module:
        with torch.device("meta"):
            model = model_class(self.preset.family)(**self.preset.config)
        model.load_state_dict(self.state, assign=True)
        return model.eval().requires_grad_(False)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def adapter_config(method: str, targets: list[str], fraction: float, rank: int):
    if method == "sara":
        import peft_sara

        return peft_sara.SaRAConfig(target_modules=targets, trainable_fraction=fraction)
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)


@torch.no_grad()
def randomize_adapter(model: nn.Module, seed: int) -> int:
    """Give every trainable tensor small random values (a zero LoRA B or SaRA delta would make fusing trivial);
    returns the number of trainable parameters."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for param in model.parameters():
        if param.requires_grad:
            param.copy_(torch.randn(param.shape, generator=generator) * 1e-3)
            count += param.numel()
    return count


def build_pipeline(unet: nn.Module):
    """A StableDiffusionPipeline around ``unet`` with a tiny CLIP text encoder and VAE (built from configs: nothing is
    downloaded; the adapters only touch the UNet)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=100)
    )
    vae = AutoencoderKL(
        block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_diffusers_lora(peft_folder: Path, folder: Path) -> Path:
    """The PEFT LoRA folder as a diffusers LoRA file (``pytorch_lora_weights.safetensors``, ``unet.`` keys)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    state = load_file(peft_folder / "adapter_model.safetensors")
    layers = {key.removeprefix("base_model.model."): value for key, value in state.items()}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder


class Round:
    """One round of every operation for one method; appends each operation's seconds to ``times``."""

    def __init__(self, args: argparse.Namespace, bases: FreshBases, targets: list[str], work: Path) -> None:
        self.args, self.bases, self.targets, self.work = args, bases, targets, work
        self.folders: dict[str, Path] = {}
        self.counts: dict[str, int] = {}

    def run(self, method: str, number: int, times: dict[str, dict[str, list[float]]]) -> None:
        from peft import PeftModel, get_peft_model

        ops, record = self.args.ops, times[method]
        config = adapter_config(method, self.targets, self.args.sara_fraction, self.args.lora_rank)
        model, seconds = timed(lambda: get_peft_model(self.bases.new(), config))
        record["get_peft_model"].append(seconds)
        self.counts[method] = randomize_adapter(model, self.args.seed + number)
        folder = self.work / f"{method}-{number}"
        _, seconds = timed(lambda: model.save_pretrained(folder))
        record["save"].append(seconds)
        self.folders[method] = folder
        del model
        gc.collect()

        if "from_pretrained" in ops or "fuse" in ops or "unfuse" in ops:
            model, seconds = timed(lambda: PeftModel.from_pretrained(self.bases.new(), folder))
            record.setdefault("from_pretrained", []).append(seconds)
            if "fuse" in ops or "unfuse" in ops:
                _, seconds = timed(model.merge_adapter)
                record.setdefault("fuse", []).append(seconds)
                _, seconds = timed(model.unmerge_adapter)
                record.setdefault("unfuse", []).append(seconds)
            del model
            gc.collect()

        if "load_pipeline" in ops:
            pipe = build_pipeline(self.bases.new())
            if method == "sara":
                import peft_sara

                _, seconds = timed(lambda: peft_sara.load_sara_adapter(pipe, folder, adapter_name="bench"))
            else:
                lora_file = write_diffusers_lora(folder, self.work / f"{method}-{number}-diffusers")
                _, seconds = timed(lambda: pipe.load_lora_weights(lora_file, adapter_name="bench"))
            record["load_pipeline"].append(seconds)
            del pipe
            gc.collect()

        if "hotswap" in ops:
            if method == "sara":
                import peft_sara

                model = self.bases.new()
                peft_sara.enable_sara_hotswap(model, max_fraction=self.args.sara_fraction, target_modules=self.targets)
                _, seconds = timed(lambda: peft_sara.hotswap_adapter(model, folder))
            else:
                from peft.utils.hotswap import hotswap_adapter

                model = PeftModel.from_pretrained(self.bases.new(), folder)
                _, seconds = timed(lambda: hotswap_adapter(model, str(folder), adapter_name="default"))
            record["hotswap"].append(seconds)
            del model
            gc.collect()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--dtype", choices=[*DTYPES, *SHORT_DTYPE_NAMES], default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per method (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sara-fraction", type=float, default=0.02)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--ops", default=",".join(OPERATIONS), help=f"comma-separated subset of {','.join(OPERATIONS)}")
    parser.add_argument("--device", default="cpu", help="cpu only (the loads this measures happen on CPU)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(args.ops) - set(OPERATIONS))
    if unknown:
        parser.error(f"unknown --ops {unknown}; choose from {list(OPERATIONS)}")
    if args.device != "cpu":
        parser.error("benchmarks.load measures CPU loads only (--device cpu)")
    dtype_name = SHORT_DTYPE_NAMES.get(args.dtype, args.dtype)
    dtype = DTYPES[dtype_name]
    set_threads(args.threads)
    preset = PRESETS[args.preset]
    machine = machine_info(torch.device("cpu"), args.threads)

    import diffusers
    import transformers

    from peft_sara.tuner.model import default_target_modules

    diffusers.utils.logging.set_verbosity_error()  # "no LoRA keys for the text encoder": it has none, by design
    transformers.utils.logging.set_verbosity_error()

    bases, build_s = timed(lambda: FreshBases(preset, args.seed, dtype))
    targets = default_target_modules(bases.new())
    times = {method: {op: [] for op in ("get_peft_model", "save", *args.ops)} for method in METHODS}  # (+ what ran)
    work = Path(tempfile.mkdtemp(prefix="load-benchmark-"))
    try:
        runner = Round(args, bases, targets, work)
        for number in range(args.repeats):
            for method in METHODS if number % 2 == 0 else reversed(METHODS):
                runner.run(method, number, times)
                print(f"round {number} {method}: " + ", ".join(f"{op} {v[-1]:.2f}s" for op, v in times[method].items()))
            for folder in work.iterdir():
                shutil.rmtree(folder)
        counts = runner.counts
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for op in OPERATIONS:
        if op not in times["sara"]:
            continue
        sara_s, lora_s = median(times["sara"][op]), median(times["lora"][op])
        ratio = sara_s / lora_s if sara_s is not None and lora_s else None
        rows.append(
            {
                "operation": op,
                "sara_s": sara_s,
                "lora_s": lora_s,
                "ratio": ratio,
                "target_ratio": TARGET_RATIOS.get(op),
                "sara_runs_s": times["sara"][op],
                "lora_runs_s": times["lora"][op],
            }
        )
    columns = [
        ("operation", "operation", ""),
        ("sara_s", "SaRA s", ".3f"),
        ("lora_s", "LoRA s", ".3f"),
        ("ratio", "SaRA/LoRA", ".2f"),
        ("target_ratio", "target", ".1f"),
    ]
    print(
        f"\npreset {preset.name} ({bases.num_parameters / 1e6:.1f}M parameters), {dtype_name}, {args.threads} threads, "
        f"median of {args.repeats}; SaRA trainable_fraction={args.sara_fraction} ({counts['sara']:,} entries) vs "
        f"LoRA r={args.lora_rank} ({counts['lora']:,} parameters) on {len(targets)} default target names\n"
    )
    print(format_table(rows, columns))
    finish_machine_info(machine)
    payload = {
        "benchmark": "load",
        "preset": preset_summary(preset),
        "dtype": dtype_name,
        "repeats": args.repeats,
        "base_build_s": build_s,
        "base_parameters": bases.num_parameters,
        "target_modules": targets,
        "sara": {"trainable_fraction": args.sara_fraction, "trainable_parameters": counts["sara"]},
        "lora": {"r": args.lora_rank, "trainable_parameters": counts["lora"]},
        "rows": rows,
        "machine": machine,
    }
    write_results(args.out or RESULTS_DIR / f"load-{preset.name}-{dtype_name}-cpu.json", payload)


if __name__ == "__main__":
    main()
