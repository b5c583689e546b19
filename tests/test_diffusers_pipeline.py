"""SaRA adapters in diffusers pipelines: save / load, and diffusers' own adapter API driving SaRA layers.

Every pipeline is tiny, built from configs, saved to disk and loaded back with ``from_pretrained`` (no downloads).
Adapters are random (``init_weights=False``), so "with adapter" and "base" images differ visibly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import peft_sara
from peft_sara.pipelines import load_sara_adapter, save_sara_adapter
from peft_sara.tuner.layer import SaRALayer

sys.path.insert(0, os.path.dirname(__file__))  # helper modules beside this file, with or without tests/__init__.py
import tiny_pipelines  # noqa: E402
from tiny_pipelines import generate  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SAME = {"rtol": 0, "atol": 1e-6}  # same weights, same ops: equal up to float noise
FUSED = {"rtol": 0, "atol": 1e-4}  # fused vs. patched-on-the-fly


def load_sd(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path)


def sara_layers(module):
    return [layer for layer in module.modules() if isinstance(layer, SaRALayer)]


def base_weights(module):
    """Every parameter except the SaRA values, cloned, named as in the plain model (without ``.base_layer``)."""
    return {
        name.replace(".base_layer", ""): p.detach().clone()
        for name, p in module.named_parameters()
        if "sara_" not in name
    }


def assert_weights_equal(module, expected):
    current = base_weights(module)
    assert current.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(current[name], tensor), name


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A saved tiny SD pipeline, base images, and a SaRA adapter on unet + text_encoder saved with save_sara_adapter."""
    root = tmp_path_factory.mktemp("sd")
    pipeline_dir = tiny_pipelines.build_sd_pipeline(root)
    pipe = load_sd(pipeline_dir)
    base = generate(pipe)
    tiny_pipelines.add_random_sara_adapter(pipe, "style", components=("unet", "text_encoder"))
    adapted = generate(pipe)
    adapter_dir = save_sara_adapter(pipe, root / "sara-style", base_model="org/tiny-sd")
    assert not np.allclose(adapted, base, atol=1e-3), "the random adapter should change the images"
    return SimpleNamespace(pipeline_dir=pipeline_dir, adapter_dir=adapter_dir, base=base, adapted=adapted, root=root)


@pytest.fixture
def pipe(sd):
    return load_sd(sd.pipeline_dir)


# ------------------------------------------------------------------------------------------------- saving
def test_save_writes_one_folder_per_component_and_a_card(sd):
    files = sorted(str(p.relative_to(sd.adapter_dir)) for p in sd.adapter_dir.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "text_encoder/adapter_config.json",
        "text_encoder/adapter_model.safetensors",
        "unet/adapter_config.json",
        "unet/adapter_model.safetensors",
    ]
    for component in ("unet", "text_encoder"):
        config = json.loads((sd.adapter_dir / component / "adapter_config.json").read_text())
        assert config["peft_type"] == "SARA"
        assert config["base_model_name_or_path"] == "org/tiny-sd"
        assert config["inference_mode"] is True
    card = (sd.adapter_dir / "README.md").read_text()
    assert "base_model: org/tiny-sd" in card and "import peft_sara" in card and "load_sara_adapter" in card


def test_save_without_adapter_name_needs_exactly_one_adapter(pipe, tmp_path):
    with pytest.raises(ValueError, match="no SaRA adapter"):
        save_sara_adapter(pipe, tmp_path / "none")


# ------------------------------------------------------------------------------------------------- loading
def test_loaded_adapter_reproduces_the_saving_pipeline(sd, pipe):
    name = load_sara_adapter(pipe, sd.adapter_dir)
    assert name == "default_0"  # diffusers' name for an adapter loaded without one
    assert pipe.get_list_adapters() == {"unet": ["default_0"], "text_encoder": ["default_0"]}
    assert pipe.get_active_adapters() == ["default_0"]
    pipe.set_adapters("default_0")
    # Components stay diffusers / transformers models, so the pipeline can still save and load them.
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    np.testing.assert_allclose(generate(pipe), sd.adapted, **SAME)


def test_a_loaded_unet_answers_diffusers_model_adapter_api(sd, pipe):
    # Injected through the UNet's own `add_adapter`, so diffusers knows it holds adapters.
    name = load_sara_adapter(pipe, sd.adapter_dir, components=["unet"])
    assert pipe.unet.active_adapters() == [name]
    assert not any(p.requires_grad for n, p in pipe.unet.named_parameters() if "sara_" in n)  # loaded for inference
    adapted = generate(pipe)
    pipe.unet.disable_adapters()
    assert np.array_equal(generate(pipe), sd.base)
    pipe.unet.enable_adapters()
    pipe.unet.set_adapter(name)
    assert np.array_equal(generate(pipe), adapted)


def test_load_runs_no_selection_the_files_name_the_entries(sd, pipe, monkeypatch):
    from peft_sara.tuner import layer as layer_module

    def refuse(*args, **kwargs):
        raise AssertionError("load_sara_adapter ran the selection")

    monkeypatch.setattr(layer_module, "select_trainable_indices", refuse)
    load_sara_adapter(pipe, sd.adapter_dir)
    np.testing.assert_allclose(generate(pipe), sd.adapted, **SAME)


def test_fuse_matches_unfused_images_and_unfuse_restores_weights_bitwise(sd, pipe):
    before = {"unet": base_weights(pipe.unet), "text_encoder": base_weights(pipe.text_encoder)}
    load_sara_adapter(pipe, sd.adapter_dir, adapter_name="style")
    pipe.fuse_lora()
    assert pipe.num_fused_loras == 1
    assert all(layer.merged for layer in sara_layers(pipe.unet) + sara_layers(pipe.text_encoder))
    np.testing.assert_allclose(generate(pipe), sd.adapted, **FUSED)
    pipe.unfuse_lora()
    assert pipe.num_fused_loras == 0
    for component in ("unet", "text_encoder"):
        for layer in sara_layers(getattr(pipe, component)):
            assert not layer.merged
    # Unmerging writes the saved base entries back: the base weights are bitwise the ones before loading.
    assert_weights_equal(pipe.unet, before["unet"])
    assert_weights_equal(pipe.text_encoder, before["text_encoder"])


def test_load_with_fuse_true_bakes_the_adapter_in(sd, pipe):
    before = {"unet": base_weights(pipe.unet), "text_encoder": base_weights(pipe.text_encoder)}
    name = load_sara_adapter(pipe, sd.adapter_dir, fuse=True)
    assert pipe.num_fused_loras == 1 and pipe.fused_loras == {name}  # diffusers' own record, from its fuse_lora
    np.testing.assert_allclose(generate(pipe), sd.adapted, **FUSED)
    pipe.unfuse_lora(components=["unet", "text_encoder"])
    assert pipe.num_fused_loras == 0
    assert_weights_equal(pipe.unet, before["unet"])
    assert_weights_equal(pipe.text_encoder, before["text_encoder"])


def test_load_with_fuse_true_refused_in_the_text_encoder_changes_nothing(sd, pipe):
    # Tied weights in the text encoder refuse a merge; the check runs over every component before the UNet fuses.
    attention = next(
        module for name, module in pipe.text_encoder.named_modules() if name.endswith("layers.0.self_attn")
    )
    attention.k_proj.weight = attention.q_proj.weight
    before = {"unet": base_weights(pipe.unet), "text_encoder": base_weights(pipe.text_encoder)}
    with pytest.raises(ValueError, match="Nothing was loaded"):
        load_sara_adapter(pipe, sd.adapter_dir, fuse=True)
    assert pipe.num_fused_loras == 0 and pipe.get_list_adapters() == {}
    assert not sara_layers(pipe.unet) and not sara_layers(pipe.text_encoder)
    assert_weights_equal(pipe.unet, before["unet"])
    assert_weights_equal(pipe.text_encoder, before["text_encoder"])


def test_disable_lora_gives_the_base_images_exactly_and_enable_lora_restores(sd, pipe):
    load_sara_adapter(pipe, sd.adapter_dir)
    pipe.disable_lora()
    assert np.array_equal(generate(pipe), sd.base)
    pipe.enable_lora()
    np.testing.assert_allclose(generate(pipe), sd.adapted, **SAME)


def test_set_adapters_weight_zero_gives_the_base_images_exactly(sd, pipe):
    name = load_sara_adapter(pipe, sd.adapter_dir)
    pipe.set_adapters([name], [0.0])
    assert np.array_equal(generate(pipe), sd.base)
    pipe.set_adapters([name], [1.0])
    np.testing.assert_allclose(generate(pipe), sd.adapted, **SAME)


def test_cross_attention_scale_scales_unet_and_text_encoder_for_one_call(sd, pipe):
    name = load_sara_adapter(pipe, sd.adapter_dir)
    # scale=0 switches the update off in the UNet (cross_attention_kwargs) and the text encoder (lora_scale).
    assert np.array_equal(generate(pipe, cross_attention_kwargs={"scale": 0.0}), sd.base)
    half = generate(pipe, cross_attention_kwargs={"scale": 0.5})
    assert not np.allclose(half, sd.base, atol=1e-4) and not np.allclose(half, sd.adapted, atol=1e-4)
    # The scale applies to one call only, and matches the same strength set persistently.
    pipe.set_adapters([name], [0.5])
    np.testing.assert_allclose(generate(pipe), half, atol=1e-5, rtol=0)
    assert all(layer.sara_scaling[name] == 0.5 for layer in sara_layers(pipe.unet))


def test_load_scale_sets_the_adapter_strength(sd, pipe):
    name = load_sara_adapter(pipe, sd.adapter_dir, scale=0.0)
    assert all(layer.sara_scaling[name] == 0.0 for layer in sara_layers(pipe.unet) + sara_layers(pipe.text_encoder))
    assert np.array_equal(generate(pipe), sd.base)


def test_unload_lora_weights_removes_every_sara_layer(sd, pipe):
    load_sara_adapter(pipe, sd.adapter_dir)
    pipe.unload_lora_weights()
    assert not sara_layers(pipe.unet) and not sara_layers(pipe.text_encoder)
    assert not hasattr(pipe.unet, "peft_config")
    assert np.array_equal(generate(pipe), sd.base)


def test_delete_adapters_and_a_second_adapter_combine_with_set_adapters(sd, pipe):
    first = load_sara_adapter(pipe, sd.adapter_dir, adapter_name="first")
    second = load_sara_adapter(pipe, sd.adapter_dir, adapter_name="second", components=["unet"])
    assert pipe.get_list_adapters() == {"unet": ["first", "second"], "text_encoder": ["first"]}
    # The new adapter becomes the active one where it was loaded.
    assert all(layer.active_adapters == ["second"] for layer in sara_layers(pipe.unet))
    pipe.set_adapters([first, second], [1.0, 0.0])
    np.testing.assert_allclose(generate(pipe), sd.adapted, **SAME)
    pipe.delete_adapters([first, second])
    assert np.array_equal(generate(pipe), sd.base)
    # The names are free again, in the UNet and in the text encoder (whose peft_config diffusers leaves as it was).
    assert "unet" not in pipe.get_list_adapters()  # diffusers removed its peft_config
    assert load_sara_adapter(pipe, sd.adapter_dir, adapter_name=first) == first
    assert pipe.get_list_adapters() == {"unet": [first], "text_encoder": [first]}
    np.testing.assert_allclose(generate(pipe), sd.adapted, **SAME)


def test_fuse_unload_save_pretrained_writes_the_fused_pipeline(sd, pipe, tmp_path):
    # diffusers' LoRA convention for a merged model: fuse, unload the adapter layers, save.
    load_sara_adapter(pipe, sd.adapter_dir, adapter_name="style")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert not sara_layers(pipe.unet) and not sara_layers(pipe.text_encoder)
    pipe.save_pretrained(tmp_path / "fused")
    from diffusers import DiffusionPipeline

    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "fused")
    assert not sara_layers(reloaded.unet) and not sara_layers(reloaded.text_encoder)
    np.testing.assert_allclose(generate(reloaded), sd.adapted, **FUSED)
    assert np.array_equal(generate(reloaded), generate(pipe))  # exactly the fused weights


def test_unet_fuse_lora_unload_lora_save_pretrained_writes_the_fused_unet(sd, pipe, tmp_path):
    from diffusers import UNet2DConditionModel

    load_sara_adapter(pipe, sd.adapter_dir, components=["unet"])
    unfused = generate(pipe)
    pipe.unet.fuse_lora()
    pipe.unet.unload_lora()
    assert not sara_layers(pipe.unet) and not hasattr(pipe.unet, "peft_config")
    pipe.unet.save_pretrained(tmp_path / "unet")
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    expected = pipe.unet.state_dict()
    assert saved.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in saved.state_dict().items())
    np.testing.assert_allclose(generate(pipe), unfused, **FUSED)


def test_save_pretrained_with_an_unfused_adapter_writes_the_layers_as_lora_does(sd, pipe, tmp_path):
    # As with a LoRA adapter injected by `add_adapter`: the tuner layers' keys are saved as they are (the base weight
    # under `.base_layer.`), which `from_pretrained` cannot load; peft-sara's loader names the problem.
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    lora_unet = UNet2DConditionModel.from_pretrained(sd.pipeline_dir, subfolder="unet")
    lora_unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    lora_unet.save_pretrained(tmp_path / "lora-unet")
    lora_keys = load_file(tmp_path / "lora-unet" / "diffusion_pytorch_model.safetensors")
    assert any(key.endswith("to_q.base_layer.weight") for key in lora_keys)

    load_sara_adapter(pipe, sd.adapter_dir)
    pipe.save_pretrained(tmp_path / "unfused")
    saved = load_file(tmp_path / "unfused" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(key.endswith("to_q.base_layer.weight") for key in saved)
    assert any(".sara_values." in key for key in saved)
    np.testing.assert_allclose(generate(pipe), sd.adapted, **SAME)  # saving changed nothing
    with pytest.raises(FileNotFoundError, match="unfused SaRA adapter.*save_sara_adapter.*unload_lora_weights"):
        load_sara_adapter(load_sd(sd.pipeline_dir), tmp_path / "unfused")
    # An adapter's weights without their config are not mistaken for such a model.
    (tmp_path / "no-config" / "unet").mkdir(parents=True)
    save_file(
        load_file(sd.adapter_dir / "unet" / "adapter_model.safetensors"), tmp_path / "no-config/unet/a.safetensors"
    )
    with pytest.raises(FileNotFoundError, match="No 'adapter_config.json'") as refused:
        load_sara_adapter(load_sd(sd.pipeline_dir), tmp_path / "no-config")
    assert "unfused" not in str(refused.value)


# ------------------------------------------------------------------------------------------------- layouts
def test_single_model_adapter_at_the_root_loads_into_the_denoiser(sd, pipe, tmp_path):
    from diffusers import UNet2DConditionModel
    from peft import get_peft_model

    unet = UNet2DConditionModel.from_pretrained(sd.pipeline_dir, subfolder="unet")
    torch.manual_seed(1)
    peft_unet = get_peft_model(unet, peft_sara.SaRAConfig(trainable_fraction=0.05, init_weights=False))
    peft_unet.save_pretrained(tmp_path / "my.unet", save_embedding_layers=False)
    assert (tmp_path / "my.unet" / "adapter_config.json").is_file()

    name = load_sara_adapter(pipe, tmp_path / "my.unet")
    assert name == "default_0"
    assert pipe.get_list_adapters() == {"unet": ["default_0"]}
    expected = {k.replace(".default", ""): v for k, v in peft_unet.state_dict().items() if "sara_" in k}
    loaded = {k.replace(".default_0", ""): v for k, v in pipe.unet.state_dict().items() if "sara_" in k}
    assert {f"base_model.model.{k}" for k in loaded} == set(expected)
    for key, value in loaded.items():
        assert torch.equal(value, expected[f"base_model.model.{key}"]), key


def test_subfolder_and_components_select_what_is_loaded(sd, pipe, tmp_path):
    import shutil

    shutil.copytree(sd.adapter_dir, tmp_path / "repo" / "v1")
    name = load_sara_adapter(pipe, tmp_path / "repo", subfolder="v1", components=["text_encoder"])
    assert name == "default_0"
    assert pipe.get_list_adapters() == {"text_encoder": ["default_0"]}
    # The next unnamed load is default_1, as diffusers numbers LoRA adapters.
    assert load_sara_adapter(pipe, tmp_path / "repo", subfolder="v1", components=["unet"]) == "default_1"


# ------------------------------------------------------------------------------------------------- errors
def test_lora_adapter_is_rejected_with_a_pointer_to_load_lora_weights(pipe, tmp_path):
    (tmp_path / "lora" / "unet").mkdir(parents=True)
    (tmp_path / "lora" / "unet" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(ValueError, match="'LORA' adapter, not a SaRA adapter.*load_lora_weights"):
        load_sara_adapter(pipe, tmp_path / "lora")
    assert not hasattr(pipe.unet, "peft_config")


def test_component_missing_in_the_pipeline_is_named(sd, pipe, tmp_path):
    import shutil

    shutil.copytree(sd.adapter_dir, tmp_path / "sdxl-like")
    shutil.copytree(sd.adapter_dir / "text_encoder", tmp_path / "sdxl-like" / "text_encoder_2")
    with pytest.raises(ValueError, match=r"weights for \['text_encoder_2'\].*components=\[\.\.\.\]"):
        load_sara_adapter(pipe, tmp_path / "sdxl-like")
    with pytest.raises(ValueError, match=r"no weights for \['transformer'\]"):
        load_sara_adapter(pipe, sd.adapter_dir, components=["transformer"])
    assert not sara_layers(pipe.unet)


def test_training_checkpoint_subfolders_are_not_mistaken_for_components(sd, pipe, tmp_path):
    import shutil

    shutil.copytree(sd.adapter_dir, tmp_path / "run")
    shutil.copytree(sd.adapter_dir / "unet", tmp_path / "run" / "checkpoint-2")
    load_sara_adapter(pipe, tmp_path / "run")
    assert pipe.get_list_adapters() == {"unet": ["default_0"], "text_encoder": ["default_0"]}


def test_missing_files_raise_file_not_found(sd, pipe, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No 'adapter_config.json'"):
        load_sara_adapter(pipe, tmp_path / "empty")
    (tmp_path / "no-weights" / "unet").mkdir(parents=True)
    (tmp_path / "no-weights" / "unet" / "adapter_config.json").write_text(
        (sd.adapter_dir / "unet" / "adapter_config.json").read_text()
    )
    with pytest.raises(FileNotFoundError, match="no 'adapter_model.safetensors'"):
        load_sara_adapter(pipe, tmp_path / "no-weights")
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a valid Hub repo id"):
        load_sara_adapter(pipe, str(tmp_path / "does" / "not" / "exist"))
    with pytest.raises(FileNotFoundError, match="no subfolder 'v2'"):
        load_sara_adapter(pipe, sd.adapter_dir, subfolder="v2")


def test_taken_adapter_name_is_refused_before_anything_changes(sd, pipe):
    load_sara_adapter(pipe, sd.adapter_dir, adapter_name="style", components=["unet"])
    with pytest.raises(ValueError, match="already has an adapter named 'style'"):
        load_sara_adapter(pipe, sd.adapter_dir, adapter_name="style")
    assert pipe.get_list_adapters() == {"unet": ["style"]}


def test_failed_load_leaves_no_adapter_behind(sd, pipe, tmp_path):
    import shutil

    from peft_sara.tuner.file_format import decode_index_gaps, encode_index_gaps

    broken = tmp_path / "broken"
    shutil.copytree(sd.adapter_dir, broken)
    weights = load_file(broken / "unet" / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("sara_index_gaps"))
    weights[key] = encode_index_gaps(decode_index_gaps(weights[key]) + 10**9)  # indices past the end of the weight
    save_file(weights, broken / "unet" / "adapter_model.safetensors")
    before = {"unet": base_weights(pipe.unet), "text_encoder": base_weights(pipe.text_encoder)}

    with pytest.raises(ValueError, match="out of range"):
        load_sara_adapter(pipe, broken)  # text_encoder loads first, then unet fails
    assert not sara_layers(pipe.unet) and not sara_layers(pipe.text_encoder)
    assert not hasattr(pipe.text_encoder, "peft_config")
    assert_weights_equal(pipe.unet, before["unet"])
    assert_weights_equal(pipe.text_encoder, before["text_encoder"])


# ------------------------------------------------------------------------------------------------- SD3
def test_sd3_transformer_and_text_encoders_round_trip(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    def load_sd3():
        return StableDiffusion3Pipeline.from_pretrained(pipeline_dir, text_encoder_3=None, tokenizer_3=None)

    pipeline_dir = tiny_pipelines.build_sd3_pipeline(tmp_path)
    pipe = load_sd3()
    base = generate(pipe)
    tiny_pipelines.add_random_sara_adapter(pipe, "a", components=("transformer", "text_encoder_2"))
    adapted = generate(pipe)
    assert not np.allclose(adapted, base, atol=1e-3)
    save_sara_adapter(pipe, tmp_path / "sd3-adapter")
    assert sorted(p.name for p in (tmp_path / "sd3-adapter").iterdir()) == [
        "README.md",
        "text_encoder_2",
        "transformer",
    ]

    fresh = load_sd3()
    name = load_sara_adapter(fresh, tmp_path / "sd3-adapter")
    assert fresh.get_list_adapters() == {"transformer": [name], "text_encoder_2": [name]}
    np.testing.assert_allclose(generate(fresh), adapted, **SAME)
    assert np.array_equal(generate(fresh, joint_attention_kwargs={"scale": 0.0}), base)
    fresh.disable_lora()
    assert np.array_equal(generate(fresh), base)
    fresh.enable_lora()
    fresh.fuse_lora()
    np.testing.assert_allclose(generate(fresh), adapted, **FUSED)


# ------------------------------------------------------------------------------------------------- example
def test_inference_example_writes_a_comparison_grid(sd, tmp_path):
    spec = importlib.util.spec_from_file_location("sara_inference_example", REPO_ROOT / "examples" / "inference.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    output = example.main(
        [
            "--pretrained_model_name_or_path",
            str(sd.pipeline_dir),
            "--adapter",
            str(sd.adapter_dir),
            "--prompt",
            tiny_pipelines.PROMPT,
            "--num_images",
            "2",
            "--steps",
            "2",
            "--seed",
            "0",
            "--scale",
            "1.0",
            "--height",
            "32",
            "--width",
            "32",
            "--guidance_scale",
            "1.0",
            "--compare",
            "--fuse",
            "--device",
            "cpu",
            "--output",
            str(tmp_path / "grid.png"),
        ]
    )
    from PIL import Image

    grid = np.asarray(Image.open(output)).astype(np.float32) / 255
    assert grid.shape == (2 * 32, 2 * 32, 3)
    # Top-left tile: seed 0 without the adapter; bottom-left: seed 0 with it.
    np.testing.assert_allclose(grid[:32, :32], sd.base[0], atol=1 / 255 + 1e-6)
    np.testing.assert_allclose(grid[32:, :32], sd.adapted[0], atol=1 / 255 + 1e-3)
