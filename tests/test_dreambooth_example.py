"""End-to-end runs of ``examples/train_dreambooth_sara.py`` on tiny pipelines, in this process (``main(argv)``).

SD 1.x: prior preservation with class images the base model generates first, SaRA on the UNet and the text encoder,
validation, checkpoints, a push to a local stub of the Hub, and a run resumed from the step-2 checkpoint that must
match the uninterrupted one bitwise. SDXL: both text encoders trained, and the LoRA export read by
``pipe.load_lora_weights``. Instance images are crops of scikit-learn's sample photos.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file

import peft_sara

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))  # helper modules beside this file, with or without tests/__init__.py
import tiny_pipelines  # noqa: E402
from hub_stub import HubStub  # noqa: E402
from test_train_example import (  # noqa: E402
    ADAPTER_FILES,
    assert_same_optimizer_state,
    assert_same_tensors,
    load_example,
    pixels,
    run_example,
    training_state,
    write_image_folder,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# The tiny CLIP tokenizer keeps 14 bytes between its start and end tokens.
INSTANCE_PROMPT = "a sks temple"
CLASS_PROMPT = "a temple"
VALIDATION_PROMPT = "sks in snow"
PUSHED_REPO = "org/sara-dreambooth"
# 3 instance images, 2 class images, batch 1: 3 steps per epoch; 4 steps cross an epoch boundary, and the step-2
# checkpoint (right after the progressive re-selection) sits in the middle of epoch 0.
COMMON_ARGS = [
    *("--instance_prompt", INSTANCE_PROMPT, "--class_prompt", CLASS_PROMPT),
    *"--with_prior_preservation --num_class_images 2 --sample_batch_size 2 --class_inference_steps 2".split(),
    *"--train_text_encoder --resolution 32 --center_crop --random_flip --train_batch_size 1".split(),
    *"--max_train_steps 4".split(),
    *"--checkpointing_steps 2 --trainable_fraction 0.05 --learning_rate 1e-3 --progressive_fraction 0.5".split(),
    *"--lambda_rank 1e-3 --rank_min_dim 16 --report_to none".split(),
]


def instance_folder(directory: Path) -> Path:
    """Three photos of "the subject", without captions (every prompt is the instance prompt)."""
    write_image_folder(directory, count=3)
    (directory / "metadata.jsonl").unlink()
    return directory


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("dreambooth")
    script = load_example("train_dreambooth_sara")
    outputs = load_example("sara_outputs")
    pipeline_dir = tiny_pipelines.build_sd_pipeline(root)
    common = [
        *("--pretrained_model_name_or_path", str(pipeline_dir), "--cache_dir", str(root / "cache")),
        *("--instance_data_dir", str(instance_folder(root / "instance")), "--class_data_dir", str(root / "class")),
        *COMMON_ARGS,
    ]
    full_dir, resumed_dir = root / "full", root / "resumed"
    validation = ["--validation_prompt", VALIDATION_PROMPT] + (
        "--num_validation_images 1 --validation_steps 2 --validation_inference_steps 2".split()
    )
    with HubStub(lifetime_s=600) as hub, pytest.MonkeyPatch.context() as patch:
        patch.setattr(outputs, "HfApi", functools.partial(HfApi, endpoint=hub.url))
        push = ["--push_to_hub", "--hub_model_id", PUSHED_REPO, "--hub_token", "hf_test"]
        run_example(script, [*common, "--output_dir", str(full_dir), *validation, *push])
        pushed, unhandled = hub.files(PUSHED_REPO), hub.unhandled_for(PUSHED_REPO.split("/")[0])

    resumed_dir.mkdir()
    shutil.copytree(full_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    run_example(script, [*common, "--output_dir", str(resumed_dir), "--resume_from_checkpoint", "latest"])

    sdxl_dir = tiny_pipelines.build_sdxl_pipeline(root / "sdxl")
    sdxl_out = root / "sdxl-out"
    sdxl_args = [
        *("--pretrained_model_name_or_path", str(sdxl_dir), "--cache_dir", str(root / "cache")),
        *("--instance_data_dir", str(root / "instance"), "--instance_prompt", INSTANCE_PROMPT),
        *("--output_dir", str(sdxl_out), "--export_lora_rank", "full"),
        *"--train_text_encoder --resolution 32 --max_train_steps 2 --checkpointing_steps 100".split(),
        *"--trainable_fraction 0.05 --learning_rate 1e-3 --report_to none".split(),
    ]
    run_example(script, sdxl_args)

    sd3_dir = tiny_pipelines.build_sd3_pipeline(root / "sd3")
    sd3_out = root / "sd3-out"
    sd3_args = [
        *("--pretrained_model_name_or_path", str(sd3_dir), "--cache_dir", str(root / "cache")),
        *("--instance_data_dir", str(root / "instance"), "--instance_prompt", INSTANCE_PROMPT),
        *("--class_data_dir", str(root / "sd3-class"), "--class_prompt", CLASS_PROMPT, "--output_dir", str(sd3_out)),
        *"--with_prior_preservation --num_class_images 1 --class_inference_steps 2 --max_sequence_length 8".split(),
        *"--resolution 32 --max_train_steps 2 --checkpointing_steps 100 --trainable_fraction 0.05".split(),
        *"--learning_rate 1e-3 --report_to none".split(),
    ]
    run_example(script, sd3_args)
    return SimpleNamespace(
        root=root,
        pipeline_dir=pipeline_dir,
        full_dir=full_dir,
        resumed_dir=resumed_dir,
        pushed=pushed,
        unhandled=unhandled,
        sdxl_dir=sdxl_dir,
        sdxl_out=sdxl_out,
        sd3_out=sd3_out,
    )


def test_prior_preservation_generates_the_missing_class_images_with_the_base_model(runs):
    class_images = sorted((runs.root / "class").iterdir())
    assert len(class_images) == 2 and all(path.suffix == ".png" for path in class_images)
    # One batch of 2 from the seeded generator, at the training resolution: what the untouched base model draws.
    base = StableDiffusionPipeline.from_pretrained(runs.pipeline_dir)
    base.set_progress_bar_config(disable=True)
    expected = base(
        [CLASS_PROMPT] * 2,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images
    for path, image in zip(class_images, expected):
        np.testing.assert_array_equal(pixels(path), np.asarray(image))


def test_run_saves_unet_and_text_encoder_adapters_that_reload_into_a_fresh_pipeline_and_change_it(runs):
    out = runs.full_dir
    for name in ("unet", "text_encoder"):
        assert {path.name for path in (out / name).iterdir()} == ADAPTER_FILES
        assert sorted(path.name for path in (out / "checkpoint-4").iterdir()) == ["text_encoder", "unet"]
    # The final grid comes from a fresh pipeline with the saved adapter: it matches the last in-training one.
    np.testing.assert_array_equal(pixels(out / "validation-final.png"), pixels(out / "validation-step-4.png"))

    pipe = StableDiffusionPipeline.from_pretrained(runs.pipeline_dir)
    base = tiny_pipelines.generate(pipe)
    peft_sara.load_sara_adapter(pipe, out, components=["text_encoder"])
    text_only = tiny_pipelines.generate(pipe)
    pipe = StableDiffusionPipeline.from_pretrained(runs.pipeline_dir)
    peft_sara.load_sara_adapter(pipe, out)
    adapted = tiny_pipelines.generate(pipe)
    assert np.abs(text_only - base).max() > 1e-4  # the text encoder learned something too
    assert np.abs(adapted - text_only).max() > 1e-4

    card = ModelCard.load(out / "README.md")
    assert {"sara", "dreambooth", "text-to-image"} <= set(card.data.tags)
    assert f"Instance prompt: `{INSTANCE_PROMPT}`" in card.text and f"images of `{CLASS_PROMPT}`" in card.text


def test_push_to_hub_uploads_both_components_the_card_and_the_validation_grids(runs):
    assert set(runs.pushed) == {
        "README.md",
        *(f"{name}/{file}" for name in ("unet", "text_encoder") for file in ADAPTER_FILES),
        "validation-step-2.png",
        "validation-step-4.png",
        "validation-final.png",
    }
    assert f'"{PUSHED_REPO}"' in runs.pushed["README.md"].decode()
    assert not runs.unhandled


def test_resuming_from_the_step_2_checkpoint_reproduces_the_uninterrupted_run_bitwise(runs):
    for name in ("unet", "text_encoder"):
        assert_same_tensors(
            runs.full_dir / name / "adapter_model.safetensors", runs.resumed_dir / name / "adapter_model.safetensors"
        )
        full_state = training_state(runs.full_dir / "checkpoint-4" / name)
        assert_same_optimizer_state(full_state, training_state(runs.resumed_dir / "checkpoint-4" / name))
        assert full_state["helper"]["reselected"] and full_state["helper"]["global_step"] == 4
    saved = load_file(runs.full_dir / "unet" / "adapter_model.safetensors")
    assert any(value.numel() for key, value in saved.items() if "sara_frozen_values" in key)


def test_sdxl_dreambooth_trains_both_text_encoders_and_its_lora_export_loads_with_load_lora_weights(runs):
    for name in ("unet", "text_encoder", "text_encoder_2"):
        config = json.loads((runs.sdxl_out / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "SARA"
    sara = StableDiffusionXLPipeline.from_pretrained(runs.sdxl_dir)
    base = tiny_pipelines.generate(sara)
    peft_sara.load_sara_adapter(sara, runs.sdxl_out)
    adapted = tiny_pipelines.generate(sara)
    lora = StableDiffusionXLPipeline.from_pretrained(runs.sdxl_dir)
    lora.load_lora_weights(runs.sdxl_out)
    assert np.abs(adapted - base).max() > 1e-4
    np.testing.assert_allclose(tiny_pipelines.generate(lora), adapted, rtol=0, atol=1e-4)


def test_sd3_dreambooth_trains_the_transformer_with_flow_matching_and_prior_preservation(runs):
    assert len(list((runs.root / "sd3-class").iterdir())) == 1
    assert {path.name for path in (runs.sd3_out / "transformer").iterdir()} == ADAPTER_FILES
    values = load_file(runs.sd3_out / "transformer" / "adapter_model.safetensors")
    assert any(value.abs().sum() > 0 for key, value in values.items() if "sara_values" in key)
    assert "Prior preservation: 1 images" in (runs.sd3_out / "README.md").read_text()


def test_prior_preservation_needs_a_class_folder_and_prompt(capsys):
    script = load_example("train_dreambooth_sara")
    required = ["--pretrained_model_name_or_path", "x", "--instance_data_dir", "d", "--instance_prompt", "p"]
    with pytest.raises(SystemExit):
        script.parse_args([*required, "--with_prior_preservation", "--class_data_dir", "c"])
    assert "--with_prior_preservation needs --class_data_dir and --class_prompt" in capsys.readouterr().err
