"""combine_adapters on what users hold: a pipeline, a component loaded with load_sara_adapter, a PeftModel (the
PeftModel case is in test_training.py)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from peft_sara import load_sara_adapter, sara_layers, save_sara_adapter
from peft_sara.merging import combine_adapters

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_pipelines  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def load_sd(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path)


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """A tiny SD pipeline with adapter 'a' (unet + text_encoder) loaded by load_sara_adapter and 'b' (unet only)."""
    root = tmp_path_factory.mktemp("combine")
    pipeline_dir = tiny_pipelines.build_sd_pipeline(root)
    source = load_sd(pipeline_dir)
    tiny_pipelines.add_random_sara_adapter(source, "a")
    save_sara_adapter(source, root / "a", adapter_name="a")
    return pipeline_dir, root


def loaded_pipeline(pipeline_dir, root):
    pipe = load_sd(pipeline_dir)
    load_sara_adapter(pipe, root / "a", adapter_name="a")
    tiny_pipelines.add_random_sara_adapter(pipe, "b", components=("unet",), seed=1)
    return pipe


def assert_weighted_sum(module, weights):
    for name, layer in sara_layers(module):
        expected = sum(w * layer.get_delta_weight(a).float() for a, w in weights.items() if a in layer.sara_values)
        torch.testing.assert_close(layer.get_delta_weight("mix").float(), expected, atol=1e-7, rtol=1e-6, msg=name)


def test_combine_adapters_on_a_pipeline_combines_each_component_and_saves(two_adapters, tmp_path):
    pipeline_dir, root = two_adapters
    pipe = loaded_pipeline(pipeline_dir, root)
    active = pipe.get_active_adapters()
    combine_adapters(pipe, ["a", "b"], [0.5, 0.25], "mix")
    assert pipe.get_list_adapters() == {"unet": ["a", "b", "mix"], "text_encoder": ["a", "mix"]}
    assert pipe.get_active_adapters() == active  # activating the new one is the caller's choice
    assert_weighted_sum(pipe.unet, {"a": 0.5, "b": 0.25})
    assert_weighted_sum(pipe.text_encoder, {"a": 0.5})

    save_sara_adapter(pipe, tmp_path / "mix", adapter_name="mix")
    reloaded = load_sd(pipeline_dir)
    load_sara_adapter(reloaded, tmp_path / "mix", adapter_name="mix")
    expected = dict(sara_layers(pipe.unet))
    for name, layer in sara_layers(reloaded.unet):
        assert torch.equal(layer.get_delta_weight("mix"), expected[name].get_delta_weight("mix"))


def test_combine_adapters_on_a_loaded_component(two_adapters):
    pipe = loaded_pipeline(*two_adapters)
    combine_adapters(pipe.unet, ["a", "b"], [1.0, -1.0], "mix")
    assert pipe.unet.peft_config.keys() == {"a", "b", "mix"} and "mix" not in pipe.text_encoder.peft_config
    assert_weighted_sum(pipe.unet, {"a": 1.0, "b": -1.0})
    with pytest.raises(ValueError, match=r"Unknown adapter\(s\) \['c'\]; available: \['a', 'b', 'mix'\]"):
        combine_adapters(pipe, ["a", "c"], [1.0, 1.0], "other")
    with pytest.raises(ValueError, match="'mix' already exists"):
        combine_adapters(pipe, ["a"], [1.0], "mix")
