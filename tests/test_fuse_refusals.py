"""diffusers' ``fuse_lora`` on SaRA layers when a layer's storage refuses the merge (issue 28): within one model nothing
changes, the strengths ``fuse_lora(lora_scale=...)`` set right before the refused merge included; across a pipeline's
components diffusers fuses one component after the other, so a refusal in a later component leaves the earlier ones
fused, which ``pipe.unfuse_lora()`` undoes bitwise (docs/RELIABILITY.md, "Refused means unchanged")."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import tiny_unet
from test_refusals import assert_unchanged, snapshot
from torch import nn

import peft_sara
from peft_sara.tuner.layer import sara_layers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_pipelines  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _float8(layer) -> None:
    base = layer.get_base_layer()
    base.weight = nn.Parameter(base.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)


def test_fuse_lora_with_a_scale_refused_in_the_third_layer_changes_nothing():
    """diffusers scales each layer right before its merge: the refused merge puts the first layer's strength back."""
    model = tiny_unet()
    model.add_adapter(peft_sara.SaRAConfig(target_modules=["to_q", "to_k", "to_v"], init_weights=False))
    _float8([layer for _, layer in sara_layers(model)][2])
    before = snapshot(model)
    scales = [dict(layer.sara_scaling) for _, layer in sara_layers(model)]
    with pytest.raises(ValueError, match="float8.*Nothing was merged"):
        model.fuse_lora(lora_scale=0.7)
    assert [dict(layer.sara_scaling) for _, layer in sara_layers(model)] == scales
    assert_unchanged(model, before, ignore_attributes={"lora_scale", "_safe_fusing"})
    # The forward path's own scale / unscale (cross_attention_kwargs={"scale": ...}) is untouched by this.
    layer = next(layer for _, layer in sara_layers(model))
    layer.scale_layer(0.5)
    layer.unscale_layer(0.5)
    assert dict(layer.sara_scaling) == scales[0]


def test_pipe_fuse_lora_refused_in_the_text_encoder_leaves_the_unet_fused_until_unfuse(tmp_path):
    """What a pipeline's fuse_lora does (diffusers fuses component by component, no SaRA code sees the whole call):
    the UNet is fused before the text encoder's check refuses; the text encoder is unchanged; pipe.unfuse_lora()
    restores the UNet's weights bitwise."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipelines.build_sd_pipeline(tmp_path))
    tiny_pipelines.add_random_sara_adapter(pipe, "style")
    _float8(list(sara_layers(pipe.text_encoder))[1][1])
    unet_before, text_before = snapshot(pipe.unet), snapshot(pipe.text_encoder)
    with pytest.raises(ValueError, match="float8.*Nothing was merged"):
        pipe.fuse_lora(lora_scale=0.5)
    assert all(layer.merged_adapters == ["style"] for _, layer in sara_layers(pipe.unet))
    assert not pipe._merged_adapters  # diffusers records nothing: the call failed
    assert_unchanged(pipe.text_encoder, text_before)
    with pytest.warns(UserWarning, match="Already unmerged"):  # the text encoder's layers: nothing to undo
        pipe.unfuse_lora()
    assert not any(layer.merged_adapters for _, layer in sara_layers(pipe.unet))
    after = snapshot(pipe.unet)
    assert all(torch.equal(after["tensors"][k], v) for k, v in unet_before["tensors"].items() if "sara_" not in k)
