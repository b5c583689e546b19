"""``peft-sara analyze`` on a model folder it should not trust: its cost is bounded by the folder's own files (the
model is laid out on the meta device and a config that does not match the weights is refused before any allocation)."""

from __future__ import annotations

import json
import resource
import time

from conftest import tiny_unet

from peft_sara.cli import main


def test_analyze_refuses_a_config_that_describes_a_far_larger_model_than_its_weights(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_unet().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["block_out_channels"] = [8192, 16384]  # ~10 GB of float32 weights if it were allocated
    config["cross_attention_dim"] = 8192
    (folder / "config.json").write_text(json.dumps(config))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    assert main(["analyze", str(folder), "--no-histogram"]) == 2
    assert time.perf_counter() - start < 60
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2**20  # KiB: under 1 GiB more
    error = capsys.readouterr().err
    assert "peft-sara analyze: error:" in error and "Traceback" not in error
