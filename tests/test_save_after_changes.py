"""Every save writes the indices the layer holds at that moment, whatever changed them since the last save
(set_trainable_entries, re-selection, a direct write, a load): the file a fresh encoding of a fresh copy writes."""

from __future__ import annotations

import torch
from conftest import MLPConv
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_sara import SaRAConfig, sara_layers
from peft_sara.tuner.file_format import decode_index_gaps, encode_index_gaps

TARGETS = ["conv", "conv1x1", "lin0", "lin1"]
FILE = "adapter_model.safetensors"


def adapter(seed: int = 0, fraction: float = 0.2):
    torch.manual_seed(seed)
    model = get_peft_model(MLPConv().eval(), SaRAConfig(target_modules=TARGETS, trainable_fraction=fraction))
    with torch.no_grad():
        for _, layer in sara_layers(model):
            layer.sara_values["default"].normal_()
    return model


def fresh_save(model, folder) -> bytes:
    """The file a deep copy of the model saves (nothing carried over from the model's earlier saves)."""
    import copy

    copy.deepcopy(model).save_pretrained(folder)
    return (folder / FILE).read_bytes()


def saved(model, folder) -> bytes:
    model.save_pretrained(folder)
    return (folder / FILE).read_bytes()


def assert_streams_encode_indices(folder, model):
    tensors = load_file(folder / FILE)
    for name, layer in sara_layers(model):
        indices, _ = layer.trainable_entries("default")
        stream = tensors[f"{name}.sara_index_gaps"]
        assert torch.equal(stream, encode_index_gaps(indices))
        assert torch.equal(decode_index_gaps(stream), indices.long())


def test_a_second_save_of_unchanged_indices_writes_the_same_file(tmp_path):
    model = adapter()
    first = saved(model, tmp_path / "a")
    assert saved(model, tmp_path / "b") == first == fresh_save(model, tmp_path / "c")


def test_a_save_after_set_trainable_entries_writes_the_new_indices(tmp_path):
    model = adapter()
    saved(model, tmp_path / "a")
    for _, layer in sara_layers(model):
        indices, values = layer.trainable_entries("default")
        numel = layer.weight_shape.numel()
        # as many entries (written in place), shifted to other positions: the old stream no longer encodes them
        new = torch.arange(numel - indices.numel(), numel, dtype=indices.dtype)
        layer.set_trainable_entries("default", new, values.detach() + 1)
    after = saved(model, tmp_path / "b")
    assert_streams_encode_indices(tmp_path / "b", model)
    assert after == fresh_save(model, tmp_path / "c")


def test_a_save_after_reselection_writes_the_surviving_indices(tmp_path):
    model = adapter()
    saved(model, tmp_path / "a")
    for _, layer in sara_layers(model):
        count = layer.num_trainable("default")
        keep = torch.ones(count, dtype=torch.bool)
        keep[::3] = False
        layer.reselect("default", keep)
    after = saved(model, tmp_path / "b")
    assert_streams_encode_indices(tmp_path / "b", model)
    tensors = load_file(tmp_path / "b" / FILE)
    assert any(key.endswith("sara_frozen_index_gaps") for key in tensors)
    assert after == fresh_save(model, tmp_path / "c")


def test_a_direct_write_to_the_index_buffer_is_seen(tmp_path):
    model = adapter()
    saved(model, tmp_path / "a")
    _, layer = next(iter(sara_layers(model)))
    buffer = layer.sara_indices["default"]
    count = layer.num_trainable("default")
    live = buffer[:count]
    at = int(torch.nonzero(live[1:] - live[:-1] > 1)[0])  # an entry with a free position after it
    with torch.no_grad():
        buffer[at] += 1  # still ascending, another entry
    after = saved(model, tmp_path / "b")
    assert_streams_encode_indices(tmp_path / "b", model)
    assert after == fresh_save(model, tmp_path / "c")


def test_a_save_right_after_a_load_writes_the_loaded_adapter(tmp_path):
    source = adapter(seed=1)
    original = saved(source, tmp_path / "source")
    model = adapter(seed=2, fraction=0.1)  # other indices, kept from a save first
    saved(model, tmp_path / "before")
    base = model.get_base_model()
    loaded = PeftModel.from_pretrained(base, tmp_path / "source", adapter_name="other")
    loaded.save_pretrained(tmp_path / "loaded", selected_adapters=["other"])
    assert (tmp_path / "loaded" / "other" / FILE).read_bytes() == original
    assert saved(loaded, tmp_path / "again") == saved(loaded, tmp_path / "again2")
