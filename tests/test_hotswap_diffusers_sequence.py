"""diffusers' LoRA hotswap sequence, transcribed for SaRA: ``enable_sara_hotswap`` (sized by ``hotswap_sizing``), a
plain first ``load_sara_adapter`` (which fills the reserved slot and names it), ``torch.compile(fullgraph=True)``, then
``load_sara_adapter(..., hotswap=True, adapter_name=...)`` with no recompile, each output as a fresh load's, and no
warning from peft-sara while compiling."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from conftest import tiny_unet, unet_inputs
from peft import PeftModel, get_peft_model

import peft_sara
from peft_sara import SaRAConfig, sara_layers

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTERS = {  # name: (target_modules, trainable_fraction)
    "a": (["to_q", "to_k", "to_v"], 0.05),
    "b": (["conv1", "conv2", "to_q"], 0.08),
    "c": (["to_out.0", "proj_in"], 0.02),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequence")
    paths = {}
    for seed, (name, (targets, fraction)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        model = get_peft_model(
            tiny_unet(), SaRAConfig(target_modules=targets, trainable_fraction=fraction, init_weights=False)
        )
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def fresh(adapters):
    outputs = {}
    for name, path in adapters.items():
        with torch.no_grad():
            outputs[name] = PeftModel.from_pretrained(tiny_unet(), path).eval()(**unet_inputs()).sample
    return outputs


@pytest.fixture
def pipe(tmp_path_factory):
    import tiny_pipelines
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_pipelines.build_sd_pipeline(tmp_path_factory.mktemp("sd")))


def run(pipe):
    with torch.no_grad():
        return pipe.unet(**unet_inputs()).sample


def compile_without_our_warnings(pipe):
    """``pipe.unet = torch.compile(pipe.unet, fullgraph=True)`` and a first call; no warning may come from peft_sara."""
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output = run(pipe)
    ours = [str(w.message) for w in caught if "peft_sara" in (w.filename or "") or "peft_sara" in str(w.message)]
    assert not ours, ours
    return output


def test_sizing_reads_max_fraction_and_layers_from_the_files(adapters):
    sizing = peft_sara.hotswap_sizing(list(adapters.values()))
    assert sizing.largest[0] == str(adapters["b"])  # the 8% adapter sets the bound
    assert 0.08 <= sizing.max_fraction < 0.09
    layers = sizing.layers[""]
    assert any(name.endswith("to_q") for name in layers) and any(name.endswith("proj_in") for name in layers)
    assert not any(name.endswith("proj_out") for name in layers)
    assert "enable_sara_hotswap(pipe, max_fraction=" in sizing.call()


def test_diffusers_sequence_with_a_named_adapter(pipe, adapters, fresh):
    sizing = peft_sara.hotswap_sizing(list(adapters.values()))
    peft_sara.enable_sara_hotswap(pipe, max_fraction=sizing.max_fraction, target_modules=sizing.target_modules)
    assert peft_sara.load_sara_adapter(pipe, adapters["a"], adapter_name="style") == "style"
    # Loaded into the reserved slot (one adapter, named as the load asked), not beside it.
    assert pipe.get_list_adapters() == {"unet": ["style"]}
    assert pipe.get_active_adapters() == ["style"]
    torch.testing.assert_close(compile_without_our_warnings(pipe), fresh["a"], rtol=1e-5, atol=1e-5)
    slot_tensors = {name: layer.sara_values["style"] for name, layer in sara_layers(pipe.unet._orig_mod)}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name in ("b", "c", "a"):
            returned = peft_sara.load_sara_adapter(pipe, adapters[name], hotswap=True, adapter_name="style")
            assert returned == "style"
            torch.testing.assert_close(run(pipe), fresh[name], rtol=1e-5, atol=1e-5)
        # PEFT's entry point too, into the same slot.
        peft_sara.hotswap_adapter(pipe.unet, adapters["b"], adapter_name="style")
        torch.testing.assert_close(run(pipe), fresh["b"], rtol=1e-5, atol=1e-5)
    assert all(layer.sara_values["style"] is slot_tensors[name] for name, layer in sara_layers(pipe.unet._orig_mod))
    # The slot is claimed now: a second plain load is a second adapter, and the name is taken.
    with pytest.raises(ValueError, match="already has an adapter named 'style'"):
        peft_sara.load_sara_adapter(pipe, adapters["a"], adapter_name="style")


def test_diffusers_sequence_without_names_uses_default_0(pipe, adapters, fresh):
    peft_sara.enable_sara_hotswap(pipe, max_fraction=0.09, target_modules=["to_q", "to_k", "to_v", "conv1", "conv2"])
    name = peft_sara.load_sara_adapter(pipe, adapters["a"])
    assert name == "default_0" and pipe.get_list_adapters() == {"unet": ["default_0"]}
    pipe.set_adapters("default_0")
    torch.testing.assert_close(compile_without_our_warnings(pipe), fresh["a"], rtol=1e-5, atol=1e-5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        peft_sara.load_sara_adapter(pipe, adapters["b"], hotswap=True, adapter_name="default_0")
        torch.testing.assert_close(run(pipe), fresh["b"], rtol=1e-5, atol=1e-5)
        peft_sara.load_sara_adapter(pipe, adapters["a"], hotswap=True)  # no name: the one slot
        torch.testing.assert_close(run(pipe), fresh["a"], rtol=1e-5, atol=1e-5)


def test_a_slot_sized_below_the_sizing_refuses_the_largest_adapter(pipe, adapters):
    sizing = peft_sara.hotswap_sizing(list(adapters.values()))
    peft_sara.enable_sara_hotswap(pipe, max_fraction=sizing.max_fraction * 0.9, target_modules=sizing.target_modules)
    peft_sara.load_sara_adapter(pipe, adapters["a"], adapter_name="style")
    with pytest.raises(ValueError, match="does not fit the hotswap slot"):
        peft_sara.load_sara_adapter(pipe, adapters["b"], hotswap=True, adapter_name="style")
    with pytest.raises(ValueError, match="already has a hotswap slot"):  # one slot per component
        peft_sara.enable_sara_hotswap(pipe, max_fraction=0.5, adapter_name="other")


def test_refused_first_plain_load_leaves_the_slot_unclaimed(pipe, adapters):
    peft_sara.enable_sara_hotswap(pipe, max_fraction=0.03, target_modules=["to_q", "to_k", "to_v"])
    before = {name: tensor.clone() for name, tensor in pipe.unet.state_dict().items() if "sara_" in name}
    with pytest.raises(ValueError, match=r"does not fit the hotswap slot.*max_fraction >= 0\.0499"):
        peft_sara.load_sara_adapter(pipe, adapters["a"], adapter_name="style")  # 5% into 3%
    assert list(pipe.unet.peft_config) == ["default"]
    assert not peft_sara.hotswap_slot(pipe.unet).claimed
    after = {name: tensor for name, tensor in pipe.unet.state_dict().items() if "sara_" in name}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_inspect_with_several_adapters_prints_the_enable_call(adapters, capsys):
    from peft_sara.commands import inspect_cmd

    assert inspect_cmd.main([str(path) for path in adapters.values()]) == 0
    line = capsys.readouterr().out.splitlines()[-1].strip()
    assert line.startswith("peft_sara.enable_sara_hotswap(pipe, max_fraction=0.08")
    assert line == peft_sara.hotswap_sizing(list(adapters.values())).call()


def test_unloading_the_adapter_releases_the_slot(pipe, adapters):
    peft_sara.enable_sara_hotswap(pipe, max_fraction=0.06, target_modules=["to_q", "to_k", "to_v"])
    peft_sara.load_sara_adapter(pipe, adapters["a"], adapter_name="style")
    pipe.unload_lora_weights()
    assert peft_sara.hotswap_slot(pipe.unet) is None
    peft_sara.enable_sara_hotswap(pipe, max_fraction=0.06, target_modules=["to_q", "to_k", "to_v"])  # a new one
    assert peft_sara.load_sara_adapter(pipe, adapters["a"]) == "default_0"
