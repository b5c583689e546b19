"""Smoke tests of the quality benchmarks (``benchmarks/quality``) on tiny settings, plus their pure analysis."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from diffusers import UNet2DModel  # noqa: E402

from benchmarks.quality import ablation, ineffective, tradeoff  # noqa: E402
from benchmarks.quality.analysis import (  # noqa: E402
    front_value,
    matched_forgetting,
    mean_front,
    pareto_front,
    reachable_targets,
)
from benchmarks.quality.common import Job, QualitySettings, make_context, run_job  # noqa: E402
from benchmarks.quality.methods import ABLATIONS, MAIN_METHODS, build_method  # noqa: E402
from peft_sara.demo.settings import unet_config  # noqa: E402
from peft_sara.training import sara_layers  # noqa: E402

TINY = QualitySettings.tiny_settings()


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("quality-cache")


@pytest.fixture(scope="module")
def context(cache_root):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield make_context(TINY, cache_root)
    finally:
        torch.set_num_threads(threads)


def _run(seed: int, points: list[tuple[float, float]], base=(1.0, 1.0)) -> dict:
    """A fake run whose checkpoints give ``points`` (in % of ``base``) after the base model."""
    checkpoints = [{"step": 0, "new_style": base[0], "other_classes": base[1]}]
    checkpoints += [
        {"step": step, "new_style": base[0] * (1 + x / 100), "other_classes": base[1] * (1 + y / 100)}
        for step, (x, y) in enumerate(points, 1)
    ]
    return {"seed": seed, "method": "m", "budget": 0.05, "learning_rate": 1e-3, "checkpoints": checkpoints}


def test_pareto_front_keeps_only_undominated_points_sorted_by_new_task_change():
    front = pareto_front([(0, 0), (-10, 5), (-10, 8), (-5, 6), (-20, 12), (-15, 20)])
    assert front == [(-20, 12), (-10, 5), (0, 0)]


def test_front_value_interpolates_and_refuses_targets_beyond_reach():
    front = [(-20.0, 12.0), (-10.0, 5.0), (0.0, 0.0)]
    assert front_value(front, -15) == pytest.approx(8.5)
    assert front_value(front, -10) == pytest.approx(5.0)
    assert front_value(front, -25) is None


def test_matched_forgetting_averages_seeds_and_counts_those_that_reach():
    runs = [_run(0, [(-10, 4), (-20, 10)]), _run(1, [(-10, 6), (-15, 9)])]
    rows = matched_forgetting(runs, [-10.0, -20.0])
    assert rows[0]["mean"] == pytest.approx(5.0) and rows[0]["reached"] == 2
    assert rows[1]["reached"] == 1 and rows[1]["values"] == [pytest.approx(10.0)]
    assert [x for x, _, _ in mean_front(runs, [-16.0, -10.0, -5.0])] == [-10.0, -5.0]


def test_reachable_targets_stay_within_the_weakest_methods_reach():
    runs = {"a": [_run(0, [(-40, 10)])], "b": [_run(0, [(-20, 5)])]}
    targets = reachable_targets(runs)
    assert targets and all(-20 <= target < 0 for target in targets)


@pytest.mark.parametrize("method", MAIN_METHODS + ABLATIONS)
def test_every_method_builds_with_the_budgets_parameter_count(context, method):
    budget = TINY.budgets[0]
    sara = build_method("sara", context.base, budget, 0, context.demo.rank_min_dim)
    built = build_method(method, context.base, budget, 0, context.demo.rank_min_dim)
    assert built.trainable > 0
    if method == "full":
        assert built.trainable == sum(param.numel() for param in context.base.parameters())
    elif method in ("lora", "supertuning", "shira", "sara_linear") or method in ABLATIONS:
        assert 0.5 < built.trainable / sara.trainable < 1.6, (built.trainable, sara.trainable)
    if method in ("largest", "random"):
        (_, smallest_layer), (_, chosen_layer) = next(zip(sara_layers(sara.model), sara_layers(built.model)))
        smallest, chosen = smallest_layer.trainable_entries("default")[0], chosen_layer.trainable_entries("default")[0]
        assert smallest.numel() == chosen.numel() and not torch.equal(smallest, chosen)


def test_a_job_records_its_trajectory_sample_scores_and_rank(context):
    result = run_job(Job("sara", TINY.budgets[0], 1e-2, 0, sample=True, rank_stats=True), context)
    assert [item["step"] for item in result["checkpoints"]] == [0, *TINY.checkpoints]
    assert all(math.isfinite(item["new_style"]) for item in result["checkpoints"])
    assert result["checkpoints"][-1]["new_style"] != result["checkpoints"][0]["new_style"]
    assert 0.0 <= result["samples"]["styled_classes_accuracy"] <= 1.0
    assert math.isfinite(result["samples"]["other_classes_frechet"])
    exports = {item["rank"]: item["total_relative_error"] for item in result["rank"]["exports"]}
    assert exports["full"] < 1e-4 < exports["1"] <= 1.0
    assert result["rank"]["mean_effective_rank"] >= 1.0


def test_zeroing_restores_weights_bitwise_and_the_smallest_weights_matter_least(context):
    base = context.base
    before = {name: value.clone() for name, value in base.state_dict().items()}
    inputs = ineffective.example_inputs(base, batch_size=8)
    with torch.no_grad():
        reference = base(**inputs).sample
    changes = {}
    for rule in ineffective.RULES:
        with ineffective.zeroed(base, rule, ineffective.fraction_counts(0.2)) as count:
            changes[rule] = ineffective.output_change(base, inputs, reference)
        assert count > 0
    assert changes["smallest"] < changes["random"] < changes["largest"]
    assert all(torch.equal(value, before[name]) for name, value in base.state_dict().items())


def test_zeroing_script_runs_on_a_local_model_folder(tmp_path):
    torch.manual_seed(0)
    UNet2DModel(**unet_config("digits", (16, 32), 16)).save_pretrained(tmp_path / "unet")
    payload = ineffective.run(TINY, tmp_path / "out", model=tmp_path / "unet")
    rows = payload["fractions"]
    assert len(rows) == len(ineffective.RULES) * len(ineffective.FRACTIONS)
    assert (tmp_path / "out" / "ineffective_unet.png").is_file()
    written = json.loads((tmp_path / "out" / "ineffective_unet.json").read_text())
    assert written["thresholds"] and written["setup"]["inputs"] == "seeded random"


def test_tradeoff_and_ablation_scripts_write_their_tables_json_and_figures(tmp_path, cache_root):
    threads = torch.get_num_threads()
    try:
        payload = tradeoff.run(TINY, 1, tmp_path, cache_root)
        ablations = ablation.run(TINY, 1, tmp_path, cache_root)
    finally:
        torch.set_num_threads(threads)
    for name in ("tradeoff_fronts", "tradeoff_paths", "sample_quality", "ablation", "export_error"):
        assert (tmp_path / f"{name}_digits.png").is_file(), name
    written = json.loads((tmp_path / "tradeoff_digits.json").read_text())
    assert {run["method"] for run in written["runs"]} == set(MAIN_METHODS)
    assert "SaRA" in tradeoff.summary_markdown(payload["summary"], TINY)
    assert set(ablations["summary"]["variants"]) == {"sara", *ABLATIONS}
    assert "effective rank" in ablation.summary_markdown(ablations["summary"])


def test_run_all_tiny_writes_every_figure_the_summary_and_the_timings(tmp_path, cache_root):
    from benchmarks.quality import run_all

    threads = torch.get_num_threads()
    try:
        assert (
            run_all.main(["--tiny", "--workers", "1", "--output-dir", str(tmp_path), "--cache-dir", str(cache_root)])
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    summary = (tmp_path / "summary.md").read_text()
    for heading in ("Ineffective parameters (digits)", "Trade-off (digits)", "Ablations and rank (digits)"):
        assert heading in summary
    assert "Trade-off (photo-patches)" in summary
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert timings["total"]["wall_seconds"] > 0
    for name in ("ineffective_digits", "ineffective_photo-patches", "tradeoff_fronts_digits", "ablation_digits"):
        assert (tmp_path / f"{name}.png").is_file(), name
