"""The public building blocks of ``peft_sara.training`` that training scripts use on pipeline components: adapters
with their optimizer-ready parameters, a run's checkpoint folders (save, resume, keep the newest), and the adapter
saved and exported at the end."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import peft_sara
from peft_sara import SaRAConfig
from peft_sara.training import (
    SaRATrainingHelper,
    TrainedComponent,
    add_sara_adapter,
    checkpoint_folder,
    checkpoint_steps,
    latest_checkpoint,
    remove_old_checkpoints,
    resume_from_checkpoint,
    sara_layers,
    save_trained_adapter,
    save_training_checkpoint,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_pipelines  # noqa: E402
from conftest import tiny_clip_text, tiny_unet, unet_inputs  # noqa: E402


def sara_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.sara_values["default"].detach().clone() for name, layer in sara_layers(model)}


def unet_component(name: str = "unet") -> TrainedComponent:
    unet = tiny_unet()
    optimizer = torch.optim.AdamW(add_sara_adapter(unet, SaRAConfig(trainable_fraction=0.1)), lr=1e-2)
    helper = SaRATrainingHelper(unet, optimizer, total_steps=4)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return TrainedComponent(name, unet, optimizer, lr_scheduler, helper)


def train_step(component: TrainedComponent) -> None:
    component.model(**unet_inputs()).sample.square().mean().backward()
    component.optimizer.step()
    component.lr_scheduler.step()
    component.optimizer.zero_grad()
    component.helper.step()


def test_add_sara_adapter_returns_float32_trainable_values_and_freezes_the_half_precision_base():
    for model in (tiny_unet().half(), tiny_clip_text().half()):
        params = add_sara_adapter(model, SaRAConfig(trainable_fraction=0.1))
        assert params and params == [param for param in model.parameters() if param.requires_grad]
        assert all(param.dtype == torch.float32 for param in params)
        names = {id(param): name for name, param in model.named_parameters()}
        assert all("sara_values" in names[id(param)] for param in params)
        assert all(layer.get_base_layer().weight.dtype == torch.float16 for _, layer in sara_layers(model))


def test_add_sara_adapter_keeps_the_values_dtype_when_asked():
    params = add_sara_adapter(tiny_unet().half(), SaRAConfig(trainable_fraction=0.1), trainable_dtype=None)
    assert {param.dtype for param in params} <= {torch.float16, torch.float32}


def test_checkpoint_folders_are_listed_by_step_and_only_the_newest_are_kept(tmp_path):
    assert checkpoint_steps(tmp_path / "missing") == [] and latest_checkpoint(tmp_path) is None
    for step in (10, 2, 300):
        Path(checkpoint_folder(tmp_path, step)).mkdir()
    (tmp_path / "checkpoint-final").mkdir()  # not a step: left alone
    assert checkpoint_steps(tmp_path) == [2, 10, 300]
    assert latest_checkpoint(tmp_path) == checkpoint_folder(tmp_path, 300)
    assert remove_old_checkpoints(tmp_path, keep=2) == [checkpoint_folder(tmp_path, 2)]
    assert remove_old_checkpoints(tmp_path, keep=5) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-300", "checkpoint-final"]


def test_resume_from_checkpoint_restores_adapter_optimizer_scheduler_and_helper_of_every_component(tmp_path):
    components = [unet_component("unet"), unet_component("unet_2")]
    for component in components:
        train_step(component)
    saved = [sara_values(component.model) for component in components]
    saved_moments = [
        [state["exp_avg"].clone() for state in component.optimizer.state.values()] for component in components
    ]
    save_training_checkpoint(checkpoint_folder(tmp_path, 1), components)
    for component in components:
        train_step(component)
        assert component.helper.global_step == 2

    resume_from_checkpoint(checkpoint_folder(tmp_path, 1), components)
    for component, values, moments in zip(components, saved, saved_moments):
        resumed = sara_values(component.model)
        assert all(torch.equal(resumed[name], values[name]) for name in values)
        assert all(torch.equal(a["exp_avg"], b) for a, b in zip(component.optimizer.state.values(), moments))
        assert component.helper.global_step == 1 and component.lr_scheduler.last_epoch == 1


def test_resume_from_checkpoint_refuses_a_component_the_checkpoint_lacks_before_loading_any(tmp_path):
    component = unet_component("unet")
    train_step(component)
    save_training_checkpoint(checkpoint_folder(tmp_path, 1), [component])
    train_step(component)
    before = sara_values(component.model)
    with pytest.raises(FileNotFoundError, match="no 'text_encoder' subfolder"):
        resume_from_checkpoint(checkpoint_folder(tmp_path, 1), [component, unet_component("text_encoder")])
    after = sara_values(component.model)
    assert all(torch.equal(after[name], before[name]) for name in before) and component.helper.global_step == 2


def test_save_trained_adapter_writes_peft_folders_and_a_lora_that_reproduce_the_trained_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipeline_dir = tiny_pipelines.build_sd_pipeline(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    torch.manual_seed(0)
    add_sara_adapter(pipe.unet, SaRAConfig(trainable_fraction=0.1, init_weights=False))
    trained = tiny_pipelines.generate(pipe)

    export = save_trained_adapter(pipe, tmp_path / "out", ["unet"], base_model="org/base", export_lora_rank="full")
    assert (tmp_path / "out" / "unet" / "adapter_config.json").is_file() and (tmp_path / "out" / "README.md").is_file()
    assert export is not None and export.paths[0].name == "pytorch_lora_weights.safetensors"
    assert save_trained_adapter(pipe, tmp_path / "plain", ["unet"]) is None

    loaded = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    peft_sara.load_sara_adapter(loaded, tmp_path / "out")
    np.testing.assert_allclose(tiny_pipelines.generate(loaded), trained, rtol=0, atol=1e-6)
    lora = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    lora.load_lora_weights(tmp_path / "out")
    np.testing.assert_allclose(tiny_pipelines.generate(lora), trained, rtol=0, atol=1e-4)
