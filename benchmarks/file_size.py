"""Adapter file sizes: bytes per stored entry and MB, before (int32 / int64 indices) and after (varint index gaps, see
``peft_sara.tuner.file_format``), with float32 and float16 values, against LoRA; and the time to read and decode a file.

    python -m benchmarks.file_size                       # demo UNet at 5%, SD1.5-shaped UNet at 2% and 6% (~5 min)
    python -m benchmarks.file_size --cases demo          # seconds

Models are random-init (``peft_sara.presets`` presets; the demo's UNet from ``peft_sara.demo.settings``), so the
trainable entries are the smallest |w| of random weights: spread evenly over each weight. A trained model's selection
is clustered (whole rows / channels of small weights), which changes the gaps: more short gaps and a few long ones.
"before" is what the previous format stored for the same adapter (the layers' in-memory indices beside float32 values,
plus the same shape and checksum records). LoRA sizes are computed (4 bytes per float32 parameter) for rank 8 and 32 on
the same target layers, and at SaRA's number of trainable parameters ("LoRA =params").
Writes ``benchmarks/results/file_size.json``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/file_size.py`
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import peft_sara  # noqa: F401  (registers SaRA with PEFT)
from peft_sara import SaRAConfig, sara_layers
from peft_sara.adapter_files import save_model_adapter
from peft_sara.constants import SAFETENSORS_NAME
from peft_sara.presets import PRESETS, build_model
from peft_sara.tuner.file_format import decode_index_gaps, entries_checksum
from peft_sara.tuner.reader import check_checkpoint_file

from .report import format_markdown_table, format_table, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "file_size.json"
CASES = {"demo": [0.05], "sd15": [0.02, 0.06]}
LORA_RANKS = (8, 32)


def demo_unet() -> nn.Module:
    """The demo's class-conditional UNet (``DemoSettings()``), random-init."""
    from diffusers import UNet2DModel

    from peft_sara.demo.settings import DemoSettings

    torch.manual_seed(0)
    return UNet2DModel(**DemoSettings().unet_config)


def lora_parameters(model: nn.Module, rank: int) -> int:
    """Parameters of a LoRA of ``rank`` on the SaRA layers of ``model`` (PEFT's: A in -> r, B r -> out)."""
    total = 0
    for _, layer in sara_layers(model):
        weight_shape = tuple(layer.weight_shape)
        fan_in = math.prod(weight_shape[1:])  # in x kernel for convolutions
        total += rank * (fan_in + weight_shape[0])
    return total


def previous_format_file(model: nn.Module, path: Path) -> None:
    """The same adapter as the previous format stored it: in-memory indices, float32 values, records."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in sara_layers(model):
        indices, values = layer.trainable_entries("default")
        layer_tensors = {
            "sara_indices": indices.contiguous(),
            "sara_values": values.detach().float().contiguous(),
            "sara_weight_shape": torch.tensor(tuple(layer.weight_shape), dtype=torch.int64),
        }
        layer_tensors["sara_checksum"] = entries_checksum(name, layer_tensors)
        tensors.update({f"{name}.{key}": tensor for key, tensor in layer_tensors.items()})
    tensors["base_model.model.sara_format_version"] = torch.tensor([2], dtype=torch.int64)
    tensors["base_model.model.sara_modules_to_save_checksum"] = torch.zeros(32, dtype=torch.uint8)
    save_file(tensors, path)


def timed(fn) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def measure(label: str, model: nn.Module, fraction: float, folder: Path) -> dict[str, Any]:
    """Sizes and read times of one adapter of ``model`` at ``fraction``."""
    (peft_model, selection_s) = timed(lambda: get_peft_model(model, SaRAConfig(trainable_fraction=fraction)))
    entries = sum(layer.trainable_entries("default")[0].numel() for _, layer in sara_layers(peft_model))
    previous = folder / "previous.safetensors"
    previous_format_file(peft_model, previous)
    sizes = {"before": previous.stat().st_size}
    _, save_s = timed(lambda: save_model_adapter(peft_model, folder / "fp32"))
    sizes["after_fp32"] = (folder / "fp32" / SAFETENSORS_NAME).stat().st_size
    peft_model.peft_config["default"].save_dtype = "float16"
    save_model_adapter(peft_model, folder / "fp16")
    sizes["after_fp16"] = (folder / "fp16" / SAFETENSORS_NAME).stat().st_size

    _, read_before_s = timed(lambda: load_file(previous))
    tensors, read_after_s = timed(lambda: load_file(folder / "fp32" / SAFETENSORS_NAME))
    streams = [tensor for key, tensor in tensors.items() if key.endswith("index_gaps")]
    _, decode_s = timed(lambda: [decode_index_gaps(stream) for stream in streams])
    _, checks_s = timed(lambda: check_checkpoint_file(tensors))
    row = {
        "adapter": label,
        "fraction": fraction,
        "entries_M": entries / 1e6,
        "before_MB": sizes["before"] / 1e6,
        "before_B_per_entry": sizes["before"] / entries,
        "after_fp32_MB": sizes["after_fp32"] / 1e6,
        "after_fp32_B_per_entry": sizes["after_fp32"] / entries,
        "after_fp16_MB": sizes["after_fp16"] / 1e6,
        "after_fp16_B_per_entry": sizes["after_fp16"] / entries,
        "ratio_fp32": sizes["after_fp32"] / sizes["before"],
        "lora_same_params_fp32_MB": entries * 4 / 1e6,
        "read_before_s": read_before_s,
        "read_after_s": read_after_s,
        "decode_s": decode_s,
        "checks_with_decode_s": checks_s,
        "save_after_fp32_s": save_s,
        "selection_s": selection_s,
    }
    for rank in LORA_RANKS:
        row[f"lora_r{rank}_fp32_MB"] = lora_parameters(peft_model, rank) * 4 / 1e6
    return row


COLUMNS = [
    ("adapter", "adapter", "s"),
    ("entries_M", "entries (M)", ".3f"),
    ("before_MB", "before MB", ".2f"),
    ("before_B_per_entry", "before B/entry", ".2f"),
    ("after_fp32_MB", "after fp32 MB", ".2f"),
    ("after_fp32_B_per_entry", "after fp32 B/entry", ".2f"),
    ("after_fp16_MB", "after fp16 MB", ".2f"),
    ("after_fp16_B_per_entry", "after fp16 B/entry", ".2f"),
    ("lora_same_params_fp32_MB", "LoRA =params fp32 MB", ".2f"),
    ("lora_r8_fp32_MB", "LoRA r=8 MB", ".1f"),
    ("lora_r32_fp32_MB", "LoRA r=32 MB", ".1f"),
    ("read_before_s", "read before s", ".3f"),
    ("read_after_s", "read after s", ".3f"),
    ("checks_with_decode_s", "checks+decode s", ".3f"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    for case in args.cases:
        for fraction in CASES[case]:
            model = demo_unet() if case == "demo" else build_model(PRESETS[case], 0, torch.device("cpu")).eval()
            with tempfile.TemporaryDirectory(prefix="sara-file-size-") as tmp:
                rows.append(measure(f"{case} {fraction:.0%}", model, fraction, Path(tmp)))
            del model
            print(format_table(rows[-1:], COLUMNS), flush=True)
    print(format_table(rows, COLUMNS))
    print(format_markdown_table(rows, COLUMNS))
    write_json(args.out, {"benchmark": "file_size", "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
