"""Reproduce every number and figure of the quality benchmarks: ``python -m benchmarks.quality.run_all``.

1. pretrain the two base models (digits, photo patches) in parallel, unless the demo's cache holds them;
2. the zeroing test on both (in parallel);
3. the trade-off comparison on digits (all methods, 3 budgets, 3 learning rates, 3 seeds, samples scored);
4. the ablations and the rank of the update on digits;
5. the trade-off comparison on photo patches (SaRA, LoRA, full fine-tuning; 2 seeds).

Writes everything into ``benchmarks/results/quality/`` and the tables into ``summary.md`` there, with the wall and
CPU time of each step. Sized for about 25 minutes on 2 CPU cores (``--workers 2``, one torch thread per process).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import torch

from benchmarks.quality import ablation, ineffective, tradeoff
from benchmarks.quality.common import RESULTS_DIR, QualitySettings, load_base_and_judge

DATASETS = ("digits", "photo-patches")
INEFFECTIVE_KEYS = ["heldout_loss_change_pct", "sample_accuracy", "sample_frechet", "output_relative_change"]


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _settings(dataset: str, tiny: bool) -> QualitySettings:
    return QualitySettings.tiny_settings(dataset) if tiny else QualitySettings.for_dataset(dataset)


def _warm(item: tuple[str, bool, Path | None]) -> str:
    dataset, tiny, cache_root = item
    torch.set_num_threads(1)
    load_base_and_judge(_settings(dataset, tiny), cache_root)
    return dataset


def _ineffective(item: tuple[str, bool, Path, Path | None]) -> dict[str, Any]:
    dataset, tiny, output_dir, cache_root = item
    torch.set_num_threads(1)
    return ineffective.run(_settings(dataset, tiny), output_dir, cache_root)


def in_parallel(function, items: list, workers: int) -> list:
    """``function`` on each item, in ``workers`` spawned processes (in this one when ``workers`` is 1)."""
    if workers <= 1:
        return [function(item) for item in items]
    with multiprocessing.get_context("spawn").Pool(min(workers, len(items))) as pool:
        results = pool.map(function, items)
        pool.close()
        pool.join()
    return results


def main(argv: list[str] | None = None) -> int:
    """Run every quality benchmark and write ``summary.md``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2, one torch thread each)")
    parser.add_argument("--tiny", action="store_true", help="smoke-test settings (a minute or two)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help=f"default: {RESULTS_DIR}")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the demo's pretrained-model cache")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    output_dir, datasets = args.output_dir, args.datasets
    timings: dict[str, dict[str, float]] = {}
    sections: list[str] = []
    started_wall, started_cpu = time.perf_counter(), cpu_seconds()

    def step(name: str, function, *function_args):
        wall, cpu = time.perf_counter(), cpu_seconds()
        print(f"\n=== {name} ===", flush=True)
        result = function(*function_args)
        timings[name] = {"wall_seconds": time.perf_counter() - wall, "cpu_seconds": cpu_seconds() - cpu}
        return result

    warm_items = [(dataset, args.tiny, args.cache_dir) for dataset in datasets]
    step("pretrain the base models (skipped when cached)", in_parallel, _warm, warm_items, args.workers)
    zeroing_items = [(dataset, args.tiny, output_dir, args.cache_dir) for dataset in datasets]
    zeroing = step("ineffective parameters", in_parallel, _ineffective, zeroing_items, args.workers)
    for dataset, payload in zip(datasets, zeroing):
        keys = [key for key in INEFFECTIVE_KEYS if key in payload["fractions"][0]]
        sections.append(
            f"## Ineffective parameters ({dataset})\n\n" + ineffective.summary_markdown(payload, keys, dataset)
        )
    for dataset in datasets:
        settings = _settings(dataset, args.tiny)
        run_args = (settings, args.workers, output_dir, args.cache_dir)
        payload = step(f"trade-off ({dataset})", tradeoff.run, *run_args)
        sections.append(f"## Trade-off ({dataset})\n\n" + tradeoff.summary_markdown(payload["summary"], settings))
        if dataset == "digits":
            payload = step(f"ablations ({dataset})", ablation.run, *run_args)
            sections.append(f"## Ablations and rank ({dataset})\n\n" + ablation.summary_markdown(payload["summary"]))
    timings["total"] = {"wall_seconds": time.perf_counter() - started_wall, "cpu_seconds": cpu_seconds() - started_cpu}
    lines = ["| step | wall (s) | CPU (s) |", "|---|---|---|"]
    lines += [f"| {name} | {item['wall_seconds']:.0f} | {item['cpu_seconds']:.0f} |" for name, item in timings.items()]
    sections.append(f"## Time ({args.workers} worker processes)\n\n" + "\n".join(lines))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.md").write_text("# Quality benchmarks\n\n" + "\n\n".join(sections) + "\n")
    (output_dir / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\nwrote {output_dir}/summary.md and the JSON / PNG files beside it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
