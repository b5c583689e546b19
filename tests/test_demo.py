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
from peft_sara.demo.data import apply_style, load_splits  # noqa: E402
from peft_sara.demo.diffusion import predict_noise  # noqa: E402

EXPECTED_FILES = [
    "comparison.png",
    "tradeoff.png",
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


def test_demo_records_the_trade_off_path_and_scores_samples_of_every_model(quick_runs):
    first, _ = quick_runs
    metrics = first.metrics
    steps, every = metrics["settings"]["finetune_steps"], metrics["settings"]["checkpoint_every"]
    for method in ("sara", "lora"):
        (entry,) = metrics["sweep"][method]
        assert [item["step"] for item in entry["checkpoints"]] == [0, *range(every, steps, every), steps]
        assert entry["checkpoints"][0]["new_style"] == pytest.approx(metrics["base"]["new_style_loss"])
        assert entry["checkpoints"][-1]["new_style"] == pytest.approx(metrics[method]["new_style_loss_after"])
    for model in ("base", "sara", "lora"):
        scores = metrics["samples"][model]
        assert 0.0 <= scores["styled_classes_accuracy"] <= 1.0 and 0.0 <= scores["other_classes_accuracy"] <= 1.0
        assert scores["styled_classes_frechet"] >= 0.0
    assert 0.0 < metrics["judge"]["heldout_accuracy"] <= 1.0


def test_photo_patch_dataset_is_real_rgb_data_with_disjoint_heldout_blocks():
    splits = load_splits("photo-patches")
    assert splits.train_images.shape[1:] == (3, 16, 16) and len(splits.train_images) >= 3 * len(splits.heldout_images)
    assert set(splits.train_labels.tolist()) == set(splits.heldout_labels.tolist()) == {0, 1}
    assert splits.train_images.min() >= -1.0 and splits.train_images.max() <= 1.0
    flat_train = {tuple(image.flatten().tolist()) for image in splits.train_images[:200]}
    assert not any(tuple(image.flatten().tolist()) in flat_train for image in splits.heldout_images)
    assert torch.equal(apply_style(splits.train_images, "bgr")[:, 0], splits.train_images[:, 2])


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
    import peft_sara.demo.run as demo_run

    monkeypatch.setattr(demo_run, "run_demo", lambda settings, output_dir, cache_root, **kwargs: cache_root)
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    assert demo_cli.run_from_args(["--quick", "--no-cache", "--output-dir", str(tmp_path)]) is None
    cache_root = demo_cli.run_from_args(["--quick", "--cache-dir", str(tmp_path / "c"), "--output-dir", str(tmp_path)])
    assert cache_root == tmp_path / "c"


def test_pretraining_threads_are_passed_on_and_restored(tmp_path, monkeypatch):
    import peft_sara.demo.cli as demo_cli
    import peft_sara.demo.run as demo_run
    from peft_sara.demo.diffusion import build_noise_scheduler, load_or_pretrain
    from peft_sara.demo.settings import DemoSettings

    seen = []
    monkeypatch.setattr(demo_run, "run_demo", lambda *args, **kwargs: seen.append(kwargs["pretrain_threads"]))
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    demo_cli.run_from_args(["--quick", "--no-cache", "--output-dir", str(tmp_path)])
    demo_cli.run_from_args(["--quick", "--no-cache", "--pretrain-threads", "3", "--output-dir", str(tmp_path)])
    assert seen == [demo_cli.DEFAULT_PRETRAIN_THREADS, 3]
    with pytest.raises(SystemExit, match="pretrain-threads"):
        demo_cli.run_from_args(["--quick", "--pretrain-threads", "0", "--output-dir", str(tmp_path)])
    monkeypatch.undo()

    settings = DemoSettings.quick()
    threads = torch.get_num_threads()
    images, labels = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    during = []
    import peft_sara.demo.diffusion as diffusion

    original = diffusion.pretrain
    monkeypatch.setattr(diffusion, "pretrain", lambda *args: during.append(torch.get_num_threads()) or original(*args))
    common = dict(steps=2, batch_size=4, learning_rate=1e-3, seed=0, cache_folder=None, ema_decay=0.9)
    wanted = 2 if threads == 1 else 1
    load_or_pretrain(settings.unet_config, build_noise_scheduler(), images, labels, threads=wanted, **common)
    assert during == [wanted] and torch.get_num_threads() == threads


def test_module_entry_point_prints_help():
    completed = subprocess.run(
        [sys.executable, "-m", "peft_sara.demo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    for flag in (
        "--output-dir",
        "--steps",
        "--pretrain-steps",
        "--cache-dir",
        "--no-cache",
        "--seed",
        "--quick",
        "--dataset",
        "--pretrain",
        "--verbose",
    ):
        assert flag in completed.stdout


# ------------------------------------------------------------------------------------------------- the shipped base
def test_the_shipped_base_loads_matches_its_record_and_is_what_the_default_run_uses():
    from types import SimpleNamespace

    from peft_sara.demo.pretrain_base import SHIPPED_FOLDER, shipped_base, shipped_info, weights_sha256
    from peft_sara.demo.run import load_base
    from peft_sara.demo.settings import DemoSettings, cache_key

    settings = DemoSettings()
    info = shipped_info()
    assert info["cache_key"] == cache_key(settings) and info["pretrain_steps"] == settings.pretrain_steps
    assert len(info["losses"]) == settings.pretrain_steps and info["threads"] == 1
    shipped = shipped_base(settings)
    assert shipped.shipped and shipped.reused_from == str(SHIPPED_FOLDER)
    assert weights_sha256(shipped.unet) == info["weights_sha256"]
    config = {key: shipped.unet.config[key] for key in settings.unet_config}
    assert json.loads(json.dumps(config)) == json.loads(json.dumps(settings.unet_config))
    run = SimpleNamespace(settings=settings, data=None, cache_folder=None, pretrain_threads=None)
    assert load_base(run).shipped  # the default run takes it, without pretraining
    # any pretraining setting that differs (--quick, --pretrain-steps, --seed, another dataset) trains its own
    for other in (DemoSettings.quick(), DemoSettings(pretrain_steps=999), DemoSettings(seed=1)):
        assert shipped_base(other) is None


def test_a_damaged_shipped_base_is_refused_by_its_hash(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from peft_sara.demo.pretrain_base import SHIPPED_FOLDER, shipped_base
    from peft_sara.demo.settings import DemoSettings

    folder = tmp_path / "digits"
    shutil.copytree(SHIPPED_FOLDER, folder)
    weights_file = folder / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1e-3
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="does not match its recorded hash.*--pretrain"):
        shipped_base(DemoSettings(), folder=folder)


def test_pretraining_the_base_is_bitwise_reproducible():
    """What `python -m peft_sara.demo.pretrain_base` does, at the --quick size: two runs give the same weights."""
    import dataclasses

    from peft_sara.demo.pretrain_base import pretrain_default_base
    from peft_sara.demo.settings import DemoSettings

    settings = dataclasses.replace(DemoSettings.quick(), pretrain_steps=6, pretrain_batch_size=16)
    threads = torch.get_num_threads()
    first, first_info = pretrain_default_base(settings)
    second, second_info = pretrain_default_base(settings)
    assert torch.get_num_threads() == threads
    assert first_info["weights_sha256"] == second_info["weights_sha256"]
    assert first_info["losses"] == second_info["losses"]
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_the_demo_prints_no_third_party_noise(tmp_path):
    """`python -m peft_sara.demo` with torchao, bitsandbytes and optimum-quanto installed: stderr holds the demo's
    own progress bars and nothing else."""
    import os
    import re

    command = [sys.executable, "-m", "peft_sara.demo", "--quick", "--no-cache", "--output-dir", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    progress_bar = re.compile(r"[\w ,.()-]+:\s+\d+%\|.*\|")
    lines = [line.strip() for line in re.split(r"[\r\n]", completed.stderr) if line.strip()]
    assert lines, "the demo shows its progress"
    assert [line for line in lines if not progress_bar.match(line)] == []
    assert "Total time" in completed.stdout
