"""One reader (issue 27 item 3, issue 28 "every reader runs every check", "every cost bounded by what was read"):
hotswap runs the effective-weight and capacity checks a fresh load runs, each file is decoded once per load, index
streams are compared with their values before they are decoded and decode piece by piece, and a legacy
``adapter_model.bin`` that would expand before any check is refused."""

from __future__ import annotations

import zipfile

import pytest
import torch
from conftest import MLPConv, resign
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_sara
from peft_sara import InvalidAdapterError, SaRAConfig, sara_layers
from peft_sara.adapter_files import read_adapter_weights
from peft_sara.tuner import file_format
from peft_sara.tuner.file_format import decode_index_gaps, encode_index_gaps

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ["conv", "conv1x1", "lin0", "lin1"]
X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))


def mlp() -> MLPConv:
    torch.manual_seed(0)
    return MLPConv().eval()


def save_adapter(directory, fraction=0.2, seed=1, reselect=False):
    torch.manual_seed(seed)
    model = get_peft_model(mlp(), SaRAConfig(target_modules=TARGETS, trainable_fraction=fraction, init_weights=False))
    if reselect:
        for _, layer in sara_layers(model):
            layer.reselect("default", torch.arange(layer.num_trainable("default")) % 2 == 0)
    model.save_pretrained(directory)
    return directory


def hotswap_model(max_fraction: float):
    model = get_peft_model(mlp(), SaRAConfig(target_modules=["head"], trainable_fraction=0.5))
    peft_sara.enable_sara_hotswap(model, max_fraction=max_fraction, target_modules=TARGETS, adapter_name="live")
    return model


def state(model) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_state(before, model):
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_hotswap_refuses_an_effective_weight_that_overflows_as_from_pretrained_does(tmp_path):
    folder = save_adapter(tmp_path / "a")
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.lin0.sara_values"
    tensors[key] = torch.full_like(tensors[key], 3e38)  # finite float32, but w + delta overflows a unit input
    save_file(resign(tensors), weights)
    with pytest.raises(InvalidAdapterError, match="lin0.*effective weight reaches"):
        PeftModel.from_pretrained(mlp(), folder)
    model = hotswap_model(0.3)
    before = state(model)
    with pytest.raises(InvalidAdapterError, match="lin0.*effective weight reaches"):
        peft_sara.hotswap_adapter(model, folder, adapter_name="live")
    assert_same_state(before, model)
    with torch.no_grad():
        assert torch.isfinite(model(X)).all()


def test_hotswap_slot_counts_frozen_entries_against_its_capacity(tmp_path):
    folder = save_adapter(tmp_path / "whole", fraction=1.0, reselect=True)  # whole weights, half of them frozen
    model = hotswap_model(0.05)
    before = state(model)
    with pytest.raises(ValueError, match="does not fit the hotswap slot.*trainable and frozen"):
        peft_sara.hotswap_adapter(model, folder, adapter_name="live")
    assert_same_state(before, model)
    fits = save_adapter(tmp_path / "fits", fraction=0.04, reselect=True)
    peft_sara.hotswap_adapter(model, fits, adapter_name="live")
    with torch.no_grad():
        torch.testing.assert_close(model(X), PeftModel.from_pretrained(mlp(), fits)(X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("load", ["from_pretrained", "hotswap"])
def test_each_file_is_decoded_once_per_load(tmp_path, monkeypatch, load):
    folder = save_adapter(tmp_path / "a", reselect=True)
    streams = [key for key in load_file(folder / "adapter_model.safetensors") if key.endswith("index_gaps")]
    calls = []
    original = file_format.decode_index_gaps

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr("peft_sara.tuner.reader.decode_index_gaps", counting)
    if load == "from_pretrained":
        PeftModel.from_pretrained(mlp(), folder)
    else:
        peft_sara.hotswap_adapter(hotswap_model(0.3), folder, adapter_name="live")
    assert len(calls) == len(streams)


def test_index_streams_are_counted_before_decoding_and_decode_across_pieces(monkeypatch):
    hostile = torch.zeros(8 << 20, dtype=torch.uint8)  # 8 MiB of one-byte gaps for a layer with one value
    with pytest.raises(ValueError, match=f"holds {8 << 20} indices but 1 values"):
        decode_index_gaps(hostile, count=1)
    monkeypatch.setattr(file_format, "DECODE_CHUNK_BYTES", 7)  # pieces cut inside and between numbers
    generator = torch.Generator().manual_seed(0)
    gaps = torch.randint(0, 2**20, (500,), generator=generator) * (torch.rand(500, generator=generator) < 0.5)
    indices = torch.cumsum(gaps, 0)
    stream = encode_index_gaps(indices)
    assert torch.equal(decode_index_gaps(stream, count=500, limit=int(indices[-1]) + 1), indices)
    with pytest.raises(ValueError, match="out of range"):
        decode_index_gaps(stream, count=500, limit=int(indices[-1]))
    with pytest.raises(ValueError, match="longer than 9 bytes"):
        decode_index_gaps(torch.tensor([0x80] * 20 + [1], dtype=torch.uint8))
    with pytest.raises(ValueError, match="int64 range"):
        decode_index_gaps(encode_index_gaps(torch.tensor([2**62, 2**62 + 2**61])).repeat(2))


def test_compressed_or_pre_zip_legacy_bin_is_refused_before_it_expands(tmp_path):
    folder = save_adapter(tmp_path / "a")
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    assert read_adapter_weights(folder).keys() == tensors.keys()  # torch.save's own archive reads
    with torch.no_grad():
        torch.testing.assert_close(
            PeftModel.from_pretrained(mlp(), folder)(X),
            PeftModel.from_pretrained(mlp(), save_adapter(tmp_path / "b"))(X),
        )

    big = tmp_path / "big.bin"  # 4 MB of zeros deflate to a few KB
    torch.save({"base_model.model.lin0.sara_values": torch.zeros(1 << 20)}, big)
    with zipfile.ZipFile(big) as source, zipfile.ZipFile(folder / "adapter_model.bin", "w") as target:
        for member in source.infolist():
            target.writestr(member.filename, source.read(member), compress_type=zipfile.ZIP_DEFLATED)
    assert (folder / "adapter_model.bin").stat().st_size < 100_000
    for read in (read_adapter_weights, lambda f: PeftModel.from_pretrained(mlp(), f)):
        with pytest.raises(InvalidAdapterError, match="compressed members"):
            read(folder)

    torch.save(tensors, folder / "adapter_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(InvalidAdapterError, match="not a zip archive"):
        read_adapter_weights(folder)
