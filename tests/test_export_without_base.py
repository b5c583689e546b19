"""Exporting from an adapter's files alone (peft_sara.conversion.read_adapter_files, `peft-sara export` without a
base): the files record each layer's weight shape and layout; diffusers' own LoRA readers load the exports of a UNet
that never existed on disk and reproduce the SaRA output; the base is asked for only where a layer is ambiguous."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from peft_sara import SaRAConfig, cli
from peft_sara.adapter_files import save_model_adapter
from peft_sara.conversion import BaseModelRequired, export_adapter, read_adapter_files
from peft_sara.export.formats import DIFFUSERS_METADATA_KEY, DIFFUSERS_WEIGHT_NAME
from peft_sara.layouts import LAYOUTS_KEY, MODEL_CLASS_KEY
from peft_sara.pipelines import inject_sara_adapter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import Conv1DModel, tiny_unet, unet_inputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FULL_RANK_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def folderless_unet(tmp_path_factory):
    """A UNet built from a config in memory (never saved), a random SaRA adapter saved alone, and its output."""
    root = tmp_path_factory.mktemp("folderless")
    unet = tiny_unet()
    torch.manual_seed(1)
    unet.add_adapter(SaRAConfig(trainable_fraction=0.1, init_weights=False), adapter_name="style")
    with torch.no_grad():
        adapted = unet(**unet_inputs()).sample
        unet.disable_adapters()
        base = unet(**unet_inputs()).sample
    save_model_adapter(unet, root / "adapter", ["style"])
    return root, adapted, base


def reference_unet_output(load) -> torch.Tensor:
    fresh = tiny_unet()  # the same in-memory base: same config, same seed
    load(fresh)
    with torch.no_grad():
        return fresh(**unet_inputs()).sample


def test_files_record_layer_layouts_and_model_class(folderless_unet):
    root, _, _ = folderless_unet
    with safe_open(root / "adapter" / "style" / "adapter_model.safetensors", framework="pt") as handle:
        metadata = handle.metadata()
    layouts = json.loads(metadata[LAYOUTS_KEY])
    assert metadata[MODEL_CLASS_KEY] == "UNet2DConditionModel"
    assert layouts["down_blocks.0.resnets.0.conv1"] == {"kind": "conv"}
    assert layouts["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == {"kind": "linear"}


def test_kohya_and_diffusers_exports_of_a_folderless_unet_load_in_diffusers_and_reproduce_sara(folderless_unet):
    from diffusers import StableDiffusionPipeline

    root, adapted, base = folderless_unet
    files = read_adapter_files(root / "adapter" / "style")
    assert list(files.components) == ["unet"] and files.single_model
    kohya = export_adapter(files, root / "style-kohya.safetensors", "kohya")
    diffusers_export = export_adapter(files, root / "style-diffusers", "diffusers")
    assert kohya.lora.total_error < 1e-5 and diffusers_export.lora.total_error < 1e-5

    def load_kohya(unet):  # what pipe.load_lora_weights does: diffusers' kohya converter, then its UNet loader
        state_dict, alphas = StableDiffusionPipeline.lora_state_dict(root / "style-kohya.safetensors")
        assert alphas  # every layer's alpha is in the file
        StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet=unet)

    def load_diffusers(unet):
        state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            root / "style-diffusers", return_lora_metadata=True
        )
        assert metadata["unet.lora_alpha"] == metadata["unet.r"]  # alphas written out, never guessed
        StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet=unet, metadata=metadata)

    assert (adapted - base).abs().max() > 1e-3  # the adapter changes the output
    for load in (load_kohya, load_diffusers):
        torch.testing.assert_close(reference_unet_output(load), adapted, rtol=0, atol=FULL_RANK_TOLERANCE)
    header = safe_open(root / "style-diffusers" / DIFFUSERS_WEIGHT_NAME, framework="pt").metadata()
    assert json.loads(header[DIFFUSERS_METADATA_KEY])["unet.alpha_pattern"] is not None


def test_cli_exports_without_a_base(folderless_unet, capsys):
    root, adapted, _ = folderless_unet
    output = root / "cli-kohya.safetensors"
    assert cli.main(["export", str(root / "adapter" / "style"), "--format", "kohya", "-o", str(output), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    tensors = load_file(output)
    assert tensors.keys() == load_file(root / "style-kohya.safetensors").keys()


def test_peft_saved_unet_without_records_exports_from_shapes_with_a_warning(tmp_path):
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(1)
    model = get_peft_model(tiny_unet(), SaRAConfig(trainable_fraction=0.1, init_weights=False))
    with torch.no_grad():
        adapted = model(**unet_inputs()).sample
    model.save_pretrained(tmp_path / "peft")  # PEFT's own writer: shapes, but no layout records
    with pytest.warns(UserWarning, match="records no layer layouts.*undilated"):
        files = read_adapter_files(tmp_path / "peft", component="unet")
    export_adapter(files, tmp_path / "k.safetensors", "kohya")

    def load(unet):
        StableDiffusionPipeline.load_lora_into_unet(
            *StableDiffusionPipeline.lora_state_dict(tmp_path / "k.safetensors"), unet=unet
        )

    torch.testing.assert_close(reference_unet_output(load), adapted, rtol=0, atol=FULL_RANK_TOLERANCE)


def test_conv1d_layers_export_from_their_layout_record_and_without_it_the_base_is_asked_for(tmp_path):
    torch.manual_seed(0)
    model = Conv1DModel(hidden=16).eval()
    inject_sara_adapter(
        model, SaRAConfig(trainable_fraction=0.3, target_modules=["c_fc", "c_proj"], init_weights=False), "default"
    )
    x = torch.randn(3, 16)
    expected = model(x)
    save_model_adapter(model, tmp_path / "sara")
    export_adapter(read_adapter_files(tmp_path / "sara", component="text_encoder"), tmp_path / "lora", "peft-lora")
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Conv1DModel(hidden=16).eval(), tmp_path / "lora")
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-5)

    weights = tmp_path / "sara" / "adapter_model.safetensors"
    save_file(load_file(weights), weights)  # the same tensors without the layout records
    with pytest.raises(BaseModelRequired, match=r"'text_encoder.c_fc' \(weight \(16, 16\)\).*Conv1D \(in x out\)"):
        read_adapter_files(tmp_path / "sara", component="text_encoder")


def test_grouped_and_dilated_convs_are_refused_by_lora_formats_and_exported_by_diff_without_a_base(tmp_path):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, dilation=2), nn.Conv2d(4, 4, 3, groups=2))
    inject_sara_adapter(
        model, SaRAConfig(trainable_fraction=0.3, target_modules=["0", "1"], init_weights=False), "default"
    )
    save_model_adapter(model, tmp_path / "sara")
    files = read_adapter_files(tmp_path / "sara", component="unet")
    with pytest.raises(ValueError, match=r"'unet.0' \(a convolution with dilation=\(2, 2\)\) has no LoRA.*'diff'"):
        export_adapter(files, tmp_path / "x.safetensors", "kohya")
    result = export_adapter(files, tmp_path / "x.safetensors", "diff")
    tensors = load_file(result.paths[0])
    assert torch.equal(tensors["lora_unet_1.diff"], model[1].get_delta_weight("default"))
    with pytest.raises(ValueError, match="merged model needs the base model"):
        export_adapter(files, tmp_path / "merged", "merged")
