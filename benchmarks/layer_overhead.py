"""Per-layer fixed cost of SaRA layers: CPU time per layer call for a stack of small Linear layers (where dispatch,
patching and autograd overhead dominate the GEMMs), in training (forward + backward) and in no-grad inference,
against the same stack with LoRA r=8 and without adapters. Process CPU time, so a shared machine disturbs it less.

    python -m benchmarks.layer_overhead
    python -m benchmarks.layer_overhead --compile          # the same through torch.compile (inductor)
    python -m benchmarks.layer_overhead --width 256 --layers 40 --tokens 64 --out /tmp/overhead.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/layer_overhead.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import peft_sara
from benchmarks.report import RESULTS_DIR, format_table


class LinearStack(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build(method: str, width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    model = LinearStack(width, layers)
    targets = [f"layers.{i}" for i in range(layers)]
    if method == "sara":
        return get_peft_model(model, peft_sara.SaRAConfig(target_modules=targets, trainable_fraction=0.07))
    if method == "lora_r8":
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=targets))
    model.requires_grad_(False)
    return model


def cpu_time_per_call(fn: Callable[[], None], calls: int, repeats: int) -> float:
    """Best-of-``repeats`` process CPU seconds per call of ``fn``."""
    for _ in range(max(2, calls // 5)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - start) / calls)
    return best


def measure(method: str, args: argparse.Namespace) -> dict[str, float]:
    model = build(method, args.width, args.layers)
    if args.compile:
        model = torch.compile(model)  # inductor; the warmup calls absorb compilation
    x = torch.randn(args.tokens, args.width, requires_grad=method == "none")

    def train() -> None:
        model(x).sum().backward()

    def infer() -> None:
        with torch.no_grad():
            model(x)

    per_layer = 1e6 / args.layers
    return {
        "train_us_per_layer": cpu_time_per_call(train, args.calls, args.repeats) * per_layer,
        "inference_us_per_layer": cpu_time_per_call(infer, args.calls, args.repeats) * per_layer,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="run every variant through torch.compile (inductor)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = RESULTS_DIR / f"layer_overhead-cpu{'-compiled' if args.compile else ''}.json"
    torch.set_num_threads(1)
    results = {method: measure(method, args) for method in ("none", "lora_r8", "sara")}
    rows = [
        {
            "method": method,
            **values,
            "train_vs_lora": values["train_us_per_layer"] / results["lora_r8"]["train_us_per_layer"],
        }
        for method, values in results.items()
    ]
    columns = [
        ("method", "method", ""),
        ("train_us_per_layer", "train us/layer", ".1f"),
        ("inference_us_per_layer", "inference us/layer", ".1f"),
        ("train_vs_lora", "train / LoRA", ".2f"),
    ]
    print(format_table(rows, columns))
    payload = {"benchmark": "layer_overhead", "settings": vars(args) | {"out": str(args.out)}, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
