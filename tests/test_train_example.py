"""End-to-end runs of ``examples/train_text_to_image_sara.py`` on tiny pipelines, in subprocesses, as a user runs it.

The SD run takes its base model by Hub id from a local stub of the Hub API (``hub_stub.HubStub``, 127.0.0.1 only) and
pushes the result there; the resumed run loads the same id from the cache with ``HF_HUB_OFFLINE=1``. A two-step SD3
run (flow matching, transformer) goes on in the background meanwhile. Data is a tiny image folder with
``metadata.jsonl``, the paper's dataset layout.
"""

from __future__ import annotations

import importlib.util
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
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from safetensors.torch import load_file

import peft_sara  # noqa: F401  (registers the method)

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
SCRIPT = REPO_ROOT / "examples" / "train_text_to_image_sara.py"
sys.path.insert(0, str(TESTS_DIR))  # helper modules beside this file, with or without tests/__init__.py
import tiny_pipelines  # noqa: E402
from hub_stub import HubStub  # noqa: E402

pytestmark = pytest.mark.slow

BASE_REPO = "org/tiny-sd"
PUSHED_REPO = "org/sara-tiny-sd"
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
CHECKPOINT_FILES = ADAPTER_FILES | {"sara_training_state.pt"}
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


def write_image_folder(directory: Path, count: int = 6, size: int = 40) -> Path:
    """Square crops of scikit-learn's two sample photos, with captions in ``metadata.jsonl``."""
    from sklearn.datasets import load_sample_images

    directory.mkdir(parents=True)
    photos = load_sample_images().images
    lines = []
    for index in range(count):
        photo = photos[index % 2]
        top, left = 50 * index, 70 * index
        crop = Image.fromarray(photo[top : top + 200, left : left + 200]).resize((size, size), Image.BILINEAR)
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
                ],
                script_env(root, HF_ENDPOINT=hub.url, HF_TOKEN="hf_test"),
                root,
            )
            pushed = hub.files(PUSHED_REPO)
            unhandled = list(hub.unhandled)

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
    for step in (2, 4):  # adapter-only checkpoints: no copy of the base model
        assert {path.name for path in (out / f"checkpoint-{step}").iterdir()} == CHECKPOINT_FILES
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
    state = torch.load(out / "checkpoint-2" / "sara_training_state.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * np.exp(-350 * 2e-3))
    assert state["helper"]["global_step"] == 2 and state["helper"]["reselected"] is True


def test_push_to_hub_uploads_the_adapter_card_and_grids_but_no_checkpoints(runs):
    assert set(runs.pushed) == {
        "README.md",
        "unet/adapter_config.json",
        "unet/adapter_model.safetensors",
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
    from diffusers import UNet2DConditionModel
    from peft import set_peft_model_state_dict

    from peft_sara import SaRAConfig

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

    full = load_file(runs.full_dir / "unet" / "adapter_model.safetensors")
    resumed = load_file(runs.resumed_dir / "unet" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key

    full_state = torch.load(runs.full_dir / "checkpoint-4" / "sara_training_state.pt", weights_only=False)
    resumed_state = torch.load(runs.resumed_dir / "checkpoint-4" / "sara_training_state.pt", weights_only=False)
    assert full_state["param_names"] == resumed_state["param_names"]
    for index, entry in full_state["optimizer"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, resumed_state["optimizer"]["state"][index][name]), (index, name)
    assert full_state["helper"]["global_step"] == resumed_state["helper"]["global_step"] == 4
    assert torch.equal(full_state["rng"]["torch"], resumed_state["rng"]["torch"])


def test_sd3_run_trains_the_transformer_with_flow_matching(runs):
    out = runs.sd3_out
    assert {path.name for path in (out / "transformer").iterdir()} == ADAPTER_FILES
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert pixels(out / "validation-final.png").shape == (32, 32, 3)
    assert card_metadata(out / "README.md")["library_name"] == "peft"

    # A learning rate given by the user is used as is.
    assert "Learning rate 0.0001 (from --learning_rate)" in runs.sd3_log
    state = torch.load(out / "checkpoint-2" / "sara_training_state.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-4
    values = load_file(out / "transformer" / "adapter_model.safetensors")
    assert any(value.abs().sum() > 0 for key, value in values.items() if "sara_values" in key)


@pytest.fixture(scope="module")
def script():
    """The example imported as a module, for its helpers."""
    spec = importlib.util.spec_from_file_location("train_text_to_image_sara", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoints_are_adapter_only_and_leave_the_models_save_pretrained_alone(script, tmp_path):
    from diffusers import UNet2DConditionModel

    from peft_sara import SaRAConfig
    from peft_sara.training import SaRATrainingHelper

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    unet.add_adapter(SaRAConfig(), adapter_name=script.ADAPTER_NAME)
    save_pretrained = unet.save_pretrained
    optimizer = torch.optim.AdamW([param for param in unet.parameters() if param.requires_grad])
    helper = SaRATrainingHelper(unet, optimizer, total_steps=4)

    script.save_checkpoint(str(tmp_path / "checkpoint-1"), unet, optimizer, None, helper)
    assert {path.name for path in (tmp_path / "checkpoint-1").iterdir()} == CHECKPOINT_FILES
    assert unet.save_pretrained == save_pretrained


def test_threshold_and_trainable_fraction_are_mutually_exclusive(script, capsys):
    required = ["--pretrained_model_name_or_path", "x", "--train_data_dir", "d"]
    with pytest.raises(SystemExit):
        script.parse_args([*required, "--threshold", "1e-3", "--trainable_fraction", "0.1"])
    assert "not allowed with argument" in capsys.readouterr().err
    args = script.parse_args([*required, "--trainable_fraction", "0.1", "--rank_layers_per_step", "all"])
    assert args.threshold is None and args.learning_rate is None and args.rank_layers_per_step == "all"
