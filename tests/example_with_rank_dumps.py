"""Run ``examples/train_text_to_image_sara.py`` with its arguments, and have every rank write its SaRA tensors.

For ``tests/test_distributed.py``: at ``accelerator.end_training()`` each process saves the SaRA parameters and buffers
of the models it prepared to ``$SARA_RANK_DUMP_DIR/rank<i>.pt``, so the test can compare ranks (the script itself
saves from the main process only).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "train_text_to_image_sara.py"
_end_training = Accelerator.end_training


def end_training_with_rank_dump(self: Accelerator) -> None:
    tensors = {}
    for model in self._models:
        module = self.unwrap_model(model)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if "sara_" in name:
                tensors[name] = tensor.detach().cpu().clone()
    torch.save(tensors, Path(os.environ["SARA_RANK_DUMP_DIR"], f"rank{self.process_index}.pt"))
    _end_training(self)


if __name__ == "__main__":
    Accelerator.end_training = end_training_with_rank_dump
    sys.argv = [str(SCRIPT), *sys.argv[1:]]
    runpy.run_path(str(SCRIPT), run_name="__main__")
