"""Profile what ``benchmarks.load`` times for SaRA, at a preset's shapes (random weights), 2% of the default targets.

One cProfile per operation, each after a warm-up run of the same operation (imports, allocator):
``save_pretrained`` of a selected adapter (values made non-zero), ``PeftModel.from_pretrained`` of that file into a
fresh base, ``peft_sara.hotswap_adapter`` into an ``enable_sara_hotswap`` slot, and ``peft_sara.load_sara_adapter`` on
a ``StableDiffusionPipeline`` with the preset's UNet. Prints each wall time and pstats' top ``--top`` functions by
cumulative time (and by own time with ``--tottime``); ``--wall N`` prints instead, without a profiler, the wall time of
the parts of :data:`WALL_PARTS` (each its minimum over N runs).

    python -m benchmarks.profile_load --preset sd15 --dtype float32
    python -m benchmarks.profile_load --preset sd15 --wall 5
    python -m benchmarks.profile_load --preset small --ops from_pretrained,hotswap
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import io
import pstats
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.load import FreshBases, build_pipeline, randomize_adapter
from benchmarks.measure import DTYPES, SHORT_DTYPE_NAMES, set_threads
from peft_sara.presets import PRESETS

OPERATIONS = ("save", "from_pretrained", "hotswap", "load_pipeline")
# --wall: the functions whose wall time is added up (module, attribute, label); a class attribute as "Class.name".
WALL_PARTS = (
    ("peft.peft_model", "set_peft_model_state_dict", "set_peft_model_state_dict (PEFT)"),
    ("peft_sara.tuner.model", "validate_checkpoint", "validate_checkpoint"),
    ("peft_sara.tuner.model", "SaRAModel.inject_adapter", "inject_adapter (with its transaction)"),
    ("torch.nn", "Module.load_state_dict", "load_state_dict"),
    ("peft_sara.tuner.reader", "read_layer", "read_layer (every layer)"),
    ("peft_sara.tuner.reader", "effective_weight_problem", "  effective-weight check"),
    ("peft_sara.tuner.reader", "_decoded_entries", "  index decoding"),
    ("peft_sara.tuner.reader", "entries_checksum", "  checksums"),
    ("peft_sara.tuner.file_format", "encode_entries", "index encoding"),
    ("peft_sara.tuner.file_format", "entries_checksum", "checksums (save)"),
    ("peft_sara.tuner.model", "encode_adapter_state_dict", "encode_adapter_state_dict"),
    ("peft_sara.hotswap", "plan_hotswap", "plan_hotswap (checks)"),
    ("peft_sara.hotswap", "HotswapPlan.apply", "apply (writes)"),
    ("peft_sara.tuner.transaction", "ModelState.capture", "transaction capture"),
    ("peft_sara.tuner.transaction", "ModelState.keep_values", "transaction keep_values"),
    # load_sara_adapter's own steps (the pipeline path)
    ("peft_sara.pipelines", "_read_component_weights", "read the file (safetensors)"),
    ("peft_sara.pipelines", "inject_sara_adapter", "inject_sara_adapter (add_adapter, cast, activate)"),
    ("diffusers.loaders.peft", "PeftAdapterMixin.add_adapter", "  diffusers add_adapter"),
    ("peft.tuners.tuners_utils", "BaseTuner._mark_only_adapters_as_trainable", "  mark_only_adapters_as_trainable"),
    ("peft_sara.injection", "cast_adapter_dtype", "  cast_adapter_dtype"),
    ("peft_sara.injection", "_activate", "  activate"),
    ("peft_sara.tuner.model", "dispatch_sara_layer", "  new layers (dispatch_sara_layer)"),
    ("peft_sara.tuner.model", "SaRAModel._replace_module", "  replace modules"),
    ("peft_sara.tuner.reader", "resize_layers_to_entries", "resize_layers_to_entries"),
    ("peft_sara.pipelines", "set_peft_model_state_dict", "set_peft_model_state_dict (PEFT)"),
)


def add_wall_timers(seconds: dict[str, float]) -> None:
    """Wrap each of :data:`WALL_PARTS` so that its wall time is added to ``seconds[label]``."""
    import importlib

    for module_name, attribute, label in WALL_PARTS:
        owner = importlib.import_module(module_name)
        *classes, name = attribute.split(".")
        for class_name in classes:
            owner = getattr(owner, class_name)
        original = getattr(owner, name)

        def timed(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_label] = seconds.get(_label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)
    import peft_sara.hotswap as hotswap
    import peft_sara.tuner.reader as reader

    hotswap.read_layer = reader.read_layer  # imported by name there


def walled(label: str, fn, runs: int, seconds: dict[str, float]) -> None:
    """The wall-time breakdown of ``fn`` (each part's minimum over ``runs`` runs, after a warm-up)."""
    fn()
    best: dict[str, float] = {}
    for _ in range(runs):
        gc.collect()
        seconds.clear()
        start = time.perf_counter()
        fn()
        seconds["TOTAL"] = time.perf_counter() - start
        for part, value in seconds.items():
            best[part] = min(best.get(part, value), value)
    print(f"== {label} (min of {runs})")
    for part, value in sorted(best.items(), key=lambda item: -item[1]):
        print(f"   {part:45s} {value:.3f}")


def profiled(label: str, fn, top: int, tottime: bool) -> None:
    fn()  # warm-up
    gc.collect()
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    fn()
    profile.disable()
    seconds = time.perf_counter() - start
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    if tottime:
        stats.sort_stats("tottime").print_stats(top)
    print(f"## {label}: {seconds:.2f} s (profiled)\n" + out.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="sd15")
    parser.add_argument("--dtype", choices=[*DTYPES, *SHORT_DTYPE_NAMES], default="float32")
    parser.add_argument("--fraction", type=float, default=0.02)
    parser.add_argument("--ops", default=",".join(OPERATIONS))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--tottime", action="store_true", help="also sort by own time")
    parser.add_argument(
        "--wall", type=int, default=0, help="instead of profiling: the wall-time breakdown, each part's min of N runs"
    )
    args = parser.parse_args(argv)
    set_threads(1)
    dtype = DTYPES[SHORT_DTYPE_NAMES.get(args.dtype, args.dtype)]
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]

    import diffusers
    from peft import PeftModel, get_peft_model

    import peft_sara
    from peft_sara.tuner.model import default_target_modules

    diffusers.utils.logging.set_verbosity_error()
    bases = FreshBases(PRESETS[args.preset], 0, dtype)
    targets = default_target_modules(bases.new())
    work = Path(tempfile.mkdtemp(prefix="profile-load-"))
    try:
        model = get_peft_model(
            bases.new(), peft_sara.SaRAConfig(target_modules=targets, trainable_fraction=args.fraction)
        )
        randomize_adapter(model, 0)
        folder = work / "adapter"
        model.save_pretrained(folder)
        seconds: dict[str, float] = {}
        if args.wall:
            add_wall_timers(seconds)

        def measure(label, fn):
            if args.wall:
                walled(label, fn, args.wall, seconds)
            else:
                profiled(label, fn, args.top, args.tottime)

        if "save" in ops:
            measure("save_pretrained", functools.partial(model.save_pretrained, work / "again"))
        del model
        gc.collect()
        if "from_pretrained" in ops:
            measure("from_pretrained", lambda: PeftModel.from_pretrained(bases.new(), folder))
        if "hotswap" in ops and not args.wall:
            slotted = bases.new()
            peft_sara.enable_sara_hotswap(slotted, max_fraction=args.fraction, target_modules=targets)
            profiled("hotswap", lambda: peft_sara.hotswap_adapter(slotted, folder), args.top, args.tottime)
            del slotted
        elif "hotswap" in ops:

            def swap():  # into a fresh slot each time; the timers see only the swap
                slotted = bases.new()
                peft_sara.enable_sara_hotswap(slotted, max_fraction=args.fraction, target_modules=targets)
                seconds.clear()
                start = time.perf_counter()
                peft_sara.hotswap_adapter(slotted, folder)
                seconds["hotswap_adapter"] = time.perf_counter() - start

            walled(
                "hotswap (TOTAL includes enable_sara_hotswap; the swap is hotswap_adapter)", swap, args.wall, seconds
            )
        if "load_pipeline" in ops:
            pipes = iter([build_pipeline(bases.new()), build_pipeline(bases.new())])
            if args.wall:
                pipes = iter([build_pipeline(bases.new()) for _ in range(args.wall + 1)])
            measure("load_sara_adapter", lambda: peft_sara.load_sara_adapter(next(pipes), folder, adapter_name="bench"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
