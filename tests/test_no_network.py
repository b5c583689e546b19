"""Nothing the project does locally reaches the network: importing ``peft_sara``, running ``peft-sara --help`` and
``inspect`` on a local adapter, and loading that adapter into a pipeline from local folders open no socket.

The check runs in a fresh interpreter whose ``socket`` functions record (and refuse) every name lookup and connection,
so it also sees requests that third-party libraries make on their own while the project imports them (bitsandbytes'
Hub kernel lookup on AVX512-BF16 CPUs was one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_pipelines import add_random_sara_adapter, build_sd_pipeline

TESTS_DIR = Path(__file__).parent

GUARDED_SCRIPT = r"""
import json, runpy, socket, sys

attempts = []

def refuse(kind):
    def guard(*args, **kwargs):
        attempts.append([kind, repr(args[1:] if kind == "connect" else args)[:200]])
        raise OSError(f"network access is refused in this test ({kind})")
    return guard

socket.socket.connect = refuse("connect")
socket.socket.connect_ex = refuse("connect")
socket.getaddrinfo = refuse("getaddrinfo")
socket.create_connection = refuse("create_connection")

def cli(*argv):
    sys.argv = ["peft-sara", *argv]
    try:
        runpy.run_module("peft_sara", run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        assert not exit.code, f"peft-sara {argv} exited with {exit.code}"

import peft_sara
cli("--help")
cli("inspect", ADAPTER_DIR)

from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(PIPELINE_DIR)
name = peft_sara.load_sara_adapter(pipe, ADAPTER_DIR)
images = pipe("a prompt", num_inference_steps=2, height=32, width=32, output_type="np").images
print("REPORT " + json.dumps({"attempts": attempts, "adapter": name, "image_shape": list(images.shape)}))
"""


def test_import_cli_and_local_load_open_no_socket(tmp_path):
    from diffusers import StableDiffusionPipeline

    import peft_sara

    pipeline_dir = build_sd_pipeline(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    add_random_sara_adapter(pipe, "style")
    adapter_dir = tmp_path / "adapter"
    peft_sara.save_sara_adapter(pipe, adapter_dir, adapter_name="style")

    script = f"ADAPTER_DIR, PIPELINE_DIR = {str(adapter_dir)!r}, {str(pipeline_dir)!r}\n{GUARDED_SCRIPT}"
    # No Hub variables from the caller: the promise must hold without HF_HUB_OFFLINE. Any request that still tried
    # would go to an endpoint on this machine, and the guard records it before it leaves.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    # This checkout's peft_sara first (the interpreter runs in tmp_path), whatever is installed; then the test helpers.
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HUB_CACHE=str(tmp_path / "hub-cache"),
        PYTHONPATH=os.pathsep.join([str(TESTS_DIR.resolve().parent), str(TESTS_DIR)]),
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    assert report["attempts"] == []
    assert report["adapter"]
    assert report["image_shape"][0] == 1
