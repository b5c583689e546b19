"""What SaRA's default targets adapt in every diffusers denoiser, and whether it trains, reloads, merges and exports.

Runs the model-zoo test (tests/test_model_zoo.py: the tiny configs of diffusers' own model tests) and records each
class's outcome; measures the defaults' coverage (``peft_sara.tuner.targets.coverage``) at each class's default
(full-size) config, built on the meta device, and at its tiny config. Classes of the installed diffusers outside the
zoo get the full-size coverage only. Prints a markdown table and writes benchmarks/results/model_zoo.json.

    python -m benchmarks.model_zoo_table            # about a minute on one core
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/model_zoo_table.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest
import torch

from peft_sara.tuner.targets import Coverage, coverage

ROOT = Path(__file__).resolve().parent.parent

# The zoo test behind each column (its outcome per class).
COLUMNS = {
    "blocks": "test_defaults_adapt_attention_and_feed_forward_of_every_block",
    "train": "test_one_training_step_changes_only_the_adapter",
    "reload": "test_saved_config_lists_the_targets_and_reload_gives_identical_outputs",
    "merge": "test_merge_gives_the_unmerged_output",
    "export": "test_full_rank_lora_export_reproduces_the_adapter",
    "kohya": "test_kohya_export_names_every_adapted_layer",
}
MARKS = {"passed": "yes", "xfailed": "known gap", "failed": "FAILS", "skipped": "skipped", None: "not run"}


class OutcomeCollector:
    """A pytest plugin recording each parametrized zoo test's outcome by (test, class)."""

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, str], str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        match = re.search(r"::(\w+)\[(\w+)\]$", report.nodeid)
        if not match:
            return
        outcome = "xfailed" if hasattr(report, "wasxfail") else report.outcome
        if report.when == "call" or outcome != "passed":
            self.outcomes[match.groups()] = outcome


def run_zoo_tests() -> dict[tuple[str, str], str]:
    """Outcomes of the parametrized zoo tests, by (test name, class name)."""
    collector = OutcomeCollector()
    selection = " or ".join(COLUMNS.values())
    pytest.main(
        [str(ROOT / "tests" / "test_model_zoo.py"), "-q", "-p", "no:cacheprovider", "-k", selection],
        plugins=[collector],
    )
    return collector.outcomes


def full_size_coverage(class_name: str) -> tuple[Coverage | None, int | None, str | None]:
    """Coverage of the defaults at the class's default config (built on the meta device), its parameter count, or
    why it could not be built."""
    import diffusers

    try:
        with torch.device("meta"):
            model = getattr(diffusers, class_name)()
    except Exception as error:  # a class whose default config is incomplete (it needs arguments)
        return None, None, f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return coverage(model), sum(parameter.numel() for parameter in model.parameters()), None


def denoiser_classes() -> list[str]:
    """The transformer / UNet denoiser classes of the installed diffusers (no ControlNets, VAEs or multi-wrappers)."""
    import diffusers

    names = []
    for name in dir(diffusers):
        if not re.search(r"Transformer|UNet|DiT", name) or re.search(r"ControlNet|Multi|Projection|Vae", name):
            continue
        try:
            cls = getattr(diffusers, name)
        except Exception:  # an optional dependency missing
            continue
        if isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin):
            names.append(name)
    return sorted(names)


def _share(report: Coverage | None) -> str:
    if report is None:
        return "—"
    return f"{report.parameter_share:.1%} ({report.adapted_layers} of {report.block_layers} layers)"


def _left_out(report: Coverage | None) -> str:
    if report is None or not report.left_out:
        return "—" if report is None else "nothing"
    suffixes = sorted({re.sub(r"^.*?\.N\.", "", name) for name in report.left_out})
    return ", ".join(f"`{suffix}`" for suffix in suffixes[:3]) + (" ..." if len(suffixes) > 3 else "")


def build_rows(outcomes: dict[tuple[str, str], str]) -> list[dict[str, Any]]:
    """One row per denoiser class: the zoo's ones first (with their test outcomes), then the rest."""
    sys.path.insert(0, str(ROOT / "tests"))  # the zoo's configs
    from model_zoo_configs import ZOO, build

    rows = []
    for entry in ZOO:
        full, parameters, problem = full_size_coverage(entry.class_name)
        tiny = coverage(build(entry))
        rows.append(
            {
                "class": entry.class_name,
                "family": entry.family,
                "tiny_config_from": entry.source,
                "full_size": full,
                "full_size_parameters": parameters,
                "full_size_problem": problem,
                "tiny": tiny,
                **{column: outcomes.get((test, entry.class_name)) for column, test in COLUMNS.items()},
            }
        )
    zoo = {entry.class_name for entry in ZOO}
    for class_name in denoiser_classes():
        if class_name in zoo:
            continue
        full, parameters, problem = full_size_coverage(class_name)
        rows.append(
            {
                "class": class_name,
                "family": "",
                "tiny_config_from": None,
                "full_size": full,
                "full_size_parameters": parameters,
                "full_size_problem": problem,
                "tiny": None,
                **dict.fromkeys(COLUMNS),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The README tables: the zoo's classes with their test outcomes, then the other classes' coverage."""
    lines = [
        "| Family | Class | Defaults adapt (share of the block Linear/Conv weights, full size) | Left frozen in the "
        "blocks | Every block's attn + FFN | Train | Reload | Merge | Export (LoRA / kohya) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["tiny"] is None:
            continue
        share = _share(row["full_size"])
        if row["full_size"] is None:
            share = _share(row["tiny"]) + " (tiny config)"
        export = f"{MARKS[row['export']]} / {MARKS[row['kohya']]}"
        lines.append(
            f"| {row['family']} | `{row['class']}` | {share} | {_left_out(row['full_size'] or row['tiny'])} "
            f"| {MARKS[row['blocks']]} | {MARKS[row['train']]} | {MARKS[row['reload']]} | {MARKS[row['merge']]} "
            f"| {export} |"
        )
    lines += [
        "",
        "Other denoiser classes of the installed diffusers (no tiny config in the zoo; coverage at full size):",
        "",
        "| Class | Defaults adapt (share of the block Linear/Conv weights) | Left frozen in the blocks |",
        "|---|---|---|",
    ]
    for row in rows:
        if row["tiny"] is not None:
            continue
        share = _share(row["full_size"]) if row["full_size"] else "not measured: its default config needs arguments"
        lines.append(f"| `{row['class']}` | {share} | {_left_out(row['full_size'])} |")
    return "\n".join(lines)


def to_json(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def coverage_dict(report: Coverage | None) -> dict[str, Any] | None:
        if report is None:
            return None
        return {
            "adapted_layers": report.adapted_layers,
            "block_layers": report.block_layers,
            "adapted_parameters": report.adapted_parameters,
            "block_parameters": report.block_parameters,
            "parameter_share": report.parameter_share,
            "left_out": list(report.left_out),
            "summary": str(report),
        }

    return [{**row, "full_size": coverage_dict(row["full_size"]), "tiny": coverage_dict(row["tiny"])} for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_zoo_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "model_zoo.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = build_rows(run_zoo_tests())
    table = markdown(rows)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"table": table, "rows": to_json(rows)}, indent=1) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
