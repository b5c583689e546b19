"""End-to-end runs of ``examples/train_text_to_image_sara.py`` on tiny pipelines, as a user runs it.

The SD run (a subprocess) takes its base model by Hub id from a local stub of the Hub API (``hub_stub.HubStub``,
127.0.0.1 only), pushes the result there and exports a LoRA copy; the resumed run loads the same id from the cache with
``HF_HUB_OFFLINE=1``. A two-step SD3 run (flow matching, transformer) goes on in the background meanwhile. An SDXL run
(two text encoders trained too, size/crop conditioning, Min-SNR, offset noise, ``--scale_lr``) runs in this process.
Data is a tiny image folder with ``metadata.jsonl``, the paper's dataset layout. The flags of diffusers' LoRA scripts
that SaRA has no use for are checked for all three example scripts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers import (
    DDPMScheduler,
    FluxPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from huggingface_hub import HfApi, ModelCard
from peft import set_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_sample_images

import peft_sara  # noqa: F401  (registers the method)
from peft_sara import SaRAConfig
from peft_sara.training import (
    SaRATrainingHelper,
    TrainedComponent,
    add_sara_adapter,
    recorded_base_model,
    resume_from_checkpoint,
    save_training_checkpoint,
)
from peft_sara.training.checkpoint import read_training_state

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
EXAMPLES_DIR = REPO_ROOT / "examples"
SCRIPT = EXAMPLES_DIR / "train_text_to_image_sara.py"
sys.path.insert(0, str(TESTS_DIR))  # helper modules beside this file, with or without tests/__init__.py
import tiny_pipelines  # noqa: E402
from conftest import tiny_clip_text, tiny_unet, unet_inputs  # noqa: E402
from hub_stub import HubStub  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

BASE_REPO = "org/tiny-sd"
PUSHED_REPO = "org/sara-tiny-sd"
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
CHECKPOINT_FILES = ADAPTER_FILES | {"sara_training_state.safetensors"}
LORA_FILE = "pytorch_lora_weights.safetensors"
PROMPT = "a red cat"
# 6 images, batch 1, 2 accumulation steps: 3 optimizer steps per epoch. 4 steps cross an epoch boundary, and the
# step-2 checkpoint (taken right after the progressive re-selection) sits in the middle of epoch 0.
TRAIN_ARGS = (
    "--resolution 32 --center_crop --random_flip --train_batch_size 1 --gradient_accumulation_steps 2 "
    "--max_train_steps 4 --checkpointing_steps 2 --progressive_fraction 0.5 --report_to none --seed 0 "
    "--lambda_rank 1e-3 --rank_min_dim 16"  # tiny layers must qualify for the low-rank loss
).split()
VALIDATION_ARGS = ["--validation_prompt", PROMPT] + (
    "--num_validation_images 1 --validation_steps 2 --validation_inference_steps 2".split()
)
SD3_ARGS = ["--validation_prompt", PROMPT] + (
    "--resolution 32 --train_batch_size 2 --max_train_steps 2 --learning_rate 1e-4 --checkpointing_steps 1 "
    "--checkpoints_total_limit 1 --lambda_rank 1e-3 --rank_min_dim 16 --rank_layers_per_step all "
    "--max_sequence_length 8 --num_validation_images 1 --validation_steps 100 --validation_inference_steps 2 "
    "--report_to none"
).split()


def write_image_folder(directory: Path, count: int = 6, size: int | tuple[int, int] = 40) -> Path:
    """Crops of scikit-learn's two sample photos (``size``: a side, or width and height), with captions in
    ``metadata.jsonl``."""
    directory.mkdir(parents=True)
    photos = load_sample_images().images
    width, height = (size, size) if isinstance(size, int) else size
    lines = []
    for index in range(count):
        photo = photos[index % 2]
        top, left = 50 * index, 70 * index
        crop = Image.fromarray(photo[top : top + 200, left : left + 200]).resize((width, height), Image.BILINEAR)
        crop.save(directory / f"{index:02d}.png")
        caption = f"{('a temple', 'a flower')[index % 2]}, view {index}"
        lines.append(json.dumps({"file_name": f"{index:02d}.png", "text": caption}))
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def script_env(root: Path, **overrides: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_HOME=str(root / "hf-home"),
        HF_HUB_CACHE=str(root / "hub-cache"),
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        OMP_NUM_THREADS="1",  # tiny models run fastest on one thread on busy machines, and stay deterministic
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    env.update(overrides)
    return env


def start_script(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Start the example in the background, logging to ``cwd / "train.log"`` (a pipe could fill up and stall it)."""
    with open(cwd / "train.log", "w") as log:
        return subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, cwd=cwd, stdout=log, stderr=log)


def finish_script(process: subprocess.Popen, cwd: Path) -> str:
    """Wait for a run and return its log; fail with the log's tail if it exits non-zero."""
    try:
        returncode = process.wait(timeout=600)
    finally:
        process.kill()
    log = (cwd / "train.log").read_text()
    assert returncode == 0, f"exit {returncode}\n{log[-6000:]}"
    return log


def run_script(args: list[str], env: dict[str, str], cwd: Path) -> str:
    return finish_script(start_script(args, env, cwd), cwd)


def load_example(name: str):
    """An example script imported as a module, to run its ``main`` in this process."""
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))
    return importlib.import_module(name)


def run_example(module, argv: list[str]) -> None:
    """``main(parse_args(argv))`` of an example in this process; accelerate's process-wide state is reset after it."""
    try:
        module.main(module.parse_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def training_state(checkpoint: Path) -> dict:
    return read_training_state(checkpoint / "sara_training_state.safetensors")


def assert_same_tensors(a: Path, b: Path) -> None:
    """The two safetensors files hold the same tensors, bitwise."""
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_names"] == b["param_names"]
    for index, entry in a["optimizer"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
    assert a["helper"]["global_step"] == b["helper"]["global_step"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def card_metadata(path: Path) -> dict:
    return ModelCard.load(path).data.to_dict()


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SD: an uninterrupted 4-step run (pushed to the stub Hub) and a run resumed from its step-2 checkpoint.
    SD3: a 2-step run, in the background meanwhile (the runs spend most of their time importing, on one thread)."""
    root = tmp_path_factory.mktemp("train-example")
    sd3_root = root / "sd3"
    sd3_root.mkdir()
    sd3_pipeline_dir = tiny_pipelines.build_sd3_pipeline(sd3_root)
    sd3_out = sd3_root / "out"
    sd3_data_dir = write_image_folder(sd3_root / "data", count=4)
    sd3_process = start_script(
        [
            *("--pretrained_model_name_or_path", str(sd3_pipeline_dir), "--train_data_dir", str(sd3_data_dir)),
            *("--output_dir", str(sd3_out), *SD3_ARGS),
        ],
        script_env(sd3_root, HF_HUB_OFFLINE="1"),
        sd3_root,
    )

    try:
        pipeline_dir = tiny_pipelines.build_sd_pipeline(root)
        data_dir = write_image_folder(root / "data")
        common = ["--pretrained_model_name_or_path", BASE_REPO, "--train_data_dir", str(data_dir), *TRAIN_ARGS]
        full_dir, resumed_dir = root / "full", root / "resumed"
        with HubStub(lifetime_s=900) as hub:
            api = HfApi(endpoint=hub.url, token="hf_test")
            api.create_repo(BASE_REPO)
            api.upload_folder(repo_id=BASE_REPO, folder_path=str(pipeline_dir))
            full_log = run_script(
                [
                    *common,
                    "--output_dir",
                    str(full_dir),
                    *VALIDATION_ARGS,
                    "--push_to_hub",
                    "--hub_model_id",
                    PUSHED_REPO,
                    "--export_lora_rank",
                    "full",
                ],
                script_env(root, HF_ENDPOINT=hub.url, HF_TOKEN="hf_test"),
                root,
            )
            pushed = hub.files(PUSHED_REPO)
            unhandled = hub.unhandled_for(PUSHED_REPO.split("/")[0])

        resumed_dir.mkdir()
        shutil.copytree(full_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
        resumed_log = run_script(
            [
                *common,
                "--output_dir",
                str(resumed_dir),
                *"--resume_from_checkpoint latest --checkpoints_total_limit 1".split(),
            ],
            script_env(root, HF_HUB_OFFLINE="1"),  # the base model now comes from the cache the first run filled
            root,
        )
    except BaseException:
        sd3_process.kill()
        raise
    return SimpleNamespace(
        pipeline_dir=pipeline_dir,
        full_dir=full_dir,
        full_log=full_log,
        resumed_dir=resumed_dir,
        resumed_log=resumed_log,
        pushed=pushed,
        unhandled=unhandled,
        sd3_out=sd3_out,
        sd3_log=finish_script(sd3_process, sd3_root),
    )


def test_run_writes_adapter_checkpoints_validation_grids_and_card(runs):
    out = runs.full_dir
    assert {path.name for path in (out / "unet").iterdir()} == ADAPTER_FILES
    for step in (2, 4):  # adapter-only checkpoints, one folder per trained component: no copy of the base model
        assert [path.name for path in (out / f"checkpoint-{step}").iterdir()] == ["unet"]
        assert {path.name for path in (out / f"checkpoint-{step}" / "unet").iterdir()} == CHECKPOINT_FILES
    config = json.loads((out / "unet" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SARA" and config["base_model_name_or_path"] == BASE_REPO
    assert config["progressive_fraction"] == 0.5 and config["lambda_rank"] == 1e-3

    for name in ("step-2", "step-4", "final"):
        assert pixels(out / f"validation-{name}.png").shape == (32, 32, 3)
    # The final grid comes from a fresh pipeline with the saved adapter loaded: it matches the in-training one.
    np.testing.assert_array_equal(pixels(out / "validation-final.png"), pixels(out / "validation-step-4.png"))

    metadata = card_metadata(out / "README.md")
    assert metadata["library_name"] == "peft"
    assert metadata["base_model"] == BASE_REPO and metadata["base_model_relation"] == "adapter"
    assert {"sara", "peft-sara", "diffusers", "text-to-image"} <= set(metadata["tags"])
    text = (out / "README.md").read_text()
    assert "## How to use" in text and "import peft_sara" in text and f'"{PUSHED_REPO}"' in text
    assert "## Training" in text and "4 steps" in text and "validation-final.png" in text

    # The default learning rate is the paper's fit for the threshold, and the run says so.
    assert "paper_learning_rate(0.002)" in runs.full_log
    state = training_state(out / "checkpoint-2" / "unet")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * np.exp(-350 * 2e-3))
    assert state["helper"]["global_step"] == 2 and state["helper"]["reselected"] is True


def test_push_to_hub_uploads_the_adapter_card_and_grids_but_no_checkpoints(runs):
    assert set(runs.pushed) == {
        "README.md",
        "unet/adapter_config.json",
        "unet/adapter_model.safetensors",
        LORA_FILE,
        "validation-step-2.png",
        "validation-step-4.png",
        "validation-final.png",
    }
    assert (
        runs.pushed["unet/adapter_model.safetensors"]
        == (runs.full_dir / "unet" / "adapter_model.safetensors").read_bytes()
    )
    assert not runs.unhandled


def test_saved_adapter_loads_into_a_fresh_unet_with_peft_and_changes_its_outputs(runs):
    adapter_dir = runs.full_dir / "unet"
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    frozen = sum(value.numel() for key, value in saved.items() if "sara_frozen_values" in key)
    assert frozen > 0, "the progressive re-selection at step 2 should have frozen some entries"

    torch.manual_seed(0)
    inputs = {
        "sample": torch.randn(1, 4, 16, 16),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 8, 32),
    }
    unet = UNet2DConditionModel.from_pretrained(runs.pipeline_dir, subfolder="unet").eval()
    with torch.no_grad():
        base = unet(**inputs).sample
        unet.add_adapter(SaRAConfig.from_pretrained(str(adapter_dir)))
        result = set_peft_model_state_dict(unet, saved, adapter_name="default")
        adapted = unet(**inputs).sample
        unet.disable_adapters()
        disabled = unet(**inputs).sample
    assert not result.unexpected_keys
    assert not [key for key in result.missing_keys if "sara_" in key]
    # The state dict holds the live entries (a re-selected layer's Parameter keeps its capacity, with an inert tail).
    loaded = {name: value for name, value in unet.state_dict().items() if "sara_values" in name}
    assert {name.replace(".default", "") for name in loaded} <= set(saved)
    assert all(torch.equal(value, saved[name.replace(".default", "")]) for name, value in loaded.items())
    assert (adapted - base).abs().max() > 1e-6
    torch.testing.assert_close(disabled, base, rtol=0, atol=0)


def test_resuming_from_the_step_2_checkpoint_reproduces_the_uninterrupted_run_bitwise(runs):
    assert "Resumed from" in runs.resumed_log and "at step 2" in runs.resumed_log
    # --checkpoints_total_limit 1 removed the checkpoint it resumed from once it saved step 4.
    assert sorted(path.name for path in runs.resumed_dir.glob("checkpoint-*")) == ["checkpoint-4"]

    assert_same_tensors(
        runs.full_dir / "unet" / "adapter_model.safetensors", runs.resumed_dir / "unet" / "adapter_model.safetensors"
    )
    full_state = training_state(runs.full_dir / "checkpoint-4" / "unet")
    assert_same_optimizer_state(full_state, training_state(runs.resumed_dir / "checkpoint-4" / "unet"))
    assert full_state["helper"]["global_step"] == 4


def test_lora_export_loads_with_load_lora_weights_and_reproduces_the_sara_adapter(runs):
    sara = StableDiffusionPipeline.from_pretrained(runs.pipeline_dir)
    peft_sara.load_sara_adapter(sara, runs.full_dir)
    lora = StableDiffusionPipeline.from_pretrained(runs.pipeline_dir)
    lora.load_lora_weights(runs.full_dir)  # finds pytorch_lora_weights.safetensors, as for diffusers' LoRA scripts
    assert lora.get_list_adapters() == {"unet": ["default_0"]}
    base = tiny_pipelines.generate(StableDiffusionPipeline.from_pretrained(runs.pipeline_dir))
    adapted = tiny_pipelines.generate(sara)
    assert np.abs(adapted - base).max() > 1e-3
    np.testing.assert_allclose(tiny_pipelines.generate(lora), adapted, rtol=0, atol=1e-4)
    card = (runs.full_dir / "README.md").read_text()
    assert "## LoRA export" in card and "load_lora_weights" in card


def test_sd3_run_trains_the_transformer_with_flow_matching(runs):
    out = runs.sd3_out
    assert {path.name for path in (out / "transformer").iterdir()} == ADAPTER_FILES
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert pixels(out / "validation-final.png").shape == (32, 32, 3)
    assert card_metadata(out / "README.md")["library_name"] == "peft"

    # A learning rate given by the user is used as is.
    assert "Learning rate 0.0001 (from --learning_rate)" in runs.sd3_log
    state = training_state(out / "checkpoint-2" / "transformer")
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-4
    values = load_file(out / "transformer" / "adapter_model.safetensors")
    assert any(value.abs().sum() > 0 for key, value in values.items() if "sara_values" in key)


# ----------------------------------------------------------------------------------------------------- SDXL, in process
SDXL_PROMPT = "dusk temple"


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, one_thread):
    """SDXL: 3 steps on 4 non-square images (so the size/crop conditioning varies), both text encoders trained too,
    Min-SNR weighting, offset noise, a scaled learning rate, validation after every epoch, an exact LoRA export."""
    root = tmp_path_factory.mktemp("train-sdxl")
    pipeline_dir = tiny_pipelines.build_sdxl_pipeline(root)
    out = root / "out"
    argv = [
        *("--pretrained_model_name_or_path", str(pipeline_dir), "--output_dir", str(out)),
        *("--train_data_dir", str(write_image_folder(root / "data", count=4, size=(60, 40)))),
        *("--cache_dir", str(root / "cache"), "--validation_prompt", SDXL_PROMPT),
        *"--resolution 32 --random_flip --train_batch_size 2 --max_train_steps 3 --checkpointing_steps 3".split(),
        *"--trainable_fraction 0.05 --learning_rate 1e-3 --text_encoder_lr 5e-4 --scale_lr".split(),
        "--train_text_encoder",
        *"--snr_gamma 5 --noise_offset 0.05 --lambda_rank 1e-3 --rank_min_dim 16 --report_to none".split(),
        *"--num_validation_images 1 --validation_epochs 1 --validation_inference_steps 2".split(),
        *("--export_lora_rank", "full"),
    ]
    run_example(load_example("train_text_to_image_sara"), argv)
    return SimpleNamespace(pipeline_dir=pipeline_dir, out=out)


def test_sdxl_run_trains_the_unet_and_both_text_encoders_with_a_scaled_learning_rate(sdxl_run):
    out = sdxl_run.out
    components = ("unet", "text_encoder", "text_encoder_2")
    for name in components:
        assert {path.name for path in (out / name).iterdir()} == ADAPTER_FILES
        values = load_file(out / name / "adapter_model.safetensors")
        assert any(value.abs().sum() > 0 for key, value in values.items() if "sara_values" in key), name
    assert sorted(path.name for path in (out / "checkpoint-3").iterdir()) == sorted(components)
    # --scale_lr: x batch size 2 (one process, no accumulation); text encoders take --text_encoder_lr.
    assert training_state(out / "checkpoint-3" / "unet")["optimizer"]["param_groups"][0]["lr"] == 2e-3
    assert training_state(out / "checkpoint-3" / "text_encoder_2")["optimizer"]["param_groups"][0]["lr"] == 1e-3
    # 4 images, batch 2: 2 steps per epoch, so epochs 0 and 1; the final grid comes from a fresh pipeline.
    assert {path.name for path in out.glob("validation-*.png")} == {
        "validation-epoch-0.png",
        "validation-epoch-1.png",
        "validation-final.png",
    }
    np.testing.assert_array_equal(pixels(out / "validation-final.png"), pixels(out / "validation-epoch-1.png"))


def test_sdxl_lora_export_loads_with_load_lora_weights_into_unet_and_both_text_encoders(sdxl_run):
    sara = StableDiffusionXLPipeline.from_pretrained(sdxl_run.pipeline_dir)
    peft_sara.load_sara_adapter(sara, sdxl_run.out)
    lora = StableDiffusionXLPipeline.from_pretrained(sdxl_run.pipeline_dir)
    lora.load_lora_weights(sdxl_run.out)
    assert set(lora.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    base = tiny_pipelines.generate(StableDiffusionXLPipeline.from_pretrained(sdxl_run.pipeline_dir))
    adapted = tiny_pipelines.generate(sara)
    assert np.abs(adapted - base).max() > 1e-3
    np.testing.assert_allclose(tiny_pipelines.generate(lora), adapted, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------- Flux, in process
@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, one_thread):
    """Flux: 2 steps of flow matching on packed latents with the guidance embedding, validation, exact LoRA export."""
    root = tmp_path_factory.mktemp("train-flux")
    pipeline_dir = tiny_pipelines.build_flux_pipeline(root)
    out = root / "out"
    argv = [
        *("--pretrained_model_name_or_path", str(pipeline_dir), "--output_dir", str(out)),
        *("--train_data_dir", str(write_image_folder(root / "data", count=2)), "--cache_dir", str(root / "cache")),
        *("--validation_prompt", PROMPT, "--max_sequence_length", "8", "--guidance_scale", "3.5"),
        *"--resolution 32 --center_crop --train_batch_size 2 --max_train_steps 2 --checkpointing_steps 2".split(),
        *"--trainable_fraction 0.05 --learning_rate 1e-3 --report_to none --num_validation_images 1".split(),
        *"--validation_steps 2 --validation_inference_steps 2 --export_lora_rank full".split(),
    ]
    run_example(load_example("train_text_to_image_sara"), argv)
    return SimpleNamespace(pipeline_dir=pipeline_dir, out=out)


def test_flux_run_trains_the_transformer_and_its_lora_export_loads_with_load_lora_weights(flux_run):
    out = flux_run.out
    assert {path.name for path in (out / "transformer").iterdir()} == ADAPTER_FILES
    assert [path.name for path in (out / "checkpoint-2").iterdir()] == ["transformer"]
    np.testing.assert_array_equal(pixels(out / "validation-final.png"), pixels(out / "validation-step-2.png"))

    sara = FluxPipeline.from_pretrained(flux_run.pipeline_dir)
    base = tiny_pipelines.generate(sara)
    peft_sara.load_sara_adapter(sara, out)
    adapted = tiny_pipelines.generate(sara)
    lora = FluxPipeline.from_pretrained(flux_run.pipeline_dir)
    lora.load_lora_weights(out)
    assert np.abs(adapted - base).max() > 1e-4
    np.testing.assert_allclose(tiny_pipelines.generate(lora), adapted, rtol=0, atol=1e-4)


@pytest.mark.parametrize("flag", ["snr_gamma", "noise_offset", "prediction_type"])
def test_ddpm_only_flags_are_refused_for_flow_matching_models(flux_run, flag):
    args = argparse.Namespace(snr_gamma=None, noise_offset=0.0, prediction_type=None)
    setattr(args, flag, "epsilon" if flag == "prediction_type" else 0.1)
    with pytest.raises(ValueError, match=f"--{flag} applies to DDPM models.*--weighting_scheme"):
        load_example("sara_models").noise_scheduler_for(args, FluxPipeline.from_pretrained(flux_run.pipeline_dir))


# ----------------------------------------------------------------------------------------------- script building blocks
def test_sdxl_time_ids_carry_original_size_and_crop_and_follow_flips():
    data, losses = load_example("sara_data"), load_example("sara_losses")
    args = argparse.Namespace(resolution=32, center_crop=False, image_interpolation_mode="bilinear", random_flip=True)
    image = Image.new("RGB", (60, 40))  # resized to 48 x 32: 16 columns to crop from
    torch.manual_seed(0)
    items = [data.resize_and_crop(image, args) for _ in range(8)]
    batch = data.collate_images([{**item, "caption": "x"} for item in items])
    lefts = [left for _, left in batch["crop_top_lefts"]]
    assert len(set(lefts)) > 1 and all(0 <= left <= 16 for left in lefts)
    torch.manual_seed(1)
    flipped = torch.rand(8) < 0.5
    torch.manual_seed(1)
    data.random_flip(batch, args)
    assert 0 < int(flipped.sum()) < 8
    time_ids = losses.sdxl_time_ids(batch, 32, torch.device("cpu"), torch.float32)
    expected = [[40, 60, 0, 16 - left if flip else left, 32, 32] for left, flip in zip(lefts, flipped.tolist())]
    assert time_ids.tolist() == expected


def test_min_snr_weighting_and_offset_noise_change_the_ddpm_loss_as_diffusers_does():
    losses = load_example("sara_losses")
    unet, inputs = tiny_unet(), unet_inputs(batch=4)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    conditioning = {"encoder_hidden_states": inputs["encoder_hidden_states"]}

    def loss(snr_gamma=None, noise_offset=0.0):
        args = argparse.Namespace(snr_gamma=snr_gamma, noise_offset=noise_offset)
        torch.manual_seed(0)
        with torch.no_grad():
            return losses.ddpm_loss(unet, scheduler, inputs["sample"], conditioning, args)

    plain = loss()
    torch.manual_seed(0)
    torch.randn_like(inputs["sample"])
    timesteps = torch.randint(0, 1000, (4,))
    snr = (scheduler.alphas_cumprod[timesteps] / (1 - scheduler.alphas_cumprod[timesteps])).float()
    torch.testing.assert_close(loss(snr_gamma=5.0), plain * torch.clamp(snr, max=5.0) / snr)
    torch.testing.assert_close(loss(snr_gamma=1e9), plain)  # gamma above every SNR: plain MSE
    assert not torch.allclose(loss(noise_offset=0.1), plain)


def test_checkpoints_hold_one_adapter_only_folder_per_component_and_leave_save_pretrained_alone(tmp_path):
    components = []
    for name, model in (("unet", tiny_unet()), ("text_encoder", tiny_clip_text())):
        optimizer = torch.optim.AdamW(add_sara_adapter(model, SaRAConfig()))
        helper = SaRATrainingHelper(model, optimizer, total_steps=4)
        components.append(TrainedComponent(name, model, optimizer, None, helper))
    save_pretrained = components[0].model.save_pretrained

    save_training_checkpoint(str(tmp_path / "checkpoint-1"), components)
    assert sorted(path.name for path in (tmp_path / "checkpoint-1").iterdir()) == ["text_encoder", "unet"]
    for name in ("unet", "text_encoder"):
        assert {path.name for path in (tmp_path / "checkpoint-1" / name).iterdir()} == CHECKPOINT_FILES
    assert components[0].model.save_pretrained == save_pretrained
    with pytest.raises(FileNotFoundError, match="did not train text_encoder_2"):
        components[1].name = "text_encoder_2"
        resume_from_checkpoint(str(tmp_path / "checkpoint-1"), components)


# -------------------------------------------------------------------------------------------------------------- flags
REQUIRED_ARGS = {
    "train_text_to_image_sara": ["--pretrained_model_name_or_path", "x", "--train_data_dir", "d"],
    "train_dreambooth_sara": [
        "--pretrained_model_name_or_path",
        "x",
        "--instance_data_dir",
        "d",
        "--instance_prompt",
        "p",
    ],
    "train_motion_sara": ["--pretrained_model_name_or_path", "x", "--train_data_dir", "d"],
}


@pytest.mark.parametrize("name", sorted(REQUIRED_ARGS))
@pytest.mark.parametrize(
    "flag, says",
    [
        (["--rank", "4"], ["SaRA has no rank", "--threshold", "--trainable_fraction", "--export_lora_rank"]),
        (["--rank=16"], ["SaRA has no rank"]),
        (["--lora_dropout", "0.1"], ["--lambda_rank"]),
        (["--use_dora"], ["DoRA is a LoRA variant"]),
        (["--output_kohya_format"], ["peft-sara export", "--format kohya"]),
        (["--export_lora_rank", "0"], ["Invalid rank"]),
    ],
)
def test_lora_only_flags_stop_with_a_message_saying_what_to_use_instead(name, flag, says, capsys):
    with pytest.raises(SystemExit):
        load_example(name).parse_args([*REQUIRED_ARGS[name], *flag])
    error = capsys.readouterr().err
    assert "ambiguous" not in error
    for text in says:
        assert text in error


def test_lora_script_flags_with_a_sara_meaning_parse(capsys):
    script = load_example("train_text_to_image_sara")
    args = script.parse_args(
        [
            *REQUIRED_ARGS["train_text_to_image_sara"],
            *"--snr_gamma 5 --noise_offset 0.1 --scale_lr --validation_epochs 2 --lr_num_cycles 3 --lr_power 2".split(),
            *"--image_interpolation_mode bicubic --pretrained_vae_model_name_or_path v --local_rank 0".split(),
            *"--train_text_encoder --text_encoder_lr 1e-5 --export_lora_rank 0.99".split(),
        ]
    )
    assert args.snr_gamma == 5 and args.noise_offset == 0.1 and args.scale_lr and args.validation_epochs == 2
    assert args.validation_steps is None  # epochs only, as asked
    assert args.export_lora_rank == 0.99 and script.parse_args(REQUIRED_ARGS[script.__name__]).validation_steps == 100


def test_threshold_and_trainable_fraction_are_mutually_exclusive(capsys):
    script = load_example("train_text_to_image_sara")
    required = REQUIRED_ARGS["train_text_to_image_sara"]
    with pytest.raises(SystemExit):
        script.parse_args([*required, "--threshold", "1e-3", "--trainable_fraction", "0.1"])
    assert "not allowed with argument" in capsys.readouterr().err
    args = script.parse_args([*required, "--trainable_fraction", "0.1", "--rank_layers_per_step", "all"])
    assert args.threshold is None and args.learning_rate is None and args.rank_layers_per_step == "all"


def test_xformers_flag_says_what_is_missing_before_loading_anything(tmp_path):
    script = load_example("train_text_to_image_sara")
    argv = [*REQUIRED_ARGS["train_text_to_image_sara"], "--output_dir", str(tmp_path), "--report_to", "none"]
    with pytest.raises(ValueError, match="xformers"):
        run_example(script, [*argv, "--enable_xformers_memory_efficient_attention"])
    assert not any(tmp_path.iterdir())


def test_a_missing_optional_dependency_stops_at_parsing_with_the_install_command(monkeypatch, capsys):
    import importlib.util

    script = load_example("train_text_to_image_sara")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else find_spec(name, *a)
    )
    with pytest.raises(SystemExit):
        script.parse_args(REQUIRED_ARGS["train_text_to_image_sara"])
    err = capsys.readouterr().err
    assert "pip install datasets" in err and "peft-sara[examples]" in err


def test_a_local_base_is_recorded_as_an_absolute_path_and_a_hub_id_as_given(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    assert recorded_base_model("base") == str(tmp_path / "base")
    assert recorded_base_model("org/tiny-sd") == "org/tiny-sd"
