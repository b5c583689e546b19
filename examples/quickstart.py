"""Quickstart: see SaRA fine-tune a diffusion model on your CPU in about five minutes, no downloads.

    python examples/quickstart.py            # same as: python -m peft_sara.demo
    python examples/quickstart.py --help     # output folder, steps, cache, seed, --quick

It pretrains (once; later runs reuse the cached weights) a small class-conditional diffusion UNet on scikit-learn's
8x8 digits, teaches it to draw digits 0-4 inverted with SaRA and with LoRA at the same trainable-parameter count,
and writes sample grids, both adapters, a loss plot and metrics.json to ./sara-demo-output. The code to copy from is
in peft_sara/demo/: finetune.py holds the SaRA set-up and training loop (about 20 lines that matter).
"""

import sys

from peft_sara.demo import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
