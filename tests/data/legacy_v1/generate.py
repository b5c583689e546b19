"""How the legacy_v1 samples were generated, with main at dc2a78b (format 1 with safetensors metadata: peft_sara_layouts,
peft_sara_model_class). Kept for the record; rerunning it with a later peft-sara writes the new form instead."""

import sys

import torch

sys.path.insert(0, "tests")
from conftest import Conv1DModel, tiny_unet, unet_inputs
from peft import get_peft_model, inject_adapter_in_model
from safetensors.torch import save_file

from peft_sara import SaRAConfig
from peft_sara.adapter_files import save_model_adapter

out = "tests/data/legacy_v1"
unet = tiny_unet()
torch.manual_seed(1)
unet.add_adapter(SaRAConfig(trainable_fraction=0.05, init_weights=False), adapter_name="default")
save_model_adapter(unet, f"{out}/unet_adapter", ["default"])
with torch.no_grad():
    y = unet(**unet_inputs()).sample
torch.save(y, "/tmp/legacy_unet_out.pt")
torch.manual_seed(0)
m = Conv1DModel(hidden=16)
torch.manual_seed(2)
pm = get_peft_model(m, SaRAConfig(trainable_fraction=0.2, init_weights=False, target_modules=["c_fc", "c_proj"]))
# the project's own writer of a PeftModel adapter: PEFT's save_pretrained (no metadata) -- and the injected path with metadata:
pm.save_pretrained(f"{out}/conv1d_peft")

save_file({"sample": y.contiguous()}, f"{out}/unet_adapter_output.safetensors")
torch.manual_seed(0)
m2 = Conv1DModel(hidden=16)
torch.manual_seed(2)
inject_adapter_in_model(
    SaRAConfig(trainable_fraction=0.2, init_weights=False, target_modules=["c_fc", "c_proj"]), m2, "default"
)
save_model_adapter(m2, f"{out}/conv1d_injected", ["default"])
