"""How long the command line makes a user wait: ``peft-sara --help``, ``plan --help``, ``inspect`` on a tiny adapter,
``demo --help``, and (``--plans``) ``plan`` for SD1.5 / SDXL / FLUX.1-dev with each method.

Each command runs ``--repeats`` times as ``python -m peft_sara ...`` in a fresh interpreter (what a user's shell
does), from this checkout or from ``--tree`` (another checkout, e.g. a ``git archive`` of an earlier commit: the
"before"); the table gives the median wall time and the median CPU time (user + system of the child), which is what
the command costs on an idle core when the machine is shared. Plans run with ``--json`` (the same output before and
after) at the README's settings: bfloat16, gradient checkpointing, batch 1, SaRA fraction 0.02, LoRA rank 16, 512 px
for SD1.5 and 1024 px otherwise.

    python -m benchmarks.cli_startup                                  # seconds to a minute
    python -m benchmarks.cli_startup --plans                          # adds 9 plans (minutes)
    python -m benchmarks.cli_startup --tree /tmp/before --label before --plans

Writes ``benchmarks/results/cli_startup-<label>.json``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/cli_startup.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from .report import REPO_ROOT, RESULTS_DIR, format_table, machine_info, write_results

PLAN_CASES = (("sd15", 512), ("sdxl", 1024), ("flux-dev", 1024))
PLAN_METHODS = {"sara": ["--fraction", "0.02"], "lora": ["--rank", "16"], "full": []}


def make_tiny_adapter(folder: Path) -> Path:
    """A SaRA adapter on a two-layer MLP, saved with ``PeftModel.save_pretrained`` (what the README's quick start
    writes)."""
    import torch
    from peft import get_peft_model

    import peft_sara

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    config = peft_sara.SaRAConfig(target_modules=["0", "2"], trainable_fraction=0.05, init_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def time_command(argv: list[str], tree: Path, repeats: int) -> dict[str, Any]:
    """Median wall and CPU seconds of ``python -m peft_sara ARGV`` run from ``tree`` (fresh interpreter each time)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    walls, cpus, status, tail = [], [], 0, ""
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "peft_sara", *argv], cwd=tree, env=env, capture_output=True, text=True
        )
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
        status = status or done.returncode
        tail = (done.stderr or "").strip().splitlines()[-1:] if done.returncode else ""
    return {
        "command": "peft-sara " + " ".join(argv),
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "runs": repeats,
        "exit_status": status,
        "error": tail[0] if tail else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=REPO_ROOT, help="checkout to run the commands from")
    parser.add_argument("--label", default="after", help="name of this run in the results file")
    parser.add_argument("--repeats", type=int, default=3, help="runs per startup command (median)")
    parser.add_argument("--plans", action="store_true", help="also plan sd15 / sdxl / flux-dev for each method")
    parser.add_argument("--plan-repeats", type=int, default=1, help="runs per plan (median)")
    parser.add_argument("--out", type=Path, default=None, help="results file")
    args = parser.parse_args(argv)
    tree = args.tree.resolve()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sara-cli-") as tmp:
        adapter = make_tiny_adapter(Path(tmp) / "adapter")
        commands = [["--help"], ["plan", "--help"], ["demo", "--help"], ["inspect", str(adapter), "--quiet"]]
        for command in commands:
            rows.append(time_command(command, tree, args.repeats))
            print(f"{rows[-1]['command'][:60]:<60} {rows[-1]['wall_s']:7.2f} s wall {rows[-1]['cpu_s']:7.2f} s CPU")
        if args.plans:
            for preset, resolution in PLAN_CASES:
                for method, flags in PLAN_METHODS.items():
                    command = ["plan", "--model", preset, "--method", method, *flags, "--resolution", str(resolution)]
                    command += ["--dtype", "bfloat16", "--gradient-checkpointing", "--json"]
                    rows.append({**time_command(command, tree, args.plan_repeats), "preset": preset, "method": method})
                    print(f"plan {preset} {method}: {rows[-1]['wall_s']:.1f} s wall, {rows[-1]['cpu_s']:.1f} s CPU")
    for row in rows:
        row["command"] = row["command"].replace(str(tree), ".").replace(tempfile.gettempdir(), "$TMP")
    print()
    print(
        format_table(
            rows,
            [
                ("command", "command", ""),
                ("wall_s", "wall s", ".2f"),
                ("cpu_s", "CPU s", ".2f"),
                ("exit_status", "exit", ""),
            ],
        )
    )
    payload = {
        "label": args.label,
        "tree": str(tree),
        "machine": machine_info(__import__("torch").device("cpu"), 1),
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    write_results(args.out or RESULTS_DIR / f"cli_startup-{args.label}.json", payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
