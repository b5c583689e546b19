"""Profile what ``benchmarks.load`` times for SaRA, at a preset's shapes (random weights), 2% of the default targets.

One cProfile per operation, each after a warm-up run of the same operation (imports, allocator):
``save_pretrained`` of a selected adapter (values made non-zero), ``PeftModel.from_pretrained`` of that file into a
fresh base, ``peft_sara.hotswap_adapter`` into an ``enable_sara_hotswap`` slot, and ``peft_sara.load_sara_adapter`` on
a ``StableDiffusionPipeline`` with the preset's UNet. Prints each wall time and pstats' top ``--top`` functions by
cumulative time (and by own time with ``--tottime``).

    python -m benchmarks.profile_load --preset sd15 --dtype float32
    python -m benchmarks.profile_load --preset small --ops from_pretrained,hotswap
"""

from __future__ import annotations

import argparse
import cProfile
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
        if "save" in ops:
            profiled("save_pretrained", lambda: model.save_pretrained(work / "again"), args.top, args.tottime)
        del model
        gc.collect()
        if "from_pretrained" in ops:
            profiled("from_pretrained", lambda: PeftModel.from_pretrained(bases.new(), folder), args.top, args.tottime)
        if "hotswap" in ops:
            model = bases.new()
            peft_sara.enable_sara_hotswap(model, max_fraction=args.fraction, target_modules=targets)
            profiled("hotswap", lambda: peft_sara.hotswap_adapter(model, folder), args.top, args.tottime)
            del model
        if "load_pipeline" in ops:
            pipes = iter([build_pipeline(bases.new()), build_pipeline(bases.new())])
            profiled(
                "load_sara_adapter",
                lambda: peft_sara.load_sara_adapter(next(pipes), folder, adapter_name="bench"),
                args.top,
                args.tottime,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
