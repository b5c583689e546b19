"""Saving and loading SaRA adapters through PEFT, diffusers and fresh processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import MLPConv, tiny_unet, unet_inputs
from peft import (
    PeftConfig,
    PeftModel,
    get_model_status,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.utils import load_peft_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peft_sara import SaRAConfig, sara_layers
from peft_sara.adapter_files import save_injected_adapter
from peft_sara.tuner.file_format import FORMAT_VERSION, decode_index_gaps, encode_index_gaps

TARGETS = ["conv", "conv1x1", "lin0", "lin1"]
X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
REPO_ROOT = Path(__file__).resolve().parents[1]


def fresh_model(seed: int = 0) -> MLPConv:
    torch.manual_seed(seed)
    return MLPConv().eval()


def trained_adapter(tmp_path, **kwargs):
    kwargs.setdefault("trainable_fraction", 0.2)
    model = get_peft_model(fresh_model(), SaRAConfig(target_modules=TARGETS, init_weights=False, **kwargs))
    model.save_pretrained(tmp_path)
    return model


def test_saved_files_store_indices_as_gaps_of_about_one_byte_per_entry(tmp_path):
    model = trained_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all("sara_" in key for key in tensors)
    nnz = model.get_nb_trainable_parameters()[0]
    assert sum(t.numel() for k, t in tensors.items() if k.endswith("sara_values")) == nnz
    for name, layer in sara_layers(model):
        stream = tensors[f"{name}.sara_index_gaps"]
        assert stream.dtype == torch.uint8 and stream.numel() == layer.trainable_entries("default")[0].numel()
        assert torch.equal(decode_index_gaps(stream), layer.trainable_entries("default")[0].long())
    file_size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert nnz * 5 <= file_size <= nnz * 5 + 4096  # float32 value + 1 byte of index per entry, plus the header
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SARA" and config["trainable_fraction"] == 0.2


def test_index_gaps_round_trip_any_ascending_indices():
    for indices in ([], [0], [0, 1, 127, 128, 16511, 2**31 + 5, 2**62], list(range(0, 10**6, 977))):
        expected = torch.tensor(indices, dtype=torch.int64)
        assert torch.equal(decode_index_gaps(encode_index_gaps(expected)), expected)
    with pytest.raises(ValueError, match="ascending"):
        encode_index_gaps(torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="truncated"):
        decode_index_gaps(torch.tensor([0x85], dtype=torch.uint8))
    with pytest.raises(ValueError, match="longer than 9 bytes"):
        decode_index_gaps(torch.tensor([0x80] * 9 + [1], dtype=torch.uint8))


def test_saved_files_record_weight_shapes_checksums_and_format_version(tmp_path):
    model = trained_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.sara_format_version"].tolist() == [FORMAT_VERSION]
    for name, layer in sara_layers(model):
        assert tensors[f"{name}.sara_weight_shape"].tolist() == list(layer.weight_shape)
        # kind (0: nn.Linear, 2: convolution), groups, padding mode, then one dilation per spatial dimension
        expected_layout = [0, 1, 0] if layer.weight_shape.numel() and len(layer.weight_shape) == 2 else [2, 1, 0, 1, 1]
        assert tensors[f"{name}.sara_layout"].tolist() == expected_layout
        checksum = tensors[f"{name}.sara_checksum"]
        assert checksum.dtype == torch.uint8 and checksum.shape == (32,)
    # PEFT's own readers take the records as ordinary tensors; SaRA's load hook takes them out again.
    assert load_peft_weights(str(tmp_path), device="cpu").keys() == tensors.keys()
    loaded = PeftModel.from_pretrained(fresh_model(), tmp_path)
    assert not [key for key in loaded.state_dict() if any(r in key for r in ("weight_shape", "layout", "checksum"))]
    assert torch.equal(loaded(X), model(X))
    # Models with injected adapters (diffusers' add_adapter, load_sara_adapter) write the same file, keys unprefixed,
    # and the same config: an adapter is exactly what PEFT saves, whoever saves it.
    save_injected_adapter(model.base_model.model, tmp_path / "injected", "default")
    injected = load_file(tmp_path / "injected" / "adapter_model.safetensors")
    assert injected.keys() == {key.removeprefix("base_model.model.") for key in tensors}
    for key, tensor in tensors.items():
        same = injected[key.removeprefix("base_model.model.")]
        assert same.dtype == tensor.dtype and torch.equal(same.view(torch.uint8), tensor.view(torch.uint8))
    for folder in (tmp_path, tmp_path / "injected"):
        with safe_open(folder / "adapter_model.safetensors", framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}  # no side channel
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    injected_config = json.loads((tmp_path / "injected" / "adapter_config.json").read_text())
    assert peft_config["base_model_class"] == "MLPConv"
    for config in (peft_config, injected_config):
        config["target_modules"] = sorted(config["target_modules"])  # PEFT writes a set in arbitrary order
    assert injected_config == peft_config


def test_save_dtype_stores_half_precision_values(tmp_path):
    model = trained_adapter(tmp_path, save_dtype="bfloat16")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.dtype for k, t in tensors.items() if "sara_values" in k} == {torch.bfloat16}
    loaded = PeftModel.from_pretrained(fresh_model(), tmp_path)
    layer = loaded.base_model.model.lin0
    assert layer.sara_values["default"].dtype == torch.float32
    expected = model.base_model.model.lin0.sara_values["default"].detach().bfloat16().float()
    assert torch.equal(layer.sara_values["default"].detach(), expected)


def test_load_in_a_fresh_process_reproduces_outputs(tmp_path):
    model = trained_adapter(tmp_path / "adapter")
    torch.save({"x": X, "out": model(X).detach()}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path[:0] = [{str(REPO_ROOT)!r}, {str(REPO_ROOT / "tests")!r}]  # this tree's peft_sara
        import peft_sara
        from peft import PeftModel
        from conftest import MLPConv
        torch.manual_seed(0)
        model = PeftModel.from_pretrained(MLPConv().eval(), {str(tmp_path / "adapter")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert torch.equal(model(expected["x"]), expected["out"]), "outputs differ"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_loading_without_import_fails_in_peft_with_keyerror(tmp_path):
    trained_adapter(tmp_path / "adapter")
    script = f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path / 'adapter')!r})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0 and "SARA" in result.stderr


def test_peft_apis_treat_sara_like_a_builtin(tmp_path):
    model = trained_adapter(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, SaRAConfig)
    status = get_model_status(model)
    assert status.available_adapters == ["default"] and status.merged_adapters == []
    state = get_peft_model_state_dict(model)
    other = get_peft_model(fresh_model(), SaRAConfig(target_modules=TARGETS, trainable_fraction=0.2))
    set_peft_model_state_dict(other, state)
    assert torch.equal(other(X), model(X))
    other.load_adapter(tmp_path, adapter_name="loaded")
    other.set_adapter("loaded")
    assert torch.equal(other(X), model(X))

    injected = inject_adapter_in_model(SaRAConfig(target_modules=TARGETS, trainable_fraction=0.2), fresh_model())
    set_peft_model_state_dict(injected, load_file(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(injected(X), model(X))


def test_mismatched_checkpoint_raises_and_leaves_model_untouched(tmp_path):
    trained_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    target = get_peft_model(fresh_model(), SaRAConfig(target_modules=TARGETS, trainable_fraction=0.2))
    before = {k: v.clone() for k, v in target.state_dict().items()}

    def assert_untouched():
        after = target.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    out_of_range = dict(tensors)
    key = "base_model.model.lin1.sara_index_gaps"
    indices = decode_index_gaps(out_of_range[key])
    indices[-1] = 10**6
    out_of_range[key] = encode_index_gaps(indices)
    with pytest.raises(ValueError, match="SaRA layer 'base_model.model.lin1'.*out of range"):
        set_peft_model_state_dict(target, out_of_range)
    assert_untouched()

    wrong_length = dict(tensors)
    wrong_length["base_model.model.lin0.sara_values"] = torch.zeros(3)
    with pytest.raises(ValueError, match="lin0.*indices but 3 values"):
        set_peft_model_state_dict(target, wrong_length)
    assert_untouched()

    float_indices = dict(tensors)
    key = "base_model.model.conv.sara_index_gaps"
    float_indices[key] = float_indices[key].float()
    with pytest.raises(ValueError, match="'base_model.model.conv'.*uint8 byte stream"):
        set_peft_model_state_dict(target, float_indices)
    assert_untouched()

    raw_indices = dict(tensors)
    raw_indices["base_model.model.conv.sara_indices"] = decode_index_gaps(raw_indices.pop(key))
    with pytest.raises(ValueError, match="stores 'base_model.model.conv.sara_indices' as raw indices"):
        set_peft_model_state_dict(target, raw_indices)
    assert_untouched()

    foreign = dict(tensors)
    foreign["base_model.model.decoder.sara_index_gaps"] = encode_index_gaps(torch.zeros(1, dtype=torch.int64))
    foreign["base_model.model.decoder.sara_values"] = torch.zeros(1)
    with pytest.raises(ValueError, match="match no SaRA layer"):
        set_peft_model_state_dict(target, foreign)
    assert_untouched()

    missing = {k: v for k, v in tensors.items() if "lin1" not in k}
    save_file(missing, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="no entries for SaRA layer 'base_model.model.lin1'"):
        PeftModel.from_pretrained(fresh_model(), tmp_path)


def test_checkpoint_with_a_different_trainable_set_loads(tmp_path):
    """E.g. a checkpoint saved after progressive re-selection, or a base that selects differently."""
    source = get_peft_model(fresh_model(), SaRAConfig(target_modules=TARGETS, threshold=0.05, init_weights=False))
    for _, layer in source.base_model.sara_layers():
        with torch.no_grad():
            layer.sara_values["default"].add_(0.04)  # pushes some entries past the threshold
        layer.reselect("default")
    source.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh_model(), tmp_path)
    for (_, a), (_, b) in zip(source.base_model.sara_layers(), loaded.base_model.sara_layers()):
        # The live entries (a loaded adapter's capacity is its checkpoint's: the load selects nothing).
        assert torch.equal(a.trainable_entries("default")[0], b.trainable_entries("default")[0])
        assert torch.equal(a.trainable_entries("default")[1], b.trainable_entries("default")[1])
        assert torch.equal(a.sara_frozen_values["default"], b.sara_frozen_values["default"])
    assert torch.equal(loaded(X), source(X))

    # A bf16 base selects a different set from the same threshold; the checkpoint's set still wins.
    bf16_loaded = PeftModel.from_pretrained(fresh_model().bfloat16(), tmp_path)
    reference = source.merge_and_unload().bfloat16()
    torch.testing.assert_close(bf16_loaded(X.bfloat16()), reference(X.bfloat16()), atol=5e-2, rtol=5e-2)


def test_unet_adapter_records_base_model_and_card(tmp_path):
    base_dir = tmp_path / "base-unet"
    tiny_unet().save_pretrained(base_dir)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(base_dir))
    model = get_peft_model(unet, SaRAConfig(trainable_fraction=0.1, init_weights=False))
    expected = model(**unet_inputs()).sample
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "- sara" in card and "- peft-sara" in card
    assert f"base_model: {base_dir}" in card
    reloaded = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(base_dir), tmp_path / "adapter")
    assert torch.equal(reloaded(**unet_inputs()).sample, expected)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(merged(**unet_inputs()).sample, expected, atol=1e-6, rtol=1e-5)
