"""Profile ``PeftModel.from_pretrained`` of an SD1.5-shaped UNet (random weights) with SaRA at 2% of the default targets.

The selection is stubbed (the first ``round(0.02 * numel)`` entries of each weight): loads no longer select (the file
names the entries) and ``benchmarks.load`` times the selection itself, so what is left is the load's own cost: reading,
checking and decoding the file, injecting, and PEFT's ``load_state_dict``. One warm-up load, then one profiled.

Run: ``python -m benchmarks.profile_load ADAPTER_FOLDER OUT.prof`` (the adapter is saved there first if the folder does
not exist; about 80 MB). Prints the wall time and pstats' top 15 by cumulative time.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time

import torch
from peft import PeftModel, get_peft_model

import peft_sara.tuner.layer as layer_module
from peft_sara import SaRAConfig
from peft_sara.presets import PRESETS, build_model

FRACTION = 0.02


def first_entries(weight: torch.Tensor, threshold: float | None = None, trainable_fraction: float | None = None):
    """A stand-in for the selection: as many entries as it would choose, without reading the weight."""
    count = max(1, round((trainable_fraction or FRACTION) * weight.numel()))
    return torch.arange(count, device=weight.device), 0.0


def main() -> None:
    adapter, output = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    layer_module.select_trainable_indices = first_entries
    unet = build_model(PRESETS["sd15"], 0).eval()
    if not os.path.isdir(adapter):
        get_peft_model(unet, SaRAConfig(trainable_fraction=FRACTION, init_weights=False)).save_pretrained(adapter)
        unet = build_model(PRESETS["sd15"], 0).eval()
    unet = PeftModel.from_pretrained(unet, adapter).unload()  # warm-up: imports, allocator
    start = time.perf_counter()
    cProfile.runctx("PeftModel.from_pretrained(unet, adapter)", globals(), {"unet": unet, "adapter": adapter}, output)
    print(f"from_pretrained {time.perf_counter() - start:.2f} s")
    pstats.Stats(output).sort_stats("cumulative").print_stats(15)


if __name__ == "__main__":
    main()
