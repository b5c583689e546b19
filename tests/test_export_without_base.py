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
from peft_sara.pipelines import inject_sara_adapter
from peft_sara.tuner.file_format import InvalidAdapterError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import Conv1DModel, tiny_unet, unet_inputs  # noqa: E402
from tiny_pipelines import build_sd_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy_v1")
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


def test_files_record_layer_layouts_in_tensors_and_the_model_class_in_the_config(folderless_unet):
    root, _, _ = folderless_unet
    folder = root / "adapter" / "style"
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}  # what PEFT writes: no side channel
        assert handle.get_tensor("down_blocks.0.resnets.0.conv1.sara_layout").tolist() == [2, 1, 0, 1, 1]
        layout = handle.get_tensor("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.sara_layout")
        assert layout.tolist() == [0, 1, 0]
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_class"] == "UNet2DConditionModel"


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


def test_peft_save_pretrained_then_cli_export_without_base_loads_in_diffusers_and_reproduces_sara(tmp_path):
    """Issue 27: an adapter saved the Quick-start way (PeftModel.save_pretrained) exports without `--base`, and
    `pipe.load_lora_weights` of the kohya and diffusers exports reproduces the SaRA output (full rank)."""
    from diffusers import StableDiffusionPipeline

    pipeline_folder = build_sd_pipeline(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_folder)
    torch.manual_seed(1)
    model = get_peft_model(pipe.unet, SaRAConfig(trainable_fraction=0.1, init_weights=False))
    inputs = unet_inputs()
    with torch.no_grad():
        adapted = model(**inputs).sample
    model.save_pretrained(tmp_path / "adapter")
    kohya, diffusers_folder = tmp_path / "style-kohya.safetensors", tmp_path / "style-diffusers"
    for fmt, output in (("kohya", kohya), ("diffusers", diffusers_folder)):
        argv = ["export", str(tmp_path / "adapter"), "--format", fmt, "-o", str(output), "--quiet"]
        assert cli.main(argv) == 0
    for exported in (kohya, diffusers_folder):
        fresh = StableDiffusionPipeline.from_pretrained(pipeline_folder)
        with torch.no_grad():
            base = fresh.unet(**inputs).sample
        fresh.load_lora_weights(str(exported))
        with torch.no_grad():
            loaded = fresh.unet(**inputs).sample
        assert (adapted - base).abs().max() > 1e-3  # the adapter changes the output
        torch.testing.assert_close(loaded, adapted, rtol=0, atol=FULL_RANK_TOLERANCE)


def test_format_1_files_still_load_and_export(tmp_path):
    """Files saved by main at dc2a78b (tests/data/legacy_v1: layouts and model class in safetensors metadata) load
    with their original output and export without a base; without the metadata (as PEFT's own writer left them) a
    UNet exports from its shapes with a warning and a Conv1D model asks for the base."""
    from diffusers import StableDiffusionPipeline

    expected = load_file(os.path.join(LEGACY, "unet_adapter_output.safetensors"))["sample"]
    loaded = PeftModel.from_pretrained(tiny_unet(), os.path.join(LEGACY, "unet_adapter"))
    with torch.no_grad():
        assert torch.equal(loaded(**unet_inputs()).sample, expected)
    export_adapter(read_adapter_files(os.path.join(LEGACY, "unet_adapter")), tmp_path / "k.safetensors", "kohya")

    def load(unet):
        StableDiffusionPipeline.load_lora_into_unet(
            *StableDiffusionPipeline.lora_state_dict(tmp_path / "k.safetensors"), unet=unet
        )

    torch.testing.assert_close(reference_unet_output(load), expected, rtol=0, atol=FULL_RANK_TOLERANCE)

    stripped = tmp_path / "stripped"  # the same tensors without the metadata, and a config without the class
    stripped.mkdir()
    save_file(
        load_file(os.path.join(LEGACY, "unet_adapter", "adapter_model.safetensors")),
        stripped / "adapter_model.safetensors",
    )
    config = json.loads(open(os.path.join(LEGACY, "unet_adapter", "adapter_config.json")).read())
    (stripped / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelRequired, match="records no model class.*`component=`"):
        read_adapter_files(stripped)
    with pytest.warns(UserWarning, match="records no layer layouts.*undilated"):
        files = read_adapter_files(stripped, component="unet")
    export_adapter(files, tmp_path / "k2.safetensors", "kohya")
    assert load_file(tmp_path / "k2.safetensors").keys() == load_file(tmp_path / "k.safetensors").keys()

    torch.manual_seed(0)
    conv1d = Conv1DModel(hidden=16).eval()
    x = torch.randn(3, 16)
    reference = PeftModel.from_pretrained(conv1d, os.path.join(LEGACY, "conv1d_injected"))
    with torch.no_grad():
        expected = reference(x)
    files = read_adapter_files(os.path.join(LEGACY, "conv1d_injected"), component="text_encoder")
    export_adapter(files, tmp_path / "lora", "peft-lora")
    torch.manual_seed(0)
    lora = PeftModel.from_pretrained(Conv1DModel(hidden=16).eval(), tmp_path / "lora")
    torch.testing.assert_close(lora(x), expected, rtol=0, atol=1e-5)
    with pytest.raises(BaseModelRequired, match=r"'text_encoder.c_fc' \(weight \(16, 16\)\).*Conv1D \(in x out\)"):
        read_adapter_files(os.path.join(LEGACY, "conv1d_peft"), component="text_encoder")


def test_conv1d_layers_export_from_their_recorded_layout(tmp_path):
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


def test_export_checks_layouts_and_bounds_dense_updates_by_the_file(tmp_path):
    """Issue 28: export trusts no record. A "transposed" layout record on a square nn.Linear of a UNet (format 1's
    metadata) is refused, as is a format-2 layout edited without its checksum; one stored entry claiming an
    8192 x 8192 weight is refused before anything dense is built."""
    from peft_sara.tuner.file_format import entries_checksum, split_sara_key

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    source = os.path.join(LEGACY, "unet_adapter", "adapter_model.safetensors")
    with safe_open(source, framework="pt") as handle:
        metadata = handle.metadata()
    records = json.loads(metadata["peft_sara_layouts"])
    records["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] = {"kind": "linear", "transposed": True}
    save_file(
        load_file(source), legacy / "adapter_model.safetensors", {**metadata, "peft_sara_layouts": json.dumps(records)}
    )
    (legacy / "adapter_config.json").write_text(
        open(os.path.join(LEGACY, "unet_adapter", "adapter_config.json")).read()
    )
    with pytest.raises(InvalidAdapterError, match="attn1.to_q' as stored transposed.*edited"):
        read_adapter_files(legacy)

    model = nn.Sequential(nn.Linear(8, 8))
    inject_sara_adapter(model, SaRAConfig(trainable_fraction=0.25, target_modules=["0"], init_weights=False), "default")
    save_model_adapter(model, tmp_path / "sara")
    weights = tmp_path / "sara" / "adapter_model.safetensors"
    tensors = load_file(weights)
    edited = dict(tensors, **{"0.sara_layout": torch.tensor([1, 1, 0])})  # claims Conv1D (in x out)
    save_file(edited, weights)
    with pytest.raises(InvalidAdapterError, match="do not match their checksum"):
        read_adapter_files(tmp_path / "sara", component="unet")

    one_entry = {
        "0.sara_index_gaps": torch.tensor([5], dtype=torch.uint8),
        "0.sara_values": torch.ones(1),
        "0.sara_weight_shape": torch.tensor([8192, 8192]),
        "0.sara_layout": torch.tensor([0, 1, 0]),
    }
    one_entry["0.sara_checksum"] = entries_checksum("0", {split_sara_key(k)[1]: v for k, v in one_entry.items()})
    hostile = {**{k: v for k, v in tensors.items() if not k.startswith("0.")}, **one_entry}
    save_file(hostile, weights)
    with pytest.raises(InvalidAdapterError, match=r"records a weight of shape \(8192, 8192\).*for 1 stored entries"):
        read_adapter_files(tmp_path / "sara", component="unet")


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
