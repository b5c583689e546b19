"""The end-to-end demo (`python -m peft_sara.demo`) in its --quick configuration."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("PIL")

from diffusers import UNet2DModel  # noqa: E402
from peft import PeftModel  # noqa: E402

from peft_sara.demo import run_from_args  # noqa: E402
from peft_sara.demo.diffusion import predict_noise  # noqa: E402

EXPECTED_FILES = [
    "comparison.png",
    "heldout_styled_classes.png",
    "loss_curves.png",
    "metrics.json",
    *(
        f"samples_{model}_{group}.png"
        for model in ("base", "sara", "lora")
        for group in ("styled_classes", "other_classes")
    ),
    *(
        f"{method}_adapter/{name}"
        for method in ("sara", "lora")
        for name in ("adapter_config.json", "adapter_model.safetensors")
    ),
]


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Two --quick runs sharing a cache folder: the first pretrains, the second must reuse the base model."""
    cache_dir = tmp_path_factory.mktemp("cache")
    first_dir, second_dir = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    threads = torch.get_num_threads()  # the demo sets its own thread count; give the other tests theirs back
    try:
        first = run_from_args(["--quick", "--output-dir", str(first_dir), "--cache-dir", str(cache_dir)])
        second = run_from_args(["--quick", "--output-dir", str(second_dir), "--cache-dir", str(cache_dir)])
    finally:
        torch.set_num_threads(threads)
    return first, second


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _numbers(item)


def test_demo_writes_every_output_file(quick_runs):
    first, _ = quick_runs
    missing = [name for name in EXPECTED_FILES if not (first.output_dir / name).is_file()]
    assert not missing


def test_demo_pictures_are_non_blank_pngs(quick_runs):
    from PIL import Image

    first, _ = quick_runs
    for path in first.output_dir.glob("*.png"):
        with Image.open(path) as picture:
            assert picture.format == "PNG"
            low, high = picture.convert("L").getextrema()
            assert high > low, f"{path.name} is a single flat colour"


def test_demo_metrics_are_finite_and_sara_learns_the_new_style(quick_runs):
    first, _ = quick_runs
    metrics = json.loads((first.output_dir / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(first.metrics))
    assert all(math.isfinite(number) for number in _numbers(metrics))
    sara, lora = metrics["sara"], metrics["lora"]
    assert sara["new_style_loss_after"] < sara["new_style_loss_before"]
    for name, method in (("sara", sara), ("lora", lora)):
        assert method["trainable_params"] > 0
        adapter_file = first.output_dir / f"{name}_adapter" / "adapter_model.safetensors"
        assert method["adapter_file_bytes"] == adapter_file.stat().st_size
        assert method["other_classes_loss_change"] == pytest.approx(
            method["other_classes_loss_after"] - method["other_classes_loss_before"]
        )
    assert lora["rank"] >= 1
    assert 0.5 < lora["trainable_params"] / sara["trainable_params"] < 1.5
    assert sara["reselected_at_step"] == metrics["settings"]["finetune_steps"] // 2
    assert 0 <= sara["trainable_after_reselection"] <= sara["trainable_params"]
    assert sara["reload_max_abs_diff"] == 0.0
    assert metrics["selection"]["selected_entries"] == sara["trainable_params"]


def test_demo_adapter_reloads_into_a_fresh_base_and_reproduces_outputs(quick_runs):
    first, _ = quick_runs
    cache_folder = first.metrics["pretrained_model"]["cache_folder"]
    fresh_base = UNet2DModel.from_pretrained(cache_folder)
    reloaded = PeftModel.from_pretrained(fresh_base, first.output_dir / "sara_adapter").eval()
    generator = torch.Generator().manual_seed(123)
    noisy = torch.randn((6, 1, 8, 8), generator=generator)
    timesteps = torch.tensor([0, 100, 300, 500, 700, 999])
    labels = torch.tensor([0, 2, 4, 5, 7, 9])
    with torch.no_grad():
        expected = predict_noise(first.sara_model.eval(), noisy, timesteps, labels)
        actual = predict_noise(reloaded, noisy, timesteps, labels)
        base_output = predict_noise(first.base_model.eval(), noisy, timesteps, labels)
    assert torch.equal(actual, expected)
    assert not torch.equal(actual, base_output), "the adapter should change the model"


def test_second_run_reuses_cached_base_and_reproduces_the_numbers(quick_runs):
    first, second = quick_runs
    assert first.metrics["pretrained_model"]["reused_from_cache"] is False
    assert second.metrics["pretrained_model"]["reused_from_cache"] is True
    assert second.metrics["pretrained_model"]["cache_folder"] == first.metrics["pretrained_model"]["cache_folder"]
    assert second.metrics["times"]["pretrain_seconds"] == 0.0
    for method in ("sara", "lora"):
        for key in ("new_style_loss_after", "other_classes_loss_after", "trainable_params"):
            assert second.metrics[method][key] == first.metrics[method][key]


def test_no_cache_flag_neither_reads_nor_writes_the_cache(tmp_path, monkeypatch):
    import peft_sara.demo.cli as demo_cli

    monkeypatch.setattr(demo_cli, "run_demo", lambda settings, output_dir, cache_root: cache_root)
    monkeypatch.setattr(demo_cli.torch, "set_num_threads", lambda threads: None)
    assert demo_cli.run_from_args(["--quick", "--no-cache", "--output-dir", str(tmp_path)]) is None
    cache_root = demo_cli.run_from_args(["--quick", "--cache-dir", str(tmp_path / "c"), "--output-dir", str(tmp_path)])
    assert cache_root == tmp_path / "c"


def test_module_entry_point_prints_help():
    completed = subprocess.run(
        [sys.executable, "-m", "peft_sara.demo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    for flag in ("--output-dir", "--steps", "--pretrain-steps", "--cache-dir", "--no-cache", "--seed", "--quick"):
        assert flag in completed.stdout
