"""Training on a quantized base, as the recipes do it with ``--base_quantization``: the denoiser's Linear layers become
bitsandbytes 4-bit layers (on CPU here) before SaRA selects its entries, training runs (with the official weight decay),
and the saved adapter loads into the full-precision pipeline and changes its outputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_train_example import load_example, run_example, write_image_folder

import peft_sara
from peft_sara import sara_layers

pytestmark = pytest.mark.usefixtures("one_thread")
bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    import tiny_pipelines

    return tiny_pipelines.build_sd_pipeline(tmp_path_factory.mktemp("sd"))


def test_quantize_base_puts_sara_on_4bit_layers(sd_dir):
    from diffusers import StableDiffusionPipeline

    sara_models = load_example("sara_models")
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    args = SimpleNamespace(
        base_quantization="bnb-4bit",
        target_modules=None,
        gradient_checkpointing=False,
        enable_xformers_memory_efficient_attention=False,
        threshold=None,
        trainable_fraction=0.05,
        lambda_rank=0.0,
        rank_layers_per_step=1,
        rank_min_dim=16,
        progressive_fraction=None,
        progressive_step=None,
    )
    sara_models.quantize_base(args, pipe, torch.device("cpu"), torch.float32)
    sara_models.trained_modules(args, pipe)
    linear = [layer for _, layer in sara_layers(pipe.unet) if not isinstance(layer.get_base_layer(), torch.nn.Conv2d)]
    assert linear and all(isinstance(layer.get_base_layer(), bnb.nn.Linear4bit) for layer in linear)
    assert all(layer.weight_shape.numel() > layer.get_base_layer().weight.numel() for layer in linear)  # packed


def test_recipe_trains_on_a_4bit_base_and_the_adapter_applies_to_the_full_precision_one(sd_dir, tmp_path):
    import tiny_pipelines
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    argv = [
        *("--pretrained_model_name_or_path", str(sd_dir), "--output_dir", str(out)),
        *("--train_data_dir", str(write_image_folder(tmp_path / "data", count=2)), "--cache_dir", str(tmp_path / "c")),
        *"--resolution 32 --center_crop --train_batch_size 1 --max_train_steps 2 --checkpointing_steps 100".split(),
        *"--trainable_fraction 0.05 --learning_rate 1e-3 --report_to none --seed 0".split(),
        *"--base_quantization bnb-4bit --weight_decay_mode official --adam_weight_decay 1e-2".split(),
    ]
    run_example(load_example("train_text_to_image_sara"), argv)
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    base = tiny_pipelines.generate(pipe)
    peft_sara.load_sara_adapter(pipe, out)
    assert abs(tiny_pipelines.generate(pipe) - base).max() > 1e-4
