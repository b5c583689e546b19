"""Hotswap vs fresh load: time to switch a compiled model from adapter A to adapter B (different size and targets).

Fresh: a new SaRA model of the base with B (``PeftModel.from_pretrained``), compiled, first forward (the compile).
Hotswap: a model with ``enable_sara_hotswap``'s slot, compiled and run on A; ``hotswap_adapter`` to B, first forward
(no recompile: ``error_on_recompile`` is on). Wall time, one run each (a compile cannot be repeated warm).

    python -m benchmarks.hotswap                      # small preset, aot_eager
    python -m benchmarks.hotswap --backend inductor
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/hotswap.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch._dynamo
from peft import PeftModel, get_peft_model

import peft_sara
from benchmarks.report import RESULTS_DIR, format_table, machine_info, write_results
from benchmarks.workload import make_batch
from peft_sara.presets import PRESETS, build_model

ADAPTERS = {  # name: (target_modules, trainable_fraction)
    "A": (["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"], 0.05),
    "B": (["to_q", "to_v", "proj_in", "proj_out"], 0.02),
}
SLOT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out"]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend (aot_eager, inductor)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "hotswap-cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset, device = PRESETS[args.preset], torch.device("cpu")
    inputs = make_batch(preset, 1, 0, device).inputs

    def base():
        return build_model(preset, 0, device).eval()

    def forward(model):
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, (targets, fraction) in ADAPTERS.items():
            torch.manual_seed(1)
            config = peft_sara.SaRAConfig(target_modules=targets, trainable_fraction=fraction, init_weights=False)
            get_peft_model(base(), config).save_pretrained(Path(tmp) / name)
            paths[name] = Path(tmp) / name

        # Fresh: load B into a new model, compile, first forward.
        torch._dynamo.reset()
        model = base()
        fresh, load_s = timed(lambda: PeftModel.from_pretrained(model, paths["B"]).eval().base_model.model)
        compiled = torch.compile(fresh, fullgraph=True, backend=args.backend)
        expected, compile_s = timed(lambda: forward(compiled))
        _, steady_s = timed(lambda: forward(compiled))
        rows.append({"path": "fresh load + recompile", "load_s": load_s, "first_s": compile_s, "steady_s": steady_s})

        # Hotswap: slot, compile once on A, swap to B.
        torch._dynamo.reset()
        model = base()
        peft_sara.enable_sara_hotswap(model, max_fraction=0.05, target_modules=SLOT_TARGETS)
        peft_sara.hotswap_adapter(model, paths["A"])
        compiled = torch.compile(model, fullgraph=True, backend=args.backend)
        forward(compiled)
        with torch._dynamo.config.patch(error_on_recompile=True):
            _, swap_s = timed(lambda: peft_sara.hotswap_adapter(model, paths["B"]))
            got, first_s = timed(lambda: forward(compiled))
            _, steady_swap_s = timed(lambda: forward(compiled))
        rows.append({"path": "hotswap (no recompile)", "load_s": swap_s, "first_s": first_s, "steady_s": steady_swap_s})
        max_diff = float((got - expected).abs().max())

    for row in rows:
        row["switch_s"] = row["load_s"] + row["first_s"]
    speedup = rows[0]["switch_s"] / rows[1]["switch_s"]
    columns = [
        ("path", "path", ""),
        ("load_s", "load / swap s", ".3f"),
        ("first_s", "first forward s", ".3f"),
        ("switch_s", "switch total s", ".3f"),
        ("steady_s", "steady forward s", ".3f"),
    ]
    print(f"preset {preset.name}, backend {args.backend}, {args.threads} threads; A -> B\n")
    print(format_table(rows, columns))
    print(f"\nswitch speed-up {speedup:.1f}x; max |hotswapped - fresh| = {max_diff:.2e}")
    payload = {
        "benchmark": "hotswap",
        "preset": preset.name,
        "backend": args.backend,
        "adapters": {name: {"target_modules": t, "trainable_fraction": f} for name, (t, f) in ADAPTERS.items()},
        "slot": {"max_fraction": 0.05, "target_modules": SLOT_TARGETS},
        "rows": rows,
        "switch_speedup": speedup,
        "max_abs_diff_vs_fresh": max_diff,
        "machine": machine_info(device, args.threads),
    }
    write_results(args.out, payload)


if __name__ == "__main__":
    main()
