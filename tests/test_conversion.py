"""Exporting SaRA adapters (peft_sara.conversion): every format is read back by an independent reader (PEFT,
diffusers' LoRA loaders and kohya converter, safetensors), full rank is exact, lower ranks report their error."""

from __future__ import annotations

import os
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from peft_sara import SaRAConfig, load_sara_adapter, sara_layers, save_sara_adapter
from peft_sara.conversion import convert_to_lora, export_adapter, parse_rank, save_merged
from peft_sara.export.formats import DIFFUSERS_WEIGHT_NAME, kohya_key

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_pipelines  # noqa: E402
from conftest import Conv1DModel, sd3_inputs, tiny_sd3_transformer  # noqa: E402
from tiny_pipelines import generate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FLOAT_TOLERANCE = 2e-5  # images in [0, 1] after two denoising steps: float32 rounding only


def load_sd(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def peft_lora_pipeline(pipeline_dir, folder):
    """A fresh pipeline with a peft-lora export merged in by PEFT itself (PeftModel.from_pretrained)."""
    pipe = load_sd(pipeline_dir)
    pipe.unet = PeftModel.from_pretrained(pipe.unet, folder / "unet").merge_and_unload()
    pipe.text_encoder = PeftModel.from_pretrained(pipe.text_encoder, folder / "text_encoder").merge_and_unload()
    return pipe


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD pipeline with a random SaRA adapter on unet and text_encoder, its images, and every export."""
    root = tmp_path_factory.mktemp("sd-export")
    pipeline_dir = tiny_pipelines.build_sd_pipeline(root)
    pipe = load_sd(pipeline_dir)
    base = generate(pipe)
    tiny_pipelines.add_random_sara_adapter(pipe, "style")
    adapted = generate(pipe)
    exports = {
        "peft_lora": export_adapter(pipe, root / "peft", "peft-lora"),
        "diffusers": export_adapter(pipe, root / "diffusers", "diffusers"),
        "kohya": export_adapter(pipe, root / "style.safetensors", "kohya"),
        "kohya_r4": export_adapter(pipe, root / "style-r4.safetensors", "kohya", rank=4),
        "peft_lora_r4": export_adapter(pipe, root / "peft-r4", "peft-lora", rank=4),
        "diff": export_adapter(pipe, root / "style-diff.safetensors", "diff"),
    }
    return SimpleNamespace(root=root, pipeline_dir=pipeline_dir, pipe=pipe, base=base, adapted=adapted, **exports)


def test_full_rank_peft_lora_export_reproduces_the_sara_images(sd):
    assert sd.peft_lora.lora.total_error < 1e-5
    assert {path.name for path in sd.peft_lora.paths} == {"unet", "text_encoder"}
    config = LoraConfig.from_pretrained(sd.root / "peft" / "unet")
    assert config.peft_type.value == "LORA" and config.lora_alpha == config.r  # scale 1: factors hold the update
    images = generate(peft_lora_pipeline(sd.pipeline_dir, sd.root / "peft"))
    assert np.abs(sd.adapted - sd.base).max() > 1e-2  # the adapter does change the images
    np.testing.assert_allclose(images, sd.adapted, rtol=0, atol=FLOAT_TOLERANCE)


def test_peft_lora_export_loads_with_diffusers_load_lora_adapter(sd):
    pipe = load_sd(sd.pipeline_dir)
    pipe.unet.load_lora_adapter(
        sd.root / "peft" / "unet", weight_name="adapter_model.safetensors", prefix="base_model.model"
    )
    pipe.text_encoder = PeftModel.from_pretrained(pipe.text_encoder, sd.root / "peft" / "text_encoder")
    np.testing.assert_allclose(generate(pipe), sd.adapted, rtol=0, atol=FLOAT_TOLERANCE)


def test_diffusers_export_loads_with_load_lora_weights_and_reproduces_the_images(sd):
    keys = load_file(sd.root / "diffusers" / DIFFUSERS_WEIGHT_NAME).keys()
    assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder"}
    # transformers 5 flattened CLIPTextModel.text_model; files keep the prefix that every reader knows
    assert all(key.startswith("text_encoder.text_model.encoder.") for key in keys if key.startswith("text_"))
    pipe = load_sd(sd.pipeline_dir)
    pipe.load_lora_weights(sd.root / "diffusers", adapter_name="exported")
    assert pipe.get_list_adapters() == {"unet": ["exported"], "text_encoder": ["exported"]}
    np.testing.assert_allclose(generate(pipe), sd.adapted, rtol=0, atol=FLOAT_TOLERANCE)


def test_kohya_export_loads_through_diffusers_kohya_converter_like_the_peft_lora_export(sd):
    with safe_open(sd.root / "style-r4.safetensors", framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "4"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert {f"{conv}.lora_down.weight", f"{conv}.lora_up.weight", f"{conv}.alpha"} <= keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    tensors = load_file(sd.root / "style-r4.safetensors")
    assert tensors[f"{conv}.lora_down.weight"].shape == (4, 32, 3, 3)  # LoCon: k x k down conv, 1 x 1 up conv
    assert tensors[f"{conv}.lora_up.weight"].shape == (32, 4, 1, 1)

    kohya_pipe = load_sd(sd.pipeline_dir)
    kohya_pipe.load_lora_weights(sd.root / "style-r4.safetensors")
    np.testing.assert_allclose(
        generate(kohya_pipe), generate(peft_lora_pipeline(sd.pipeline_dir, sd.root / "peft-r4")), rtol=0, atol=1e-5
    )
    full = load_sd(sd.pipeline_dir)
    full.load_lora_weights(sd.root / "style.safetensors")
    np.testing.assert_allclose(generate(full), sd.adapted, rtol=0, atol=FLOAT_TOLERANCE)


def test_diff_export_holds_the_exact_dense_update_under_comfyui_names_and_diffusers_refuses_it(sd):
    tensors = load_file(sd.root / "style-diff.safetensors")
    expected = {}
    for component in ("unet", "text_encoder"):
        module = getattr(sd.pipe, component)
        for name, layer in sara_layers(module):
            prefix = "text_model." if component == "text_encoder" else ""
            key = kohya_key(component, ["unet", "text_encoder"], prefix + name) + ".diff"
            expected[key] = layer.get_delta_weight("style")
    assert tensors.keys() == expected.keys()
    for key, delta in expected.items():
        assert torch.equal(tensors[key], delta), key
    assert sd.diff.summary()["total_relative_error"] == 0.0
    with pytest.raises(ValueError, match="not been correctly renamed"):
        load_sd(sd.pipeline_dir).load_lora_weights(sd.root / "style-diff.safetensors")


def test_merged_export_saves_a_plain_pipeline_with_the_same_images_and_leaves_the_source_unmerged(sd):
    save_merged(sd.pipe, sd.root / "merged")
    assert not any(layer.merged for _, layer in sara_layers(sd.pipe.unet))
    merged = load_sd(sd.root / "merged")
    assert not any(True for _ in sara_layers(merged.unet))
    assert list((sd.root / "merged" / "unet").glob("*.safetensors"))
    np.testing.assert_allclose(generate(merged), sd.adapted, rtol=0, atol=FLOAT_TOLERANCE)


def test_lower_ranks_report_the_relative_frobenius_error_of_each_layer(sd):
    reports = {rank: convert_to_lora(sd.pipe, rank=rank) for rank in (1, 4, 0.5, "full")}
    layers = dict(sara_layers(sd.pipe.unet))
    for factors in reports[4].components["unet"].values():
        delta = layers[factors.name].get_delta_weight("style").reshape(factors.up.shape[0], -1)
        measured = torch.linalg.vector_norm(delta - factors.delta()) / torch.linalg.vector_norm(delta)
        assert factors.error == pytest.approx(float(measured), rel=1e-4, abs=1e-6)
        assert factors.rank == min(4, factors.max_rank)
    errors = [reports[rank].total_error for rank in (1, 4, "full")]
    assert errors[0] > errors[1] > 0.1 > 1e-5 > errors[2]  # a random sparse update is far from low-rank
    energy = reports[0.5]
    for _, factors in energy.layers():
        assert factors.error**2 <= 0.5 + 1e-4  # keeps at least half of sum(S^2), so loses at most half
        assert 1 <= factors.rank < factors.max_rank
    summary = energy.summary()
    assert summary["total_relative_error"] == energy.total_error and len(summary["layers"]) == len(energy.layers())


def test_rank_arguments_are_parsed_and_checked():
    assert parse_rank("16") == 16 and parse_rank("full") == "full" and parse_rank("0.99") == 0.99
    for bad in ("0", "-3", "1.5", "rank", 0):
        with pytest.raises(ValueError, match="rank|fraction"):
            parse_rank(bad)


def test_sd3_transformer_diffusers_export_loads_with_the_sd3_lora_loader(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    transformer = tiny_sd3_transformer()
    torch.manual_seed(3)
    transformer.add_adapter(SaRAConfig(trainable_fraction=0.1, init_weights=False), adapter_name="style")
    with torch.no_grad():
        expected = transformer(**sd3_inputs()).sample
    result = export_adapter(transformer, tmp_path / "sd3", "diffusers")
    keys = load_file(result.paths[0]).keys()
    assert keys and all(key.startswith("transformer.") for key in keys)
    fresh = tiny_sd3_transformer()
    with torch.no_grad():
        base = fresh(**sd3_inputs()).sample
    # what StableDiffusion3Pipeline.load_lora_weights does with the folder
    state_dict = StableDiffusion3Pipeline.lora_state_dict(tmp_path / "sd3")
    StableDiffusion3Pipeline.load_lora_into_transformer(state_dict, transformer=fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**sd3_inputs()).sample, expected, rtol=0, atol=1e-5)
    assert (expected - base).abs().max() > 1e-3


def test_transformers_conv1d_layers_export_to_a_peft_lora_that_peft_loads(tmp_path):
    torch.manual_seed(0)
    config = SaRAConfig(trainable_fraction=0.3, target_modules=["c_fc", "c_proj"], init_weights=False)
    model = get_peft_model(Conv1DModel().eval(), config)
    x = torch.randn(3, 16)
    expected = model(x)
    result = export_adapter(model, tmp_path / "lora", "peft-lora", component="text_encoder")
    assert result.paths == [tmp_path / "lora"] and result.lora.total_error < 1e-5
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Conv1DModel().eval(), tmp_path / "lora")
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-5)


def test_lora_formats_refuse_convs_lora_cannot_express_and_diff_exports_them(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2), nn.Conv2d(4, 4, 3, groups=2))
    config = SaRAConfig(trainable_fraction=0.3, target_modules=["0", "1"], init_weights=False)
    peft_model = get_peft_model(model, config)
    with pytest.raises(ValueError, match=r"dilation=\(2, 2\).*has no LoRA equivalent.*'diff'"):
        export_adapter(peft_model, tmp_path / "x.safetensors", "kohya", component="unet")
    result = export_adapter(peft_model, tmp_path / "x.safetensors", "diff", component="unet")
    assert set(load_file(result.paths[0])) == {"lora_unet_0.diff", "lora_unet_1.diff"}


def test_peft_convert_to_lora_is_exact_on_linear_sara_layers(mlp_conv):
    from peft import convert_to_lora as peft_convert_to_lora

    config = SaRAConfig(trainable_fraction=0.3, target_modules=["lin0", "lin1"], init_weights=False)
    model = get_peft_model(mlp_conv, config)
    lora_config, state_dict = peft_convert_to_lora(model, rank=1.0)  # all the energy: exact
    for name, layer in sara_layers(model):
        delta = state_dict[f"{name}.lora_B.weight"] @ state_dict[f"{name}.lora_A.weight"]
        torch.testing.assert_close(delta, layer.get_delta_weight("default"), rtol=0, atol=1e-5)


def test_sara_conv_layers_decline_peft_lora_conversion(mlp_conv):
    model = get_peft_model(mlp_conv, SaRAConfig(trainable_fraction=0.3, target_modules=["conv", "lin0"]))
    layers = dict(sara_layers(model.base_model.model))
    assert layers["lin0"].supports_lora_conversion()
    assert not layers["conv"].supports_lora_conversion()


def test_load_sara_adapter_accepts_the_arguments_load_lora_weights_users_pass(sd, tmp_path):
    saved = save_sara_adapter(sd.pipe, tmp_path / "sara", adapter_name="style")
    renamed = tmp_path / "renamed"
    shutil.copytree(saved, renamed)
    for component in ("unet", "text_encoder"):
        (renamed / component / "adapter_model.safetensors").rename(renamed / component / "style.safetensors")
    pipe = load_sd(sd.pipeline_dir)
    name = load_sara_adapter(pipe, renamed, adapter_name="renamed", weight_name="style.safetensors", prefix="unet")
    assert name == "renamed" and pipe.get_list_adapters() == {"unet": ["renamed"]}
    expected = dict(sara_layers(sd.pipe.unet))
    for layer_name, layer in sara_layers(pipe.unet):
        assert torch.equal(layer.get_delta_weight("renamed"), expected[layer_name].get_delta_weight("style"))
    with pytest.raises(FileNotFoundError, match="load_lora_weights"):
        load_sara_adapter(load_sd(sd.pipeline_dir), saved, weight_name=DIFFUSERS_WEIGHT_NAME)
    with pytest.raises(ValueError, match="either `prefix='unet'` or `components="):
        load_sara_adapter(load_sd(sd.pipeline_dir), saved, prefix="unet", components=["text_encoder"])


def test_export_errors_name_the_problem(sd, tmp_path):
    with pytest.raises(ValueError, match="writes one .safetensors file"):
        export_adapter(sd.pipe, tmp_path / "folder", "kohya")
    with pytest.raises(ValueError, match="Unknown export format 'lycoris'"):
        export_adapter(sd.pipe, tmp_path / "x", "lycoris")
    with pytest.raises(ValueError, match="has no SaRA layers"):
        convert_to_lora(nn.Linear(2, 2))
