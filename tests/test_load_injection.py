"""Loading an adapter selects nothing: the file names the entries. PEFT's ``from_pretrained`` / ``load_adapter`` (with
the config they read from the folder), ``low_cpu_mem_usage=True`` and ``load_sara_adapter`` inject empty layers that
the checkpoint sizes; the result is the saved adapter, trainable when asked, and an adapter injected for a load that
never came refuses to run instead of silently training nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import MLPConv
from peft import PeftModel, get_peft_model

from peft_sara import SaRAConfig
from peft_sara.tuner import layer as layer_module
from peft_sara.tuner.selection import select_trainable_indices

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["conv", "conv1x1", "lin0", "lin1"]
X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def fresh_model() -> MLPConv:
    torch.manual_seed(0)
    return MLPConv()


@pytest.fixture
def saved(tmp_path):
    """A trained-looking adapter (random values, progressive re-selection applied) saved to ``tmp_path``."""
    torch.manual_seed(2)
    source = get_peft_model(
        fresh_model(), SaRAConfig(target_modules=TARGETS, trainable_fraction=0.2, init_weights=False)
    )
    for _, layer in source.base_model.sara_layers():
        with torch.no_grad():
            layer.sara_values["default"].add_(0.03)
        layer.reselect("default")
    source.save_pretrained(tmp_path)
    return source, tmp_path


@pytest.fixture
def no_selection(monkeypatch):
    """Fail the test if an injection selects entries."""

    def refuse(*args, **kwargs):
        raise AssertionError("the load ran the selection")

    monkeypatch.setattr(layer_module, "select_trainable_indices", refuse)


@pytest.mark.parametrize("kwargs", [{}, {"low_cpu_mem_usage": True}])
def test_from_pretrained_loads_the_saved_entries_without_selecting(saved, no_selection, kwargs):
    source, folder = saved
    loaded = PeftModel.from_pretrained(fresh_model(), folder, **kwargs)
    for (_, expected), (_, got) in zip(source.base_model.sara_layers(), loaded.base_model.sara_layers()):
        for expected_part, got_part in zip(expected.trainable_entries("default"), got.trainable_entries("default")):
            assert torch.equal(expected_part, got_part)
        for expected_part, got_part in zip(expected.frozen_entries("default"), got.frozen_entries("default")):
            assert torch.equal(expected_part, got_part)
        assert not got.awaits_entries("default")
    assert torch.equal(loaded(X), source(X))


def test_load_adapter_adds_a_second_adapter_without_selecting(saved, no_selection):
    source, folder = saved
    loaded = PeftModel.from_pretrained(fresh_model(), folder)
    loaded.load_adapter(folder, adapter_name="second")
    loaded.set_adapter("second")
    assert torch.equal(loaded(X), source(X))


def test_a_loaded_adapter_trains_its_entries_and_reselects_with_the_selections_cutoff(saved):
    source, folder = saved
    loaded = PeftModel.from_pretrained(fresh_model(), folder, is_trainable=True)
    params = [param for param in loaded.parameters() if param.requires_grad]
    assert sum(param.numel() for param in params) == sum(
        layer.num_trainable("default") for _, layer in source.base_model.sara_layers()
    )
    before = [param.detach().clone() for param in params]
    optimizer = torch.optim.SGD(params, lr=0.1)
    loaded(X).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(param, old) for param, old in zip(params, before))
    # Re-selection tests against the cutoff the selection rule gives on this base, as after get_peft_model.
    for (_, trained), (_, loaded_layer) in zip(source.base_model.sara_layers(), loaded.base_model.sara_layers()):
        _, expected_cutoff = select_trainable_indices(loaded_layer.get_base_layer().weight, trainable_fraction=0.2)
        assert loaded_layer.cutoff("default") == expected_cutoff == trained.cutoff("default")
        loaded_layer.reselect("default")


def test_an_adapter_injected_for_a_load_that_never_came_refuses_to_run(saved):
    _, folder = saved
    config = SaRAConfig.from_pretrained(str(folder))
    model = get_peft_model(fresh_model(), config)
    assert all(layer.awaits_entries("default") for _, layer in model.base_model.sara_layers())
    with pytest.raises(RuntimeError, match=r"no checkpoint has set its entries.*SaRAConfig\(\*\*config.to_dict\(\)\)"):
        model(X)
    # The suggested way to train a new adapter with the file's settings selects as usual.
    rebuilt = get_peft_model(fresh_model(), SaRAConfig(**config.to_dict()))
    assert all(layer.num_trainable("default") > 0 for _, layer in rebuilt.base_model.sara_layers())
    rebuilt(X)


def test_get_peft_model_selects_the_entries_right_away():
    model = get_peft_model(fresh_model(), SaRAConfig(target_modules=TARGETS, trainable_fraction=0.1))
    for _, layer in model.base_model.sara_layers():
        weight = layer.get_base_layer().weight
        expected, cutoff = select_trainable_indices(weight, trainable_fraction=0.1)
        assert torch.equal(layer.trainable_entries("default")[0], expected)
        assert layer.cutoff("default") == cutoff
        assert not layer.awaits_entries("default")


def test_diffusers_models_are_injected_through_add_adapter_without_selecting(tmp_path, no_selection):
    # diffusers' `add_adapter` takes no `low_cpu_mem_usage`: a load (any `weight_name`) and a hotswap slot still select
    # nothing, and the loaded UNet reproduces the saved adapter.
    import shutil
    from types import SimpleNamespace

    from conftest import tiny_unet, unet_inputs

    from peft_sara import enable_sara_hotswap, load_sara_adapter

    with pytest.MonkeyPatch.context() as allow_selection:  # the source adapter is trained anew: it selects
        allow_selection.setattr(layer_module, "select_trainable_indices", select_trainable_indices)
        source = get_peft_model(tiny_unet(), SaRAConfig(trainable_fraction=0.05, init_weights=False))
    source.save_pretrained(tmp_path / "a")
    shutil.move(tmp_path / "a" / "adapter_model.safetensors", tmp_path / "a" / "style.safetensors")
    pipe = SimpleNamespace(components={"unet": tiny_unet()})
    load_sara_adapter(pipe, tmp_path / "a", weight_name="style.safetensors")
    inputs = unet_inputs()
    assert torch.equal(pipe.components["unet"](**inputs).sample, source(**inputs).sample)
    served = SimpleNamespace(components={"unet": tiny_unet()})
    enable_sara_hotswap(served, max_fraction=0.05)
    assert torch.equal(served.components["unet"](**inputs).sample, tiny_unet()(**inputs).sample)
