"""PEFT's own ``PeftModel.save_pretrained`` writes ``adapter_model.safetensors`` and then ``adapter_config.json``, each in
place (issue 28): a kill between the two leaves the new weights beside the old config. The weights record the
fingerprint of the config saved with them (``sara_config_fingerprint``, ``SaRAConfig.config_fingerprint``), and every
reader refuses a pair from two different saves; files of format 2 (no fingerprint) load as before."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from conftest import MLPConv
from peft import PeftModel, get_peft_model
from peft.config import PeftConfigMixin
from safetensors.torch import load_file, save_file

from peft_sara import InvalidAdapterError, SaRAConfig
from peft_sara.adapter_files import read_adapter_weights
from peft_sara.training import load_training_state, save_training_state

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ["conv", "lin0", "lin1"]
X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
HALF_WRITTEN = "two different saves"


def mlp() -> MLPConv:
    torch.manual_seed(0)
    return MLPConv().eval()


def peft_model(seed: int, lambda_rank: float = 0.0):
    base = mlp()
    torch.manual_seed(seed)  # the adapter's random values
    config = SaRAConfig(target_modules=TARGETS, trainable_fraction=0.2, init_weights=False, lambda_rank=lambda_rank)
    return get_peft_model(base, config)


def trainable(model) -> list[torch.nn.Parameter]:
    return [param for param in model.parameters() if param.requires_grad]


def outputs(folder) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(mlp(), folder)(X)


def mix(old, new, target):
    """``target``: the folder a save of ``new`` over ``old`` leaves when killed between PEFT's two writes."""
    shutil.copytree(old, target)
    shutil.copy2(new / "adapter_model.safetensors", target / "adapter_model.safetensors")
    return target


def test_the_weights_and_the_config_carry_the_same_fingerprint(tmp_path):
    model = peft_model(1, lambda_rank=1e-3)
    model.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    record = load_file(tmp_path / "a" / "adapter_model.safetensors")["base_model.model.sara_config_fingerprint"]
    assert (
        config["config_fingerprint"]
        == bytes(record.tolist()).hex()
        == model.peft_config["default"].to_dict()["config_fingerprint"]
    )
    # PEFT's bookkeeping, filled in while it saves, is not part of it; the settings are.
    live = model.peft_config["default"]
    before = live.settings_fingerprint()
    live.inference_mode, live.base_model_name_or_path = True, "elsewhere"
    assert live.settings_fingerprint() == before
    live.lambda_rank = 2e-3
    assert live.settings_fingerprint() != before


def test_new_weights_beside_the_old_config_are_refused_by_every_reader(tmp_path):
    peft_model(1, lambda_rank=0.0).save_pretrained(tmp_path / "old")
    new = peft_model(2, lambda_rank=1e-3)
    new.save_pretrained(tmp_path / "new")
    folder = mix(tmp_path / "old", tmp_path / "new", tmp_path / "mixed")

    with pytest.raises(InvalidAdapterError, match=HALF_WRITTEN) as refused:
        PeftModel.from_pretrained(mlp(), folder)
    assert "half-written save" in str(refused.value) and "config_fingerprint" in str(refused.value)
    with pytest.raises(InvalidAdapterError, match=HALF_WRITTEN):
        read_adapter_weights(folder)  # load_sara_adapter, hotswap, resume, inspect, export, push read through it

    existing = peft_model(3)
    before = {key: value.clone() for key, value in existing.state_dict().items()}
    with pytest.raises(InvalidAdapterError, match=HALF_WRITTEN):
        existing.load_adapter(str(folder), adapter_name="other")
    assert list(existing.peft_config) == ["default"]
    after = existing.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)

    # The training helpers' checkpoint (adapter + state, saved whole) refuses the same mix of its adapter files.
    save_training_state(str(tmp_path / "state"), new, torch.optim.AdamW(trainable(new)))
    shutil.copy2(tmp_path / "old" / "adapter_config.json", tmp_path / "state" / "adapter_config.json")
    with pytest.raises(InvalidAdapterError, match=HALF_WRITTEN):
        fresh = peft_model(2, lambda_rank=1e-3)
        load_training_state(str(tmp_path / "state"), fresh, torch.optim.AdamW(trainable(fresh)))


def test_a_config_saved_before_fingerprints_beside_new_weights_is_refused(tmp_path):
    """The first save over a folder written by peft-sara before this format, killed between its two files."""
    peft_model(1).save_pretrained(tmp_path / "old")
    config_path = tmp_path / "old" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["config_fingerprint"]
    config_path.write_text(json.dumps(config))
    peft_model(2, lambda_rank=1e-3).save_pretrained(tmp_path / "new")
    folder = mix(tmp_path / "old", tmp_path / "new", tmp_path / "mixed")
    with pytest.raises(InvalidAdapterError, match="the config holds none"):
        PeftModel.from_pretrained(mlp(), folder)
    with pytest.raises(InvalidAdapterError, match="the config holds none"):
        read_adapter_weights(folder)


def test_files_without_a_fingerprint_load_as_before(tmp_path):
    """Format 2 (peft-sara before the fingerprint): no record in the weights, none in the config."""
    folder = tmp_path / "a"
    peft_model(1).save_pretrained(folder)
    expected = outputs(folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors["base_model.model.sara_config_fingerprint"]
    tensors["base_model.model.sara_format_version"] = torch.tensor([2])
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["config_fingerprint"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    torch.testing.assert_close(outputs(folder), expected, rtol=0, atol=0)
    assert read_adapter_weights(folder).keys() == tensors.keys()


def test_a_save_with_the_same_settings_leaves_a_pair_that_is_the_new_save(tmp_path):
    """Killed between the two files of a save whose settings did not change, the folder holds the new weights and a
    config equal in every setting: it loads as the new save (nothing of the old one is used)."""
    peft_model(1).save_pretrained(tmp_path / "old")
    peft_model(2).save_pretrained(tmp_path / "new")
    folder = mix(tmp_path / "old", tmp_path / "new", tmp_path / "mixed")
    torch.testing.assert_close(outputs(folder), outputs(tmp_path / "new"), rtol=0, atol=0)
    assert not torch.equal(outputs(tmp_path / "old"), outputs(tmp_path / "new"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a process to kill")
def test_peft_save_pretrained_killed_between_its_two_files_is_refused(tmp_path):
    """The exact instant: the child is killed as PEFT starts writing the config, after the weights."""
    folder = tmp_path / "a"
    peft_model(1).save_pretrained(folder)
    old = outputs(folder)
    model = peft_model(2, lambda_rank=1e-3)
    pid = os.fork()
    if pid == 0:  # the child: killed where PEFT's save_pretrained writes adapter_config.json
        try:
            PeftConfigMixin.save_pretrained = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
            model.save_pretrained(folder)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert load_file(folder / "adapter_model.safetensors").keys()  # the new weights are complete
    with pytest.raises(InvalidAdapterError, match=HALF_WRITTEN):
        outputs(folder)
    model.save_pretrained(folder)  # saving again repairs it
    assert not torch.equal(outputs(folder), old)
