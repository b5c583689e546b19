"""End-to-end runs of ``examples/train_motion_sara.py`` on a tiny AnimateDiff (SD UNet (32, 64) + ``MotionAdapter``),
in this process (``main(argv)``).

The clips are camera pans over scikit-learn's sample photos (a window sliding right frame by frame), two as folders
of PNG frames and one as an animated GIF. SaRA must touch the motion modules only, its adapter must load into a fresh
``AnimateDiffPipeline`` with ``load_sara_adapter`` and change the video, the preview GIF must hold the clip, and a
run resumed from the step-2 checkpoint must match the uninterrupted one bitwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AnimateDiffPipeline, MotionAdapter
from PIL import Image, ImageSequence
from safetensors.torch import load_file
from sklearn.datasets import load_sample_images

import peft_sara

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))  # helper modules beside this file, with or without tests/__init__.py
import tiny_pipelines  # noqa: E402
from test_train_example import (  # noqa: E402
    ADAPTER_FILES,
    assert_same_optimizer_state,
    assert_same_tensors,
    load_example,
    run_example,
    training_state,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

NUM_FRAMES = 4
PROMPT = "a pan right"  # the tiny CLIP tokenizer keeps 14 bytes between its start and end tokens
# 3 clips, batch 1, 4 steps: one epoch and a step into the next; re-selection and a checkpoint at step 2.
TRAIN_ARGS = [
    *("--validation_prompt", PROMPT, "--num_frames", str(NUM_FRAMES)),
    *"--sample_stride 2 --resolution 32 --center_crop --random_flip --train_batch_size 1 --max_train_steps 4".split(),
    *"--checkpointing_steps 2 --trainable_fraction 0.05 --learning_rate 1e-3 --progressive_fraction 0.5".split(),
    *"--lambda_rank 1e-3 --rank_min_dim 8 --report_to none --num_validation_images 1 --validation_steps 2".split(),
    *"--validation_inference_steps 2".split(),
]


def write_clip_folder(directory: Path, count: int = 3, frames: int = 8, size: int = 40) -> Path:
    """``count`` camera pans (a 160-pixel window moving right 10 pixels a frame) with captions in ``metadata.jsonl``:
    the first clips as folders of PNG frames, the last as an animated GIF."""
    directory.mkdir(parents=True)
    photos = load_sample_images().images
    lines = []
    for index in range(count):
        top, left = 40 * index, 30 * index
        window = [
            Image.fromarray(photos[index % 2][top : top + 160, left + 10 * step : left + 10 * step + 160])
            for step in range(frames)
        ]
        window = [frame.resize((size, size), Image.BILINEAR) for frame in window]
        if index == count - 1:
            name = f"pan-{index}.gif"
            window[0].save(directory / name, save_all=True, append_images=window[1:], duration=100, loop=0)
        else:
            name = f"pan-{index}"
            (directory / name).mkdir()
            for step, frame in enumerate(window):
                frame.save(directory / name / f"{step:03d}.png")
        caption = f"{('temple', 'flower')[index % 2]}, pan right"
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def animatediff(runs: SimpleNamespace) -> AnimateDiffPipeline:
    pipe = AnimateDiffPipeline.from_pretrained(
        runs.pipeline_dir, motion_adapter=MotionAdapter.from_pretrained(runs.motion_dir)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def video(pipe: AnimateDiffPipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        PROMPT,
        num_frames=NUM_FRAMES,
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="np",
        generator=generator,
    ).frames


def gif_frames(path: Path) -> list[np.ndarray]:
    with Image.open(path) as gif:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("motion")
    script = load_example("train_motion_sara")
    pipeline_dir = tiny_pipelines.build_sd_pipeline(root)
    motion_dir = tiny_pipelines.build_motion_adapter(root)
    common = [
        *("--pretrained_model_name_or_path", str(pipeline_dir), "--motion_adapter_name_or_path", str(motion_dir)),
        *("--train_data_dir", str(write_clip_folder(root / "clips")), *TRAIN_ARGS),
    ]
    full_dir, resumed_dir = root / "full", root / "resumed"
    run_example(script, [*common, "--output_dir", str(full_dir), "--export_lora_rank", "full"])
    resumed_dir.mkdir()
    shutil.copytree(full_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    run_example(script, [*common, "--output_dir", str(resumed_dir), "--resume_from_checkpoint", "latest"])
    return SimpleNamespace(
        root=root, pipeline_dir=pipeline_dir, motion_dir=motion_dir, full_dir=full_dir, resumed_dir=resumed_dir
    )


def test_sara_adapts_the_motion_modules_only(runs):
    assert {path.name for path in (runs.full_dir / "unet").iterdir()} == ADAPTER_FILES
    keys = [key for key in load_file(runs.full_dir / "unet" / "adapter_model.safetensors") if "." in key]
    assert keys and all(".motion_modules." in key for key in keys)  # (besides the file's format version)
    layers = {key.split(".sara_")[0] for key in keys}
    assert any(layer.endswith("attn1.to_q") for layer in layers) and any(layer.endswith("ff.net.2") for layer in layers)
    config = json.loads((runs.full_dir / "unet" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SARA" and "motion_modules" in config["target_modules"]


def test_adapter_loads_into_a_fresh_animatediff_pipeline_and_changes_the_video(runs):
    pipe = animatediff(runs)
    base = video(pipe)
    name = peft_sara.load_sara_adapter(pipe, runs.full_dir)
    adapted = video(pipe)
    assert adapted.shape == (1, NUM_FRAMES, 32, 32, 3)
    assert np.abs(adapted - base).max() > 1e-4
    pipe.set_adapters([name], [0.0])
    np.testing.assert_allclose(video(pipe), base, rtol=0, atol=1e-6)


def test_preview_gifs_hold_every_frame_and_the_final_one_comes_from_the_saved_adapter(runs):
    out = runs.full_dir
    assert {path.name for path in out.glob("validation-*.gif")} == {
        "validation-step-2.gif",
        "validation-step-4.gif",
        "validation-final.gif",
    }
    final = gif_frames(out / "validation-final.gif")
    assert len(final) == NUM_FRAMES and final[0].shape == (32, 32, 3)
    for ours, theirs in zip(final, gif_frames(out / "validation-step-4.gif")):
        np.testing.assert_array_equal(ours, theirs)
    card = (out / "README.md").read_text()
    assert "text-to-video" in card and "AnimateDiffPipeline.from_pretrained" in card and "validation-final.gif" in card


def test_resuming_from_the_step_2_checkpoint_reproduces_the_uninterrupted_run_bitwise(runs):
    assert_same_tensors(
        runs.full_dir / "unet" / "adapter_model.safetensors", runs.resumed_dir / "unet" / "adapter_model.safetensors"
    )
    full_state = training_state(runs.full_dir / "checkpoint-4" / "unet")
    assert_same_optimizer_state(full_state, training_state(runs.resumed_dir / "checkpoint-4" / "unet"))
    assert full_state["helper"]["reselected"]


def test_motion_lora_export_loads_with_load_lora_weights(runs):
    sara = animatediff(runs)
    peft_sara.load_sara_adapter(sara, runs.full_dir)
    lora = animatediff(runs)
    lora.load_lora_weights(runs.full_dir)
    np.testing.assert_allclose(video(lora), video(sara), rtol=0, atol=1e-4)


def test_clips_too_short_and_keyword_called_layers_are_refused_with_a_clear_message(runs):
    script = load_example("train_motion_sara")
    args = argparse.Namespace(
        train_data_dir=str(runs.root / "clips"),
        caption_column="text",
        max_train_samples=None,
        num_frames=8,
        sample_stride=2,
        resolution=32,
        center_crop=True,
        image_interpolation_mode="bilinear",
    )
    with pytest.raises(ValueError, match="has 8 frames; --num_frames 8 at --sample_stride 2 needs 15"):
        script.ClipDataset(args)[0]
    with pytest.raises(ValueError, match="proj_in"):
        script.motion_targets("to_q,proj_in")
