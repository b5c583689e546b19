"""The index-gap codec after its rewrite for speed (issue 30): the same bytes as the previous encoder, the same indices
and the same refusals as the previous decoder, on random and edge-case streams; what the reader does with decoded
entries (repeats, finiteness, the effective weight) refuses what it refused; a hotswap that fails while writing leaves
the slot as it was."""

from __future__ import annotations

import index_gaps_v1 as previous
import pytest
import torch
from conftest import MLPConv
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_sara
from peft_sara import InvalidAdapterError, SaRAConfig, sara_layers
from peft_sara import hotswap as hotswap_module
from peft_sara.tuner import file_format
from peft_sara.tuner.file_format import decode_index_gaps, encode_entries, encode_index_gaps

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ["conv", "conv1x1", "lin0", "lin1"]


def leb128(indices: list[int]) -> bytes:
    """The format's definition, one number at a time: each gap as unsigned LEB128, low 7 bits first."""
    out, last = bytearray(), 0
    for index in indices:
        gap, last = index - last, index
        while True:
            byte, gap = gap & 0x7F, gap >> 7
            out.append(byte | (0x80 if gap else 0))
            if not gap:
                break
    return bytes(out)


def index_sets() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    sets = [[], [0], [5], [2**63 - 1], [0, 0], [3, 3, 3], [0, 1, 127, 128, 16383, 16384, 2**28 - 1, 2**28, 2**31 + 5]]
    sets += [[2**28 * k for k in range(1, 6)], [2**40, 2**40 + 2**35, 2**62, 2**62 + 2**61], list(range(0, 10**5, 977))]
    for _ in range(60):
        count = int(torch.randint(1, 4000, (1,), generator=generator))
        bits = int(torch.randint(1, 62 - count.bit_length(), (1,), generator=generator))  # the sum stays in int64
        gaps = torch.randint(0, 2**bits, (count,), generator=generator)
        gaps *= torch.rand(count, generator=generator) < 0.8  # some repeats
        sets.append(torch.cumsum(gaps, 0).tolist())
    for density in (0.5, 0.02, 0.001):  # SaRA-like selections: mostly one-byte gaps
        numel = 200_000
        chosen = torch.rand(numel, generator=generator) < density
        sets.append(torch.nonzero(chosen).reshape(-1).tolist())
    return sets


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_encoder_writes_the_bytes_of_the_previous_encoder_and_of_the_definition(dtype):
    for indices in index_sets():
        if indices and indices[-1] > torch.iinfo(dtype).max:
            continue
        tensor = torch.tensor(indices, dtype=dtype)
        stream = encode_index_gaps(tensor)
        assert stream.dtype == torch.uint8 and stream.dim() == 1
        assert torch.equal(stream, previous.encode_index_gaps(tensor))
        assert bytes(stream.tolist()) == leb128(indices)


@pytest.mark.parametrize("chunk", [1 << 20, 7, 9, 10, 64])
def test_decoder_returns_the_indices_of_the_previous_decoder(monkeypatch, chunk):
    monkeypatch.setattr(file_format, "DECODE_CHUNK_BYTES", chunk)  # pieces cut inside and between numbers
    monkeypatch.setattr(previous, "DECODE_CHUNK_BYTES", chunk)
    for indices in index_sets():
        expected = torch.tensor(indices, dtype=torch.int64)
        stream = previous.encode_index_gaps(expected)
        assert torch.equal(decode_index_gaps(stream), expected)
        assert torch.equal(decode_index_gaps(stream, count=len(indices)), previous.decode_index_gaps(stream))
        if indices and indices[-1] < 2**31 - 1:  # straight into the layer's int32
            decoded = decode_index_gaps(stream, dtype=torch.int32, count=len(indices), limit=indices[-1] + 1)
            assert decoded.dtype == torch.int32 and torch.equal(decoded.long(), expected)


@pytest.mark.parametrize("chunk", [1 << 20, 7, 11])
def test_decoder_refuses_what_the_previous_decoder_refused_with_the_same_message(monkeypatch, chunk):
    monkeypatch.setattr(file_format, "DECODE_CHUNK_BYTES", chunk)
    monkeypatch.setattr(previous, "DECODE_CHUNK_BYTES", chunk)
    generator = torch.Generator().manual_seed(1)
    streams = [
        torch.tensor([0x85], dtype=torch.uint8),  # truncated
        torch.tensor([0x80] * 9 + [1], dtype=torch.uint8),  # 10 bytes
        torch.tensor([0xFF] * 8 + [0x7F] + [0xFF] * 8 + [0x7F], dtype=torch.uint8),  # 2**63 - 1 twice: past int64
        torch.tensor([0x80, 0x80, 0x01], dtype=torch.uint8),  # 2**14 against a small limit
    ]
    for _ in range(1500):
        size = int(torch.randint(0, 40, (1,), generator=generator))
        data = torch.randint(0, 256, (size,), generator=generator)
        data = torch.where(torch.rand(size, generator=generator) < 0.6, data | 0x80, data)
        if size and bool(torch.rand(1, generator=generator) < 0.5):
            data[-1] &= 0x7F
        streams.append(data.to(torch.uint8))
    for stream in streams:
        for kwargs in ({}, {"limit": 2**62}, {"limit": 1000, "dtype": torch.int32}, {"count": 3}):
            outcomes = []
            for decode in (decode_index_gaps, previous.decode_index_gaps):
                try:
                    outcomes.append(("indices", decode(stream, **kwargs).tolist()))
                except ValueError as err:
                    outcomes.append(("refused", str(err)))
            assert outcomes[0] == outcomes[1], (stream.tolist(), kwargs)


def test_decoder_refuses_non_byte_streams_and_indices_past_the_dtype():
    with pytest.raises(ValueError, match="1-D uint8"):
        decode_index_gaps(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="does not fit torch.int32"):
        decode_index_gaps(encode_index_gaps(torch.tensor([2**31])), dtype=torch.int32)
    assert decode_index_gaps(torch.zeros(0, dtype=torch.uint8), dtype=torch.int32, count=0, limit=5).numel() == 0


def test_encode_entries_sorts_only_unsorted_sets_and_keeps_values_with_their_indices():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    stream, same = encode_entries(torch.tensor([2, 7, 9, 400], dtype=torch.int32), values)
    assert same is values and torch.equal(decode_index_gaps(stream), torch.tensor([2, 7, 9, 400]))
    stream, permuted = encode_entries(torch.tensor([400, 2, 9, 7]), values)
    assert torch.equal(decode_index_gaps(stream), torch.tensor([2, 7, 9, 400]))
    assert torch.equal(permuted, torch.tensor([2.0, 4.0, 3.0, 1.0]))
    with pytest.raises(ValueError, match="ascending, non-negative"):
        encode_entries(torch.tensor([3, -1]), values[:2])
    with pytest.raises(ValueError, match="ascending, non-negative"):  # int32 indices: a difference that would wrap
        encode_index_gaps(torch.tensor([5, -(2**31)], dtype=torch.int32))


def test_a_sara_selection_costs_at_most_5_25_bytes_per_float32_entry():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(320 * 320 * 9, generator=generator)
    indices = torch.sort(torch.topk(-weight.abs(), round(0.02 * weight.numel())).indices).values
    stream = encode_index_gaps(indices)
    assert (stream.numel() + 4 * indices.numel()) / indices.numel() <= 5.25
    assert torch.equal(decode_index_gaps(stream), indices)


# ------------------------------------------------------------------------------------------------- the reader
def mlp() -> MLPConv:
    torch.manual_seed(0)
    return MLPConv().eval()


def saved(directory, reselect=False):
    torch.manual_seed(1)
    model = get_peft_model(mlp(), SaRAConfig(target_modules=TARGETS, trainable_fraction=0.2, init_weights=False))
    if reselect:
        for _, layer in sara_layers(model):
            layer.reselect("default", torch.arange(layer.num_trainable("default")) % 2 == 0)
    model.save_pretrained(directory)
    return directory


def edited(folder, edit):
    """The folder's file with ``edit(tensors)`` applied and every checksum recomputed (an edit, not a corruption)."""
    from conftest import resign

    tensors = load_file(folder / "adapter_model.safetensors")
    edit(tensors)
    save_file(resign(tensors), folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize("what", ["trainable", "frozen"])
def test_non_finite_values_are_named_as_values_when_the_effective_weight_check_runs(tmp_path, what):
    prefix = "sara_frozen_values" if what == "frozen" else "sara_values"

    def poison(tensors):
        tensors[f"base_model.model.lin1.{prefix}"][0] = float("nan")

    folder = edited(saved(tmp_path / "a", reselect=True), poison)
    with pytest.raises(InvalidAdapterError, match=rf"'base_model.model.lin1'.*{what} values hold 1 non-finite"):
        PeftModel.from_pretrained(mlp(), folder)
    with pytest.raises(InvalidAdapterError, match=rf"'lin1'.*{what} values hold 1 non-finite"):
        peft_sara.hotswap_adapter(slot_model(), folder, adapter_name="live", scale=0.0)  # 0 * NaN: checked anyway


def lin0_indices(folder):
    return decode_index_gaps(load_file(folder / "adapter_model.safetensors")["base_model.model.lin0.sara_index_gaps"])


def test_a_non_finite_base_entry_is_the_base_models_own_state_on_a_float32_base_and_refused_on_float16(tmp_path):
    """The effective-weight check guards against the file's values: on a float32 base, values within a quarter of the
    per-entry limit prove it without reading the base, so an inf already in the base weight is not looked at (it would
    be there without the adapter); a float16 base is always read, so the same inf is refused there."""
    folder = saved(tmp_path / "a")
    index = int(lin0_indices(folder)[3])
    model = mlp()
    with torch.no_grad():
        model.lin0.weight.view(-1)[index] = float("inf")
    loaded = PeftModel.from_pretrained(model, folder)
    stored = load_file(folder / "adapter_model.safetensors")["base_model.model.lin0.sara_values"]
    assert torch.equal(loaded.base_model.model.lin0.sara_values["default"].detach(), stored)
    model = mlp().half()
    with torch.no_grad():
        model.lin0.weight.view(-1)[index] = float("inf")
    with pytest.raises(
        InvalidAdapterError, match=r"'base_model.model.lin0'.*1 entries of its effective weight are not finite in "
    ):
        PeftModel.from_pretrained(model, folder)


def test_values_that_overflow_a_float16_base_are_refused_and_load_into_float32(tmp_path):
    """600 is finite in float16, but lin0's effective weight (fan-in 128) may not pass 65504 / 128 = 512 there; a
    float32 base has room for it. Values near float32's largest are refused on a float32 base too
    (test_one_reader's 3e38)."""

    def large(tensors):
        tensors["base_model.model.lin0.sara_values"][:] = 600.0

    folder = edited(saved(tmp_path / "a"), large)
    with pytest.raises(InvalidAdapterError, match=r"'base_model.model.lin0'.*effective weight reaches 6.*limit 512"):
        PeftModel.from_pretrained(mlp().half(), folder)
    PeftModel.from_pretrained(mlp(), folder)

    def huge(tensors):
        tensors["base_model.model.lin0.sara_values"][5] = -3e38

    with pytest.raises(InvalidAdapterError, match=r"'base_model.model.lin0'.*effective weight reaches 3e\+38"):
        PeftModel.from_pretrained(mlp(), edited(saved(tmp_path / "b"), huge))


def slot_model():
    model = mlp()
    peft_sara.enable_sara_hotswap(model, max_fraction=0.5, target_modules=TARGETS, adapter_name="live")
    return model


@pytest.mark.parametrize("claimed", [False, True])
def test_a_hotswap_that_fails_while_writing_leaves_the_slot_as_it_was(tmp_path, monkeypatch, claimed):
    model = slot_model()
    first = saved(tmp_path / "first")
    if claimed:
        peft_sara.hotswap_adapter(model, first, adapter_name="served")  # claims (and renames) the slot
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    before_state = {key: value.clone() for key, value in model.state_dict().items()}
    before_out = model(x)
    slot_before = hotswap_module.hotswap_slot(model)
    calls = []
    original = hotswap_module._write

    def failing(swap, adapter_name, scale):
        if len(calls) == 2:
            raise RuntimeError("device lost")
        calls.append(1)
        original(swap, adapter_name, scale)

    monkeypatch.setattr(hotswap_module, "_write", failing)
    second = saved(tmp_path / "second", reselect=True)
    with pytest.raises(RuntimeError, match="device lost"):
        peft_sara.hotswap_adapter(model, second, adapter_name="served")
    after = model.state_dict()
    assert before_state.keys() == after.keys()
    assert all(torch.equal(before_state[key], after[key]) for key in after)
    assert hotswap_module.hotswap_slot(model) == slot_before
    assert list(model.peft_config) == (["served"] if claimed else ["live"])
    if claimed:
        torch.testing.assert_close(model(x), before_out, rtol=0, atol=0)
    monkeypatch.setattr(hotswap_module, "_write", original)
    peft_sara.hotswap_adapter(model, second, adapter_name="served")  # and the next swap goes through
