"""PeftModel behaviour with SaRA: selection, adapters, merging, scaling, compile, checkpointing, diffusers models."""

from __future__ import annotations

import pytest
import torch
from conftest import sd3_inputs, tiny_clip_text, tiny_sd3_transformer, tiny_unet, unet_inputs
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from peft_sara import SaRAConfig, SaRALayer

TARGETS = ["conv", "conv1x1", "lin0", "lin1"]
X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))


def base_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def sara(model, **kwargs):
    kwargs.setdefault("target_modules", TARGETS)
    kwargs.setdefault("init_weights", False)
    kwargs.setdefault("trainable_fraction", 0.2)
    return get_peft_model(model, SaRAConfig(**kwargs))


def weights_of(peft_model):
    return {k: v.clone() for k, v in peft_model.base_model.model.state_dict().items() if "sara_" not in k}


def test_threshold_selects_exactly_the_small_weights(mlp_conv):
    threshold = 0.02
    expected = {
        name: int((m.weight.abs() < threshold).sum()) for name, m in mlp_conv.named_modules() if name in TARGETS
    }
    model = get_peft_model(mlp_conv, SaRAConfig(threshold=threshold, target_modules=TARGETS))
    for name, layer in model.base_model.sara_layers():
        assert layer.num_trainable("default") == expected[name]
        weight = layer.get_base_layer().weight.reshape(-1)
        assert (weight[layer.sara_indices["default"].long()].abs() < threshold).all()
    assert model.get_nb_trainable_parameters()[0] == sum(expected.values())


def test_trainable_fraction_selects_the_smallest_fraction_per_layer(mlp_conv):
    model = get_peft_model(mlp_conv, SaRAConfig(trainable_fraction=0.1, target_modules=TARGETS))
    for _, layer in model.base_model.sara_layers():
        weight = layer.get_base_layer().weight.reshape(-1).abs()
        selected = layer.sara_indices["default"].long()
        assert selected.numel() == max(1, round(0.1 * weight.numel()))
        unselected = torch.ones_like(weight, dtype=torch.bool)
        unselected[selected] = False
        assert weight[selected].max() <= weight[unselected].min()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(threshold=1e-3, trainable_fraction=0.1), "exactly one"),
        (dict(threshold=-1.0), "threshold"),
        (dict(trainable_fraction=1.5), "trainable_fraction"),
        (dict(save_dtype="int8"), "save_dtype"),
        (dict(kernel="cuda"), "kernel"),
        (dict(lambda_rank=-1.0), "lambda_rank"),
        (dict(rank_layers_per_step=0), "rank_layers_per_step"),
        (dict(progressive_fraction=1.0), "progressive_fraction"),
        (dict(layers_pattern="blocks"), "layers_to_transform"),
    ],
)
def test_config_rejects_bad_values_with_named_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SaRAConfig(**kwargs)


def test_missing_targets_for_unknown_model_is_a_clear_error(mlp_conv):
    with pytest.raises(ValueError, match="no default `target_modules` for MLPConv"):
        get_peft_model(mlp_conv, SaRAConfig())


def test_merge_unmerge_and_unload_are_bitwise(mlp_conv):
    original = base_state(mlp_conv)
    model = sara(mlp_conv)
    unmerged_out = model(X)
    model.merge_adapter()
    assert torch.equal(model(X), unmerged_out)
    model.unmerge_adapter()
    assert all(torch.equal(original[k.replace("base_layer.", "")], v) for k, v in weights_of(model).items())
    base = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    assert all(torch.equal(original[k], v) for k, v in base.state_dict().items())


def test_merge_and_unload_gives_a_plain_model_with_the_adapted_outputs(mlp_conv):
    model = sara(mlp_conv)
    expected = model(X)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SaRALayer) for m in merged.modules())
    assert torch.equal(merged(X), expected)


def test_safe_merge_refuses_nan_and_leaves_weights_untouched(mlp_conv):
    model = sara(mlp_conv)
    before = weights_of(model)
    layer = model.base_model.model.lin0
    with torch.no_grad():
        layer.sara_values["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs detected while merging adapter 'default'"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(before[k], v) for k, v in weights_of(model).items())


def test_multiple_adapters_set_disable_delete(mlp_conv):
    base_out = mlp_conv(X)
    model = sara(mlp_conv)
    model.add_adapter("other", SaRAConfig(trainable_fraction=0.05, target_modules=["lin0"], init_weights=False))
    out_default = model(X)
    model.set_adapter("other")
    out_other = model(X)
    assert not torch.equal(out_default, out_other)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["base_model.model.lin0.sara_values.other"]
    with model.disable_adapter():
        assert torch.equal(model(X), base_out)
    model.base_model.set_adapter(["default", "other"])
    both = model(X)
    assert not torch.equal(both, out_default) and not torch.equal(both, out_other)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert torch.equal(model(X), out_default)


def test_modules_to_save_are_trained_and_saved(mlp_conv, tmp_path):
    model = sara(mlp_conv, modules_to_save=["head"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("head.modules_to_save" in n for n in trainable)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.head.weight" in keys


def test_both_key_spellings_load_both_ways_with_modules_to_save(tmp_path):
    # A PeftModel saves keys under "base_model.model."; a model with injected layers (diffusers' add_adapter,
    # load_sara_adapter) saves them without. Each loads into the other, SaRA entries and modules_to_save alike.
    from conftest import MLPConv
    from peft import PeftModel, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import save_file

    def fresh():
        torch.manual_seed(0)
        return MLPConv().eval()

    trained = sara(fresh(), modules_to_save=["head"]).eval()
    with torch.no_grad():
        trained.base_model.model.head.modules_to_save["default"].weight.add_(0.5)
    trained.save_pretrained(tmp_path / "peft")
    expected = trained(X)

    injected = fresh()
    config = SaRAConfig.from_pretrained(str(tmp_path / "peft"))
    inject_adapter_in_model(config, injected, "default", low_cpu_mem_usage=True)
    prefixed = get_peft_model_state_dict(trained)
    assert all(key.startswith("base_model.model.") for key in prefixed)
    # PEFT itself looks modules_to_save up under the model's own spelling; the SaRA entries take either.
    spelled = {
        key if "sara_" in key else key.removeprefix("base_model.model."): value for key, value in prefixed.items()
    }
    result = set_peft_model_state_dict(injected, spelled)
    assert not [key for key in result.unexpected_keys if "sara_" in key or "head" in key]
    assert torch.equal(injected(X), expected)

    unprefixed = get_peft_model_state_dict(injected)
    assert not any(key.startswith("base_model.model.") for key in unprefixed)
    (tmp_path / "injected").mkdir()
    spelled = {key if "sara_" in key else f"base_model.model.{key}": value for key, value in unprefixed.items()}
    save_file(
        {key: value.contiguous() for key, value in spelled.items()}, tmp_path / "injected" / "adapter_model.safetensors"
    )
    config.save_pretrained(tmp_path / "injected")
    reloaded = PeftModel.from_pretrained(fresh(), tmp_path / "injected").eval()
    assert torch.equal(reloaded(X), expected)
    assert torch.equal(
        reloaded.base_model.model.head.modules_to_save["default"].weight,
        trained.base_model.model.head.modules_to_save["default"].weight,
    )


def test_scaling_interfaces_used_by_diffusers(mlp_conv):
    model = sara(mlp_conv)
    full = model(X)
    layers = [layer for _, layer in model.base_model.sara_layers()]
    for layer in layers:
        layer.set_scale("default", 0.0)
    with model.disable_adapter():
        base_out = model(X)
    assert torch.equal(model(X), base_out)
    for layer in layers:
        layer.set_scale("default", 1.0)
        layer.scale_layer(0.5)
    half = model(X)
    for layer in layers:
        layer.unscale_layer(0.5)
    assert torch.equal(model(X), full)
    assert not torch.equal(half, full)
    for layer in layers:
        layer.scale_layer(3.0)
        layer.unscale_layer(None)
    assert torch.equal(model(X), full)


def test_adapter_names_in_forward_is_rejected(mlp_conv):
    model = sara(mlp_conv)
    with pytest.raises(ValueError, match="adapter_names"):
        model(X, adapter_names=["default", "default"])


def test_torch_compile_of_wrapped_model(mlp_conv):
    model = sara(mlp_conv)
    expected = model(X)
    compiled = torch.compile(model.base_model.model, backend="eager")
    torch.testing.assert_close(compiled(X), expected)
    compiled(X).sum().backward()
    assert model.base_model.model.lin0.sara_values["default"].grad is not None


def test_gradient_checkpointing_on_unet_gives_same_gradients():
    grads = []
    for checkpointing in (False, True):
        unet = tiny_unet()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        model = get_peft_model(unet, SaRAConfig(trainable_fraction=0.1, init_weights=False)).train()
        model(**unet_inputs()).sample.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_default_targets_for_unet_sd3_and_clip_text():
    unet_model = get_peft_model(tiny_unet(), SaRAConfig(trainable_fraction=0.1))
    names = {name.split(".")[-1] for name, _ in unet_model.base_model.sara_layers()}
    assert {"to_q", "proj_in", "conv1", "conv2"} <= names
    assert any(isinstance(layer.get_base_layer(), torch.nn.Conv2d) for _, layer in unet_model.base_model.sara_layers())
    dit = get_peft_model(tiny_sd3_transformer(), SaRAConfig(trainable_fraction=0.1, init_weights=False))
    assert any(name.endswith("add_q_proj") for name, _ in dit.base_model.sara_layers())
    out = dit(**sd3_inputs()).sample
    with dit.disable_adapter():
        assert not torch.equal(dit(**sd3_inputs()).sample, out)
    clip = get_peft_model(tiny_clip_text(), SaRAConfig(trainable_fraction=0.1))
    assert {name.split(".")[-1] for name, _ in clip.base_model.sara_layers()} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "fc1",
        "fc2",
    }


def test_diffusers_add_adapter_injects_in_place(tmp_path):
    unet = tiny_unet()
    base_out = unet(**unet_inputs()).sample
    unet.add_adapter(SaRAConfig(trainable_fraction=0.1, init_weights=False), adapter_name="style")
    assert type(unet).__name__ == "UNet2DConditionModel"
    adapted = unet(**unet_inputs()).sample
    assert not torch.equal(adapted, base_out)
    unet.disable_adapters()
    assert torch.equal(unet(**unet_inputs()).sample, base_out)
    unet.enable_adapters()
    assert torch.equal(unet(**unet_inputs()).sample, adapted)
    assert unet.active_adapters() == ["style"]
    # diffusers' LoRA convention for a merged model: fuse, unload the adapter layers, save.
    unet.fuse_lora()
    unet.unload_lora()
    assert type(unet).__name__ == "UNet2DConditionModel"
    assert not any(isinstance(module, SaRALayer) for module in unet.modules())
    unet.save_pretrained(tmp_path / "unet")
    reloaded = type(unet).from_pretrained(tmp_path / "unet")
    torch.testing.assert_close(reloaded(**unet_inputs()).sample, adapted, rtol=0, atol=1e-5)
