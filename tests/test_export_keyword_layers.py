"""A LoRA export warns about layers diffusers calls with ``input=`` (AnimateDiff's motion-module ``proj_in`` /
``proj_out``), where PEFT's LoRA layers fail; ``peft-sara export`` names a root adapter's component with
``--component`` and says so in its own terms when the files do not record it."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from peft_sara import SaRAConfig
from peft_sara.conversion import export_adapter, read_adapter_files

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ["proj_in", "proj_out", "to_q"]


class MotionHolder(nn.Module):
    """What AnimateDiff's UNet holds: motion modules whose forward calls ``self.proj_in(input=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.motion_modules = nn.ModuleList(
            [AnimateDiffTransformer3D(num_attention_heads=1, attention_head_dim=8, in_channels=8, norm_num_groups=4)]
        )

    def forward(self, x, num_frames=2):
        return self.motion_modules[0](x, num_frames=num_frames)


def holder():
    torch.manual_seed(0)
    return MotionHolder().eval()


def frames():
    return torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1))


def test_the_named_failure_a_peft_lora_on_proj_in_cannot_run():
    model = get_peft_model(holder(), LoraConfig(target_modules=["proj_in"]))
    with pytest.raises(TypeError):
        model(frames())


def test_lora_exports_warn_naming_the_keyword_called_layers(tmp_path):
    model = get_peft_model(holder(), SaRAConfig(target_modules=TARGETS, trainable_fraction=0.1, init_weights=False))
    model(frames())  # SaRA runs them
    for fmt, output in (("diffusers", tmp_path / "d"), ("peft-lora", tmp_path / "p")):
        with pytest.warns(
            UserWarning, match=r"2 layers that diffusers calls with a keyword.*motion_modules\.0\.proj_in"
        ):
            export_adapter(model, output, fmt, component="unet")
    # From the files alone (no model to read), the same layers are recognised by their names.
    model.save_pretrained(tmp_path / "adapter")
    files = read_adapter_files(tmp_path / "adapter", component="unet")
    with pytest.warns(UserWarning, match="2 layers that diffusers calls with a keyword"):
        export_adapter(files, tmp_path / "f", "diffusers")


def test_export_cli_picks_the_component_of_a_root_adapter_without_a_recorded_class(tmp_path, capsys):
    from peft_sara.commands import export_cmd

    model = get_peft_model(holder(), SaRAConfig(target_modules=["to_q"], trainable_fraction=0.1, init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file(load_file(weights), weights)  # as another tool writes it: no metadata, no recorded model class
    argv = [str(tmp_path / "adapter"), "--format", "kohya", "-o", str(tmp_path / "out.safetensors")]
    with pytest.raises(SystemExit) as stop:
        export_cmd.main(argv)
    assert "--component" in str(stop.value) and "component=" not in str(stop.value)
    assert export_cmd.main([*argv, "--component", "unet", "--quiet"]) == 0
    assert any(key.startswith("lora_unet_motion_modules_0") for key in load_file(tmp_path / "out.safetensors"))
