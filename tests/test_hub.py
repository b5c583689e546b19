"""SaRA adapters and the Hugging Face Hub: model cards, the offline cache, and uploads / downloads through the real
``huggingface_hub`` client against a local stub of the Hub API (``hub_stub.HubStub``, 127.0.0.1 only)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load, load_file

import peft_sara
from peft_sara.hub import push_sara_adapter, sara_model_card
from peft_sara.pipelines import load_sara_adapter, save_sara_adapter

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS_DIR)  # helper modules beside this file, with or without tests/__init__.py
import tiny_pipelines  # noqa: E402
from hub_stub import HubStub  # noqa: E402
from tiny_pipelines import generate  # noqa: E402

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
CARD_TAGS = {"sara", "peft-sara", "diffusers", "text-to-image"}


def load_sd(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A saved tiny SD pipeline, its base images, and a random SaRA adapter (unet + text_encoder) saved locally."""
    root = tmp_path_factory.mktemp("sd-hub")
    pipeline_dir = tiny_pipelines.build_sd_pipeline(root)
    pipe = load_sd(pipeline_dir)
    base = generate(pipe)
    tiny_pipelines.add_random_sara_adapter(pipe, "style")
    adapted = generate(pipe)
    adapter_dir = save_sara_adapter(pipe, root / "adapter", base_model="org/tiny-sd", repo_id="org/sara-style")
    return SimpleNamespace(pipeline_dir=pipeline_dir, pipe=pipe, adapter_dir=adapter_dir, base=base, adapted=adapted)


@pytest.fixture(scope="module")
def hub():
    with HubStub(lifetime_s=600) as stub:
        yield stub


def card_metadata(text: str) -> dict:
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


# ------------------------------------------------------------------------------------------------- model card
def test_model_card_carries_the_hub_metadata_and_a_usage_snippet(sd):
    card = ModelCard.load(sd.adapter_dir / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model == "org/tiny-sd"
    assert card.data.base_model_relation == "adapter"
    assert card.data.pipeline_tag == "text-to-image"
    assert CARD_TAGS <= set(card.data.tags)
    assert "## How to use" in card.text
    assert "import peft_sara" in card.text
    assert 'peft_sara.load_sara_adapter(pipe, "org/sara-style", adapter_name="style")' in card.text
    assert 'DiffusionPipeline.from_pretrained("org/tiny-sd"' in card.text
    assert "| unet |" in card.text and "| text_encoder |" in card.text


def test_model_card_keeps_local_base_paths_out_of_the_header(tmp_path):
    config = peft_sara.SaRAConfig(threshold=2e-3)
    card = sara_model_card(base_model=str(tmp_path), configs={"unet": config}, pipeline_class="StableDiffusionPipeline")
    assert card.data.base_model is None and card.data.to_dict().get("base_model_relation") is None
    assert str(tmp_path) in card.text
    assert r"\|w\| < 0.002" in card.text  # escaped inside the Markdown table


# ------------------------------------------------------------------------------------------------- HF cache
def write_cached_snapshot(cache: Path, repo_id: str, ref: str, sha: str, files: dict[str, Path]) -> None:
    """Lay files out as huggingface_hub's cache does: models--org--name/{refs/<ref>, snapshots/<sha>/...}."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(sha)
    for path_in_repo, source in files.items():
        target = repo_dir / "snapshots" / sha / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def test_load_by_repo_id_from_the_cache_when_offline(sd, hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    main_sha, dev_sha = "1" * 40, "2" * 40
    everything = {str(p.relative_to(sd.adapter_dir)): p for p in sd.adapter_dir.rglob("*") if p.is_file()}
    write_cached_snapshot(cache, "org/sara-style", "main", main_sha, everything)
    unet_only = {f"nested/{path}": p for path, p in everything.items() if path.startswith("unet/")}
    write_cached_snapshot(cache, "org/sara-style", "dev", dev_sha, unet_only)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both at import time: patch its constants too. Any request would go to the stub.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
    requests_before = len(hub.requests)

    pipe = load_sd(sd.pipeline_dir)
    assert load_sara_adapter(pipe, "org/sara-style") == "default_0"
    assert pipe.get_list_adapters() == {"unet": ["default_0"], "text_encoder": ["default_0"]}
    np.testing.assert_allclose(generate(pipe), sd.adapted, rtol=0, atol=1e-6)

    pipe = load_sd(sd.pipeline_dir)
    load_sara_adapter(pipe, "org/sara-style", revision="dev", subfolder="nested", adapter_name="dev")
    assert pipe.get_list_adapters() == {"unet": ["dev"]}
    load_sara_adapter(pipe, "org/sara-style", revision=main_sha, components=["text_encoder"], adapter_name="pinned")
    assert pipe.get_list_adapters() == {"unet": ["dev"], "text_encoder": ["pinned"]}

    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(LocalEntryNotFoundError):
        load_sara_adapter(pipe, "org/sara-style", revision="no-such-branch")
    with pytest.raises(LocalEntryNotFoundError):
        load_sara_adapter(pipe, "org/not-cached")
    assert len(hub.requests) == requests_before, "offline loading must not touch the network"


# ------------------------------------------------------------------------------------------------- uploads
def test_push_sara_adapter_uploads_one_folder_per_component_and_the_card(sd, hub):
    commit = push_sara_adapter(sd.pipe, "org/pipe-sara", base_model="org/tiny-sd", endpoint=hub.url)
    assert str(commit).startswith(f"{hub.url}/org/pipe-sara/commit/")
    files = hub.files("org/pipe-sara")
    assert set(files) == {"README.md"} | {f"{c}/{f}" for c in ("unet", "text_encoder") for f in ADAPTER_FILES}

    metadata = card_metadata(files["README.md"].decode())
    assert metadata["library_name"] == "peft" and metadata["base_model"] == "org/tiny-sd"
    assert metadata["base_model_relation"] == "adapter" and metadata["pipeline_tag"] == "text-to-image"
    assert CARD_TAGS <= set(metadata["tags"])
    assert 'load_sara_adapter(pipe, "org/pipe-sara"' in files["README.md"].decode()
    for component in ("unet", "text_encoder"):
        config = json.loads(files[f"{component}/adapter_config.json"])
        assert config["peft_type"] == "SARA" and config["base_model_name_or_path"] == "org/tiny-sd"
        uploaded = load(files[f"{component}/adapter_model.safetensors"])
        local = load_file(sd.adapter_dir / component / "adapter_model.safetensors")
        assert uploaded.keys() == local.keys()
        assert all(torch.equal(uploaded[key], local[key]) for key in local)

    # Pushing again to the existing repo is a new commit (create_repo exist_ok), not an error.
    again = push_sara_adapter(sd.pipe, "org/pipe-sara", components=["unet"], endpoint=hub.url)
    assert str(again) != str(commit)


def test_push_sara_adapter_puts_a_single_model_at_the_root(sd, hub):
    from diffusers import UNet2DConditionModel
    from peft import get_peft_model

    unet = UNet2DConditionModel.from_pretrained(sd.pipeline_dir, subfolder="unet")
    torch.manual_seed(1)
    peft_unet = get_peft_model(unet, peft_sara.SaRAConfig(trainable_fraction=0.05, init_weights=False))
    push_sara_adapter(peft_unet, "org/unet-sara", base_model="org/tiny-sd", endpoint=hub.url)
    files = hub.files("org/unet-sara")
    assert set(files) == ADAPTER_FILES | {"README.md"}
    metadata = card_metadata(files["README.md"].decode())
    assert metadata["library_name"] == "peft" and metadata["base_model"] == "org/tiny-sd"
    assert CARD_TAGS <= set(metadata["tags"])
    card = files["README.md"].decode()
    assert "import peft_sara" in card and "PeftModel.from_pretrained" in card and "load_sara_adapter" in card
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "org/tiny-sd"
    # The model keeps the base it was loaded from.
    assert peft_unet.peft_config["default"].base_model_name_or_path != "org/tiny-sd"


CLIENT_SCRIPT = textwrap.dedent(
    """
    # Runs in a fresh interpreter: huggingface_hub and transformers read HF_ENDPOINT when they are imported.
    import json, sys
    import numpy as np, torch
    sys.path.insert(0, {tests_dir!r})
    torch.set_num_threads(1)
    import peft_sara, tiny_pipelines
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from huggingface_hub import hf_hub_download
    from peft import PeftModel, get_peft_model

    report = {{}}
    unet = UNet2DConditionModel.from_pretrained({pipeline_dir!r}, subfolder="unet")
    torch.manual_seed(2)
    peft_unet = get_peft_model(unet, peft_sara.SaRAConfig(trainable_fraction=0.05, init_weights=False))
    report["push_url"] = str(peft_unet.push_to_hub("org/unet-push-to-hub"))

    config_path = hf_hub_download("org/unet-push-to-hub", "adapter_config.json")
    report["downloaded_peft_type"] = json.load(open(config_path))["peft_type"]
    fresh = PeftModel.from_pretrained(
        UNet2DConditionModel.from_pretrained({pipeline_dir!r}, subfolder="unet"), "org/unet-push-to-hub"
    )
    mine = {{k: v for k, v in peft_unet.state_dict().items() if "sara_" in k}}
    theirs = {{k: v for k, v in fresh.state_dict().items() if "sara_" in k}}
    report["round_trip_equal"] = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    pipe = StableDiffusionPipeline.from_pretrained({pipeline_dir!r})
    report["adapter_name"] = peft_sara.load_sara_adapter(pipe, "org/pipe-sara-download")
    np.save({images_path!r}, tiny_pipelines.generate(pipe))
    try:
        peft_sara.load_sara_adapter(pipe, "org/missing")
    except Exception as error:
        report["missing_repo_error"] = type(error).__name__
    print("REPORT " + json.dumps(report))
    """
)


def test_push_to_hub_and_load_by_repo_id_through_the_real_client(sd, hub, tmp_path):
    # The pipeline adapter the client downloads; uploaded here so this test stands alone.
    push_sara_adapter(sd.pipe, "org/pipe-sara-download", base_model="org/tiny-sd", endpoint=hub.url)
    images_path = tmp_path / "images.npy"
    script = CLIENT_SCRIPT.format(tests_dir=TESTS_DIR, pipeline_dir=str(sd.pipeline_dir), images_path=str(images_path))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_CACHE=str(tmp_path / "cache"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    # This checkout's peft_sara (the interpreter runs in tmp_path), whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])

    # PeftModel.push_to_hub (transformers' PushToHubMixin) uploads exactly the adapter and a card. That card is
    # transformers' generic template (library_name: transformers, no base_model): push_sara_adapter writes a SaRA one.
    assert report["push_url"].startswith(f"{hub.url}/org/unet-push-to-hub/commit/")
    assert set(hub.files("org/unet-push-to-hub")) == ADAPTER_FILES | {"README.md"}
    assert report["downloaded_peft_type"] == "SARA"
    assert report["round_trip_equal"] is True
    # load_sara_adapter resolves the repo id through HF_ENDPOINT and reproduces the uploading pipeline.
    assert report["adapter_name"] == "default_0"  # named as diffusers names an unnamed LoRA
    np.testing.assert_allclose(np.load(images_path), sd.adapted, rtol=0, atol=1e-6)
    assert report["missing_repo_error"] == "RepositoryNotFoundError"
    assert not hub.unhandled_for("org")
