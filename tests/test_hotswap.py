"""Hotswap: ``enable_sara_hotswap`` then ``load_sara_adapter(..., hotswap=True)`` / ``hotswap_adapter`` replace an
adapter's entries in place, so a ``torch.compile(fullgraph=True)`` model swaps adapters of different sizes and target
layers without recompiling, each output as loading that adapter fresh; refused files change nothing."""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo
from conftest import MLPConv, tiny_unet, unet_inputs
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_sara
from peft_sara import SaRAConfig, sara_layers

pytestmark = pytest.mark.usefixtures("one_thread")

SLOT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in"]
ADAPTERS = {  # name: (target_modules, trainable_fraction, re-select part of it: frozen entries)
    "a": (["to_q", "to_k", "to_v"], 0.05, False),
    "b": (["conv1", "conv2"], 0.1, True),
    "c": (["to_q", "to_out.0", "conv2", "proj_in"], 0.02, False),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_adapter(model, directory, targets, fraction, reselect, seed):
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model, SaRAConfig(target_modules=targets, trainable_fraction=fraction, init_weights=False)
    )
    if reselect:
        generator = torch.Generator().manual_seed(seed)
        for _, layer in sara_layers(peft_model):
            layer.reselect("default", torch.rand(layer.num_trainable("default"), generator=generator) < 0.7)
    peft_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def unet_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("hotswap")
    paths = {
        name: make_adapter(tiny_unet(), root / name, targets, fraction, reselect, seed)
        for seed, (name, (targets, fraction, reselect)) in enumerate(ADAPTERS.items())
    }
    paths["too_big"] = make_adapter(tiny_unet(), root / "too_big", ["to_q"], 0.3, False, 7)
    paths["unreserved"] = make_adapter(tiny_unet(), root / "unreserved", ["to_q", "proj_out"], 0.02, False, 8)
    return paths


def fresh_output(path):
    unet = PeftModel.from_pretrained(tiny_unet(), path).eval().base_model.model
    with torch.no_grad():
        return unet(**unet_inputs()).sample


def slot_state(unet):
    return {
        name: tensor.detach().clone()
        for name, tensor in list(unet.named_parameters()) + list(unet.named_buffers())
        if "sara_" in name
    } | {
        f"{name}.count": torch.tensor(layer.num_trainable("default"))
        for name, layer in sara_layers(unet)
        if "default" in layer.sara_values
    }


def assert_bitwise(before, after):
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    import tiny_pipelines
    from diffusers import StableDiffusionPipeline

    path = tiny_pipelines.build_sd_pipeline(tmp_path_factory.mktemp("sd"))
    return StableDiffusionPipeline.from_pretrained(path)


def test_compiled_pipeline_unet_swaps_three_adapters_without_recompiling(sd_pipe, unet_adapters):
    pipe = sd_pipe
    reserved = peft_sara.enable_sara_hotswap(pipe, max_fraction=0.1, target_modules=SLOT_TARGETS)
    assert set(reserved) == {"pipe.unet"} and reserved["pipe.unet"] > 0
    unet = pipe.unet.eval()
    layers = dict(sara_layers(unet))
    tensors = {name: (layer.sara_values["default"], layer.sara_indices["default"]) for name, layer in layers.items()}
    shapes = {name: (v.shape, i.shape) for name, (v, i) in tensors.items()}
    base = tiny_unet()
    with torch.no_grad():
        base_output = base(**unet_inputs()).sample
        compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(**unet_inputs()).sample, base_output)  # the empty slot is inert
        with torch._dynamo.config.patch(error_on_recompile=True):
            outputs = {}
            for name in ("a", "b", "c", "a"):
                peft_sara.load_sara_adapter(pipe, unet_adapters[name], adapter_name="default", hotswap=True)
                outputs[name] = compiled(**unet_inputs()).sample
                torch.testing.assert_close(outputs[name], fresh_output(unet_adapters[name]), rtol=1e-5, atol=1e-5)
                assert not torch.allclose(outputs[name], base_output)
            # Same tensors, same shapes throughout; the re-selected adapter brought frozen entries along.
            for name, layer in layers.items():
                assert layer.sara_values["default"] is tensors[name][0]
                assert layer.sara_indices["default"] is tensors[name][1]
                assert (tensors[name][0].shape, tensors[name][1].shape) == shapes[name]
            peft_sara.load_sara_adapter(pipe, unet_adapters["b"], adapter_name="default", hotswap=True, scale=0.5)
            assert any(layer.frozen_entries("default")[0].numel() for layer in layers.values())
            half = compiled(**unet_inputs()).sample
            assert not torch.allclose(half, outputs["b"])

            # Refused files leave the current adapter bitwise, and the compiled output unchanged.
            peft_sara.load_sara_adapter(pipe, unet_adapters["c"], adapter_name="default", hotswap=True)
            before = slot_state(unet)
            with pytest.raises(ValueError, match=r"does not fit the hotswap slot of layer '.*to_q'.*max_fraction"):
                peft_sara.load_sara_adapter(pipe, unet_adapters["too_big"], adapter_name="default", hotswap=True)
            assert_bitwise(before, slot_state(unet))
            with pytest.raises(ValueError, match=r"adapts layer '.*proj_out', which has no hotswap slot"):
                peft_sara.load_sara_adapter(pipe, unet_adapters["unreserved"], adapter_name="default", hotswap=True)
            assert_bitwise(before, slot_state(unet))
            torch.testing.assert_close(compiled(**unet_inputs()).sample, outputs["c"], rtol=0, atol=0)


def test_corrupted_file_is_refused_before_anything_changes(sd_pipe, unet_adapters, tmp_path):
    import shutil

    pipe = sd_pipe
    if "default" not in (getattr(pipe.unet, "peft_config", None) or {}):
        peft_sara.enable_sara_hotswap(pipe, max_fraction=0.1, target_modules=SLOT_TARGETS)
    peft_sara.load_sara_adapter(pipe, unet_adapters["a"], adapter_name="default", hotswap=True)
    before = slot_state(pipe.unet)
    corrupted = shutil.copytree(unet_adapters["b"], tmp_path / "corrupted")
    tensors = load_file(corrupted / "adapter_model.safetensors")
    key = next(key for key in tensors if key.endswith("sara_values"))
    tensors[key] = tensors[key].clone()
    tensors[key][0] += 1.0
    save_file(tensors, corrupted / "adapter_model.safetensors")
    with pytest.raises(peft_sara.InvalidAdapterError, match="checksum"):
        peft_sara.load_sara_adapter(pipe, corrupted, adapter_name="default", hotswap=True)
    assert_bitwise(before, slot_state(pipe.unet))
    with pytest.raises(ValueError, match="no SaRA adapter 'other' to hotswap into"):
        peft_sara.load_sara_adapter(pipe, unet_adapters["b"], adapter_name="other", hotswap=True)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        peft_sara.enable_sara_hotswap(pipe, max_fraction=0.1)


MLP_TARGETS = ["conv", "conv1x1", "lin0", "lin1"]


def mlp():
    torch.manual_seed(0)
    return MLPConv().eval()


def test_peft_model_hotswap_adapter_under_compile(tmp_path):
    paths = {
        "a": make_adapter(mlp(), tmp_path / "a", ["lin0", "lin1"], 0.2, False, 1),
        "b": make_adapter(mlp(), tmp_path / "b", ["conv", "conv1x1"], 0.3, True, 2),
    }
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    expected = {}
    for name, path in paths.items():
        with torch.no_grad():
            expected[name] = PeftModel.from_pretrained(mlp(), path).eval()(x)
    model = get_peft_model(mlp(), SaRAConfig(target_modules=["head"], trainable_fraction=0.5, init_weights=False))
    peft_sara.enable_sara_hotswap(model, max_fraction=0.3, target_modules=MLP_TARGETS, adapter_name="live")
    assert json.loads(json.dumps(list(model.peft_config))) == ["default", "live"]
    with torch.no_grad():
        compiled = torch.compile(model.base_model.model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), mlp()(x))  # only the inert slot is active
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ("a", "b", "a"):
                assert peft_sara.hotswap_adapter(model, paths[name], adapter_name="live") == "live"
                torch.testing.assert_close(compiled(x), expected[name], rtol=1e-5, atol=1e-6)
