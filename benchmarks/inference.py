"""Inference cost of a SaRA adapter: base forward vs SaRA unmerged vs SaRA merged, and the time to merge / unmerge.

Builds the preset's seeded random-init model and a SaRA adapter with random (non-zero) values on a copy, then times
interleaved rounds of: the plain model, the unmerged forward (no grad: the effective weight built per call), merge,
the merged forward (the plain model's cost plus the layers' dispatch), unmerge, and the *effective-weight floor*: the
plain model whose adapted layers only build their effective weight per call (one ``torch.index_add``) and run their
op, with no adapter machinery, the least an unmerged forward that keeps no weight copy can cost. A slow spell of a
shared machine hits every variant alike. Also checks that the merged output equals the unmerged one within tolerance and
that unmerging restores every base weight bitwise, and counts the tensor bytes each model keeps after three no-grad
forwards beyond the plain model's, against LoRA r=8 on the same layers (as a multiple of the adapted weights' bytes).
Prints a table and writes
``benchmarks/results/inference-<preset>-bs<B>-<device>.json``.

    python -m benchmarks.inference --preset small
    python -m benchmarks.inference --preset sd15 --device cuda --dtype bfloat16 --repeats 20
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/inference.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

import peft_sara
from benchmarks.flags import add_common_arguments, add_selection_arguments, child_setup, setup_run
from benchmarks.measure import DTYPES, median, time_call
from benchmarks.report import cuda_device_name, finish_machine_info, format_table, results_path, write_results
from benchmarks.workload import make_batch, model_output, preset_summary
from peft_sara.presets import build_model
from peft_sara.training import sara_layers
from peft_sara.tuner.functional import SparseEntries, effective_weight

# Merged and unmerged runs compute with the same effective weight entries, so they should agree to rounding.
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 1e-3), torch.float16: (1e-3, 1e-4)}


def held_tensor_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages a model holds: parameters, buffers and tensors kept in its modules' attributes
    (also inside tuples, lists and dicts, where caches live)."""
    storages: dict[int, int] = {}

    def visit(value: Any, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif depth < 3 and isinstance(value, (tuple, list)):
            for item in value:
                visit(item, depth + 1)
        elif depth < 3 and isinstance(value, dict):
            for item in value.values():
                visit(item, depth + 1)

    for module in model.modules():
        for attributes in (module._parameters, module._buffers, vars(module)):
            visit(attributes)
    return sum(storages.values())


def kept_memory(model: nn.Module, adapted: nn.Module, forward) -> dict[str, float]:
    """What ``adapted`` keeps after three no-grad forwards beyond the plain ``model``, absolute and as a multiple of
    the bytes of the weights its adapter layers wrap."""
    for _ in range(3):
        forward(adapted)
    wrapped = sum(layer.get_base_layer().weight.nbytes for layer in adapted.modules() if hasattr(layer, "base_layer"))
    kept = held_tensor_bytes(adapted) - held_tensor_bytes(model)
    tensors = dict(adapted.named_parameters()) | dict(adapted.named_buffers())
    adapter = sum(t.untyped_storage().nbytes() for name, t in tensors.items() if "sara_" in name or "lora_" in name)
    return {
        "kept_bytes": kept,
        "adapter_bytes": adapter,
        "other_kept_bytes": kept - adapter,  # caches and copies: what inference keeps besides the adapter itself
        "adapted_weight_bytes": wrapped,
        "kept_vs_adapted_weights": kept / wrapped,
        "other_kept_vs_adapted_weights": (kept - adapter) / wrapped,
    }


def effective_weight_floor(plain_model: nn.Module, adapted: nn.Module) -> nn.Module:
    """A copy of ``plain_model`` whose layers that ``adapted`` adapts build their effective weight per call from the
    adapter's entries (:func:`peft_sara.tuner.functional.effective_weight`) and run their own op on it, and do nothing
    else: no adapter layer, no checks, no dispatch."""
    floor_model = copy.deepcopy(plain_model)
    modules = dict(floor_model.named_modules())
    for name, layer in sara_layers(adapted.get_base_model()):
        module = modules[name]
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            raise TypeError(f"The effective-weight floor covers Linear and Conv layers, not {type(module).__name__}.")
        entries = [
            entry._replace(values=entry.values.detach()) for entry in layer.sparse_entries(layer.active_adapters)
        ]
        module.forward = functools.partial(_floor_forward, module, entries)
    return floor_model


def _floor_forward(module: nn.Module, entries: list[SparseEntries], x: torch.Tensor) -> torch.Tensor:
    weight = effective_weight(module.weight, entries)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    return module._conv_forward(x, weight, module.bias)


def run_inference(spec: dict[str, Any]) -> dict[str, Any]:
    """All measurements of one run (on the current process)."""
    preset, device = child_setup(spec)
    dtype = DTYPES[spec["dtype"]]
    model = build_model(preset, spec["seed"], device, dtype).eval()
    batch = make_batch(preset, spec["batch_size"], spec["seed"], device, dtype)
    repeats, warmup = spec["repeats"], spec["warmup"]

    def forward(target) -> torch.Tensor:
        with torch.no_grad():
            return model_output(target, batch.inputs)

    base_model = copy.deepcopy(model)  # the plain model, timed side by side with the adapter
    base_output = forward(base_model)
    model_parameters = sum(param.numel() for param in model.parameters())

    config = peft_sara.SaRAConfig(**spec["sara_selection"], init_weights=False)
    peft_model = get_peft_model(model, config).eval()
    layers = [layer for _, layer in sara_layers(peft_model.get_base_model())]
    targets = [name for name, _ in sara_layers(peft_model.get_base_model())]
    lora_model = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=8, lora_alpha=8, target_modules=targets)).eval()
    memory = {
        "sara_unmerged": kept_memory(base_model, peft_model, forward),
        "lora_r8": kept_memory(base_model, lora_model, forward),
    }
    del lora_model
    base_weights = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    unmerged_output = forward(peft_model)
    floor_model = effective_weight_floor(base_model, peft_model)
    floor_output = forward(floor_model)
    peft_model.merge_adapter()
    merged_output = forward(peft_model)
    peft_model.unmerge_adapter()

    # Interleaved rounds (base, unmerged, merge, merged, unmerge), so that a slow spell of a shared machine hits every
    # variant alike; the first `warmup` rounds are not timed.
    calls = {
        "base_forward": lambda: forward(base_model),
        "sara_unmerged_forward": lambda: forward(peft_model),
        "merge": peft_model.merge_adapter,
        "sara_merged_forward": lambda: forward(peft_model),
        "unmerge": peft_model.unmerge_adapter,
        "effective_weight_floor": lambda: forward(floor_model),
    }
    all_times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(warmup + repeats):
        for name in calls:
            elapsed = time_call(calls[name], device, repeats=1, warmup=0)
            if round_index >= warmup:
                all_times[name] += elapsed
    base_times, unmerged_times = all_times["base_forward"], all_times["sara_unmerged_forward"]
    merge_times, merged_times, unmerge_times = (
        all_times["merge"],
        all_times["sara_merged_forward"],
        all_times["unmerge"],
    )

    restored_bitwise = all(
        torch.equal(layer.get_base_layer().weight, saved) for layer, saved in zip(layers, base_weights)
    )
    with peft_model.disable_adapter():
        output_after_unmerge = forward(peft_model)

    rtol, atol = TOLERANCES[dtype]
    difference = (merged_output.float() - unmerged_output.float()).abs()
    base_time = median(base_times)
    return {
        "sara_trainable": sum(layer.num_trainable("default") for layer in layers),
        "sara_layers": len(layers),
        "model_parameters": model_parameters,
        "times_s": {
            "base_forward": base_time,
            "sara_unmerged_forward": median(unmerged_times),
            "sara_merged_forward": median(merged_times),
            "merge": median(merge_times),
            "unmerge": median(unmerge_times),
            "effective_weight_floor": median(all_times["effective_weight_floor"]),
        },
        "times_s_all": {
            "base_forward": base_times,
            "sara_unmerged_forward": unmerged_times,
            "sara_merged_forward": merged_times,
            "merge": merge_times,
            "unmerge": unmerge_times,
            "effective_weight_floor": all_times["effective_weight_floor"],
        },
        "checks": {
            "merged_matches_unmerged": bool(torch.allclose(merged_output, unmerged_output, rtol=rtol, atol=atol)),
            "merged_equals_unmerged_bitwise": bool(torch.equal(merged_output, unmerged_output)),
            "floor_matches_unmerged": bool(torch.allclose(floor_output, unmerged_output, rtol=rtol, atol=atol)),
            "merged_vs_unmerged_max_abs_diff": float(difference.max()),
            "tolerance": {"rtol": rtol, "atol": atol},
            "unmerge_restores_base_bitwise": bool(restored_bitwise),
            "base_output_restored_bitwise": bool(torch.equal(output_after_unmerge, base_output)),
            "adapter_changes_output": not bool(torch.allclose(unmerged_output, base_output, rtol=rtol, atol=atol)),
        },
        "kept_after_generation": memory,
        "device_name": cuda_device_name(device),
    }


TABLE_COLUMNS = [("what", "what", ""), ("ms", "median ms", ".2f"), ("vs_base", "x base forward", ".3f")]


def table_rows(times: dict[str, float]) -> list[dict[str, Any]]:
    base = times["base_forward"]
    return [{"what": what, "ms": seconds * 1e3, "vs_base": seconds / base} for what, seconds in times.items()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "inference")
    parser.add_argument(
        "--repeats",
        type=int,
        default=10,
        help="timed rounds (each: base, unmerged, merge, merged, unmerge; medians reported)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    add_selection_arguments(parser, "SaRA threshold instead of a fraction")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    run = setup_run(args, repeats=args.repeats, warmup=args.warmup, dtype=args.dtype)
    preset, selection = run.preset, run.selection
    print(
        f"preset {preset.name}: {preset.description}; batch {args.batch_size}; {args.dtype}; device "
        f"{run.device}; {run.threads} threads; SaRA {selection}",
        flush=True,
    )

    result = run_inference(run.spec)
    finish_machine_info(run.machine, result["device_name"])
    table = format_table(table_rows(result["times_s"]), TABLE_COLUMNS)
    print(f"\nSaRA: {result['sara_trainable'] / 1e6:.3f}M entries in {result['sara_layers']} layers\n")
    print(table)
    print()
    for name, kept in result["kept_after_generation"].items():
        print(
            f"  kept after 3 no-grad forwards beyond the plain model, {name}: {kept['kept_bytes'] / 2**20:.2f} MiB = "
            f"{kept['kept_vs_adapted_weights']:.3f}x the adapted weights (the adapter's own tensors "
            f"{kept['adapter_bytes'] / 2**20:.2f} MiB, anything else {kept['other_kept_vs_adapted_weights']:.3f}x)"
        )
    for name, value in result["checks"].items():
        print(f"  {name}: {value}")

    out = results_path(args.out, "inference", preset, args.batch_size, run.device)
    payload = {
        "benchmark": "inference",
        "preset": preset_summary(preset),
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "sara_selection": selection,
        "machine": run.machine,
        **result,
        "table": table,
    }
    write_results(out, payload)
    return payload


if __name__ == "__main__":
    main()
