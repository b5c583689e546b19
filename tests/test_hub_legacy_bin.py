"""A legacy ``adapter_model.bin`` served by the Hub is bounded as a local one is (issue 28, "every cost bounded by what
was read"): PEFT's ``from_pretrained`` of a repo id reaches SaRA's load check, which downloads the file PEFT would read
and refuses a compressed archive from its zip directory, before anything expands. Runs the real ``huggingface_hub``
client in a fresh interpreter against the local Hub stub (``hub_stub.HubStub``, 127.0.0.1 only)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from conftest import MLPConv
from peft import get_peft_model
from safetensors.torch import load_file

from peft_sara import SaRAConfig

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS_DIR)
from hub_stub import HubStub  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
EXPANDED_BYTES = 64 << 20  # what the compressed member expands to


def _deflated(archive: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as source, zipfile.ZipFile(out, "w") as target:
        for member in source.infolist():
            target.writestr(member.filename, source.read(member), compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def _torch_bytes(tensors) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def _serve(hub: HubStub, repo: str, files: dict[str, bytes]) -> None:
    sha = hashlib.sha1(repo.encode()).hexdigest()
    hub.trees[sha] = files
    hub.branches[repo] = {"main": sha}


CLIENT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    sys.path.insert(0, {tests_dir!r})
    torch.set_num_threads(1)
    import peft_sara
    from conftest import MLPConv
    from peft import PeftModel

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def load(repo):
        torch.manual_seed(0)
        try:
            model = PeftModel.from_pretrained(MLPConv().eval(), repo)
        except Exception as err:
            return type(err).__name__ + ": " + str(err)
        return {{k: v.tolist() for k, v in model.state_dict().items() if "sara_" in k}}

    report = {{"plain": load("org/plain-bin")}}  # first: imports, connections and caches are not the file's cost
    before = peak()
    report["hostile"] = load("org/compressed-bin")
    report["growth"] = peak() - before
    print("REPORT " + json.dumps(report))
    """
)


def test_a_compressed_bin_from_the_hub_is_refused_before_it_expands(tmp_path):
    torch.manual_seed(0)
    base = MLPConv().eval()
    torch.manual_seed(1)
    model = get_peft_model(
        base, SaRAConfig(target_modules=["lin0", "lin1"], trainable_fraction=0.2, init_weights=False)
    )
    model.save_pretrained(tmp_path / "a")
    config = (tmp_path / "a" / "adapter_config.json").read_bytes()
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    plain = _torch_bytes(tensors)  # torch.save's own archive (stored members): a valid legacy adapter
    hostile = _deflated(
        _torch_bytes({**tensors, "base_model.model.lin0.sara_values": torch.zeros(EXPANDED_BYTES // 4)})
    )
    assert len(hostile) < EXPANDED_BYTES // 200

    with HubStub(lifetime_s=300) as hub:
        _serve(hub, "org/plain-bin", {"adapter_config.json": config, "adapter_model.bin": plain})
        _serve(hub, "org/compressed-bin", {"adapter_config.json": config, "adapter_model.bin": hostile})
        env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_DISABLE_TELEMETRY="1")
        # This checkout's peft_sara, whatever is installed.
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        result = subprocess.run(
            [sys.executable, "-c", CLIENT.format(tests_dir=TESTS_DIR)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
    assert "REPORT " in result.stdout, result.stderr[-4000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    expected = {k: v.tolist() for k, v in model.state_dict().items() if "sara_" in k}
    assert report["plain"] == expected  # an uncompressed legacy file from the Hub still loads, equal
    assert report["hostile"].startswith("InvalidAdapterError") and "compressed members" in report["hostile"]
    assert report["growth"] <= 16 * len(hostile), report  # bar: 16x the file; expanding it would cost 64 MiB
