"""Adapter files from strangers: each load gives the model the original file gives, or raises a clean error and leaves
the model exactly as it was (weights, adapters, ``peft_config``, trainability, active adapters).

``test_fuzzed_adapter_files_load_equal_or_fail_cleanly`` mutates a real saved adapter (a small model with every
supported layer type, random non-zero values, frozen entries after a re-selection): byte flips, truncation, tensors
with other dtypes / shapes / values (NaN, inf, duplicates, out-of-range and negative indices), dropped and added keys,
edited JSON configs and weight-shape records. It prints its counts; reproduce them with

    python -m pytest -s -q tests/test_untrusted_files.py -k fuzzed

(``PEFT_SARA_FUZZ_EXAMPLES=1000`` runs more examples; the default run is derandomized, so CI sees the same inputs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import MLPConv, fuzz_settings, resign
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peft_sara import SaRAConfig, load_sara_adapter
from peft_sara.adapter_files import read_sara_config, save_injected_adapter, save_model_adapter
from peft_sara.tuner.file_format import (
    InvalidAdapterError,
    decode_index_gaps,
    encode_index_gaps,
)
from peft_sara.tuner.reader import ALLOW_NON_FINITE_ENV_VAR, allow_non_finite_values

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TARGETS = ["conv", "conv1x1", "lin0", "lin1"]
X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
FUZZ_EXAMPLES = int(os.environ.get("PEFT_SARA_FUZZ_EXAMPLES", "150"))


def fresh_model(seed: int = 0) -> MLPConv:
    torch.manual_seed(seed)
    return MLPConv().eval()


def trained_model(seed: int = 0, nan: bool = False):
    """A PeftModel with random values and frozen entries (a re-selection moved the entries that grew past it)."""
    model = get_peft_model(fresh_model(), SaRAConfig(target_modules=TARGETS, threshold=0.05, init_weights=False))
    torch.manual_seed(100 + seed)
    for _, layer in model.base_model.sara_layers():
        _, values = layer.trainable_entries("default")
        with torch.no_grad():
            values.add_(0.04 + 0.01 * torch.randn_like(values))
        layer.reselect("default")
        if nan:
            with torch.no_grad():
                layer.trainable_entries("default")[1][:3] = float("nan")
    return model


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("source")
    trained_model().save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------- observing models
def observe(module: torch.nn.Module) -> dict:
    """Everything a load may change: tensors, adapter names, trainability, active adapters and adapter marks."""
    return {
        "state": {key: value.detach().clone() for key, value in module.state_dict().items()},
        "requires_grad": {name: param.requires_grad for name, param in module.named_parameters()},
        "adapters": sorted(getattr(module, "peft_config", None) or {}),
        "active": {
            name: list(layer.active_adapters)
            for name, layer in module.named_modules()
            if isinstance(layer, (BaseTuner, BaseTunerLayer))
        },
        "marks": sorted(
            key
            for key in ("peft_config", "_hf_peft_config_loaded", "save_pretrained", "model_tags")
            if key in vars(module)
        ),
    }


def differences(before: dict, after: dict) -> list[str]:
    found = [name for name in ("requires_grad", "adapters", "active", "marks") if before[name] != after[name]]
    if before["state"].keys() != after["state"].keys():
        found.append(f"state keys {sorted(before['state'].keys() ^ after['state'].keys())[:4]}")
    else:
        changed = [
            key
            for key, value in before["state"].items()
            if value.dtype != after["state"][key].dtype or not torch.equal(value, after["state"][key])
        ]
        found += [f"tensor {key}" for key in changed[:4]]
    return found


# ------------------------------------------------------------------------------------------------- the three loaders
class FromPretrained:
    """``PeftModel.from_pretrained(fresh base, folder)``: the base model must be untouched by a failed load."""

    name = "PeftModel.from_pretrained"
    allowed = (ValueError, FileNotFoundError, KeyError, TypeError)  # KeyError / TypeError: PEFT's config parsing

    def build(self):
        return fresh_model()

    def load(self, target, folder):
        return PeftModel.from_pretrained(target, folder)


class LoadAdapter:
    """``peft_model.load_adapter(folder, "loaded")`` next to an existing adapter: no half-created adapter may stay."""

    name = "PeftModel.load_adapter"
    allowed = (ValueError, FileNotFoundError, KeyError, TypeError)

    def build(self):
        return get_peft_model(fresh_model(), SaRAConfig(target_modules=["lin0", "head"], trainable_fraction=0.1))

    def load(self, target, folder):
        target.load_adapter(folder, adapter_name="loaded")
        return target


class PipelineLoader:
    """``peft_sara.load_sara_adapter`` into a pipeline's denoiser: only our own error types may come out."""

    name = "peft_sara.load_sara_adapter"
    allowed = (ValueError, FileNotFoundError)

    def build(self):
        return fresh_model()

    def load(self, target, folder):
        load_sara_adapter(
            SimpleNamespace(components={"unet": target}), folder, adapter_name="loaded", components=["unet"]
        )
        return target


LOADERS = (FromPretrained(), LoadAdapter(), PipelineLoader())


def load_quietly(loader, target, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return loader.load(target, folder)


@pytest.fixture(scope="module")
def references(source):
    return {loader.name: observe(load_quietly(loader, loader.build(), source)) for loader in LOADERS}


# ------------------------------------------------------------------------------------------------- mutations
DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]
DTYPES += [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SHAPE_EDITS = ["drop_last", "append", "empty", "2d", "scalar"]
VALUE_EDITS = ["nan", "inf", "-inf", "huge", "negative", "past_end", "int_max", "duplicate", "swap", "zero_all", "bump"]
ADDED_KEYS = [
    "base_model.model.lin0.base_layer.weight",  # would overwrite a base weight of the PeftModel
    "base_model.model.head.weight",
    "lin0.base_layer.weight",  # the same for an injected model
    "base_model.model.lin9.sara_values",  # a layer the model does not have
    "base_model.model.lin0.sara_values.default",  # the model key itself, next to the checkpoint key
    "base_model.model.lin0.sara_format_version",
    "sara_format_version",
    "foo",
    "base_model.model.lin0.sara_gates",
]
CONFIG_FIELDS = [
    "peft_type",
    "target_modules",
    "threshold",
    "trainable_fraction",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "init_weights",
    "inference_mode",
    "kernel",
    "save_dtype",
    "rank_layers_per_step",
    "progressive_fraction",
    "base_model_name_or_path",
    "task_type",
]
CONFIG_VALUES = [
    None,
    "x",
    -1,
    0,
    1e9,
    float("nan"),
    True,
    [],
    [1, 2],
    {"a": 1},
    ["lin0"],
    ["head"],
    ["nonexistent"],
    "SARA",
    "LORA",
    "FOO",
    "float16",
    "reference",
]

mutations = st.one_of(
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=3),
    ),
    st.tuples(st.just("flip_header"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("dtype"), st.integers(0, 10**6), st.sampled_from(DTYPES)),
    st.tuples(st.just("shape"), st.integers(0, 10**6), st.sampled_from(SHAPE_EDITS)),
    st.tuples(st.just("value"), st.integers(0, 10**6), st.sampled_from(VALUE_EDITS), st.integers(0, 10**6)),
    st.tuples(st.just("drop_key"), st.integers(0, 10**6)),
    st.tuples(st.just("add_key"), st.sampled_from(ADDED_KEYS), st.integers(0, 10**6)),
    st.tuples(st.just("weight_shape"), st.integers(0, 10**6), st.sampled_from(["reverse", "double", "other_layer"])),
    st.tuples(st.just("overlap"), st.integers(0, 10**6)),
    st.tuples(st.just("config_set"), st.sampled_from(CONFIG_FIELDS), st.sampled_from(CONFIG_VALUES)),
    st.tuples(st.just("config_drop"), st.sampled_from(CONFIG_FIELDS)),
    st.tuples(st.just("config_text"), st.sampled_from(["truncate", "list", "null", "not_utf8", "empty"])),
    st.tuples(st.just("delete"), st.sampled_from([WEIGHTS, CONFIG])),
)


def with_indices_edited(stream: torch.Tensor, edit) -> torch.Tensor:
    """A varint gap stream whose decoded indices went through ``edit`` (sorted again, as a writer would)."""
    return encode_index_gaps(torch.sort(edit(decode_index_gaps(stream))).values)


def _edit_values(tensor: torch.Tensor, edit: str, position: int, numel_hint: int) -> torch.Tensor:
    tensor = tensor.clone()
    if tensor.numel() == 0:
        return torch.zeros(1, dtype=tensor.dtype)
    i = position % tensor.numel()
    flat = tensor.view(-1)
    if tensor.dtype.is_floating_point:
        special = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": 1e38, "negative": -1.0}
        if edit in special:
            flat[i] = special[edit]
            return tensor
    else:
        info = torch.iinfo(tensor.dtype) if tensor.dtype != torch.bool else torch.iinfo(torch.uint8)
        special = {"negative": -1, "past_end": numel_hint, "int_max": info.max, "nan": 0}
        if edit in special:
            flat[i] = min(max(special[edit], info.min), info.max)  # in range of the dtype: a uint8 "negative" is 0
            return tensor
    if edit == "duplicate" and tensor.numel() > 1:
        flat[i] = flat[i - 1]
    elif edit == "swap" and tensor.numel() > 1:
        flat[[i, i - 1]] = flat[[i - 1, i]]
    elif edit == "zero_all":
        flat.zero_()
    else:  # bump
        flat[i] += 1
    return tensor


def _edit_shape(tensor: torch.Tensor, edit: str) -> torch.Tensor:
    if edit == "drop_last":
        return tensor.reshape(-1)[:-1].clone()
    if edit == "append":
        return torch.cat([tensor.reshape(-1), tensor.reshape(-1)[:1]])
    if edit == "empty":
        return tensor.reshape(-1)[:0].clone()
    if edit == "2d":
        return tensor.reshape(1, -1).clone()
    return tensor.reshape(-1)[:1].reshape(()).clone()  # scalar


def apply_mutation(mutation: tuple, folder: Path) -> None:
    """Mutate the adapter folder in place."""
    kind = mutation[0]
    weights_path, config_path = folder / WEIGHTS, folder / CONFIG
    if kind in ("flip", "flip_header", "truncate", "append"):
        data = bytearray(weights_path.read_bytes())
        if kind == "flip":
            for where, mask in mutation[1]:
                data[int(where * len(data))] ^= mask
        elif kind == "flip_header":
            header_end = 8 + int.from_bytes(data[:8], "little")
            data[int(mutation[1] * header_end)] ^= mutation[2]
        elif kind == "truncate":
            data = data[: int(mutation[1] * len(data))]
        else:
            data += mutation[1]
        weights_path.write_bytes(bytes(data))
        return
    if kind.startswith("config") or kind == "delete":
        if kind == "delete":
            (folder / mutation[1]).unlink()
            return
        raw = json.loads(config_path.read_text())
        if kind == "config_set":
            raw[mutation[1]] = mutation[2]
            config_path.write_text(json.dumps(raw))
        elif kind == "config_drop":
            raw.pop(mutation[1], None)
            config_path.write_text(json.dumps(raw))
        else:
            text = {"list": "[]", "null": "null", "empty": ""}.get(mutation[1])
            if mutation[1] == "truncate":
                text = json.dumps(raw)[:-7]
            config_path.write_bytes(b"\xff\xfe{" if mutation[1] == "not_utf8" else text.encode())
        return

    tensors = load_file(weights_path)
    keys = sorted(tensors)
    key = keys[mutation[1] % len(keys)] if isinstance(mutation[1], int) else None
    if kind == "dtype":
        tensors[key] = tensors[key].to(mutation[2])
    elif kind == "shape":
        tensors[key] = _edit_shape(tensors[key], mutation[2])
    elif kind == "value":
        tensors[key] = _edit_values(tensors[key], mutation[2], mutation[3], numel_hint=32 * 128)
    elif kind == "drop_key":
        del tensors[key]
    elif kind == "add_key":
        copied = tensors[keys[mutation[2] % len(keys)]]
        tensors[mutation[1]] = torch.zeros(32, 128) if mutation[1].endswith(".weight") else copied.clone()
    elif kind == "weight_shape":
        shape_keys = [name for name in keys if name.endswith("sara_weight_shape")]
        key = shape_keys[mutation[1] % len(shape_keys)]
        shape = tensors[key]
        if mutation[2] == "reverse":
            tensors[key] = shape.flip(0).clone()
        elif mutation[2] == "double":
            tensors[key] = torch.cat([shape[:1] * 2, shape[1:]])
        else:
            tensors[key] = tensors[shape_keys[(mutation[1] + 1) % len(shape_keys)]].clone()
    elif kind == "overlap":
        frozen_keys = [name for name in keys if name.endswith("sara_frozen_index_gaps")]
        frozen_key = frozen_keys[mutation[1] % len(frozen_keys)]
        trainable_key = frozen_key.replace("sara_frozen_index_gaps", "sara_index_gaps")
        tensors[frozen_key] = with_indices_edited(
            tensors[frozen_key],
            lambda frozen: frozen.index_fill(0, torch.tensor([0]), int(decode_index_gaps(tensors[trainable_key])[0])),
        )
    save_file(tensors, weights_path)


# ------------------------------------------------------------------------------------------------- the fuzz test
def test_fuzzed_adapter_files_load_equal_or_fail_cleanly(source, references, one_thread):
    counts = Counter()
    failures = []

    @fuzz_settings(FUZZ_EXAMPLES)
    @given(loader=st.sampled_from(LOADERS), mutation=mutations)
    def run(loader, mutation):
        if loader.name == "PeftModel.from_pretrained" and mutation[:3] == ("config_set", "peft_type", "LORA"):
            # Another PEFT method's config is PEFT's to load (a 'LORA' file loads as LoRA), not SaRA's.
            mutation = ("config_set", "peft_type", "FOO")
        counts["hostile inputs tried"] += 1
        counts[f"mutation {mutation[0]}"] += 1
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "adapter"
            shutil.copytree(source, folder)
            apply_mutation(mutation, folder)
            target = loader.build()
            before = observe(target)
            try:
                result = load_quietly(loader, target, folder)
            except loader.allowed as err:
                changed = differences(before, observe(target))
                if changed:
                    counts["model changed by a failed load"] += 1
                    failures.append((loader.name, mutation, f"{type(err).__name__}: {err}", changed))
                else:
                    counts[f"refused cleanly ({type(err).__name__})"] += 1
                return
            except Exception as err:  # noqa: BLE001 - any other type is a crash of the loader
                counts["crashes"] += 1
                failures.append((loader.name, mutation, f"crash {type(err).__name__}: {err}", []))
                return
            mismatch = differences(references[loader.name], observe(result))
            if mismatch:
                counts["silent acceptances"] += 1
                failures.append((loader.name, mutation, "loaded without error but differs", mismatch))
            else:
                counts["loaded equal to the original"] += 1

    run()
    for name in ("crashes", "silent acceptances", "model changed by a failed load"):
        counts.setdefault(name, 0)
    print("\nhostile adapter files:", json.dumps(dict(sorted(counts.items())), indent=1))
    assert not failures, "\n".join(map(str, failures[:10]))
    assert counts["hostile inputs tried"] >= min(FUZZ_EXAMPLES, 100)
    assert counts["loaded equal to the original"] > 0 and sum(v for k, v in counts.items() if "refused" in k) > 0


# ------------------------------------------------------------------------------------------------- targeted cases


def test_adapter_for_another_base_model_is_refused_with_both_shapes(tmp_path):
    """SD1.5 -> SD2 in small: cross-attention 32 wide vs 48 wide. The indices fit (48-wide weights have more
    entries), so only the recorded shape tells the two apart."""
    from diffusers import UNet2DConditionModel

    from peft_sara.presets import TINY_UNET

    torch.manual_seed(0)
    sd15 = get_peft_model(UNet2DConditionModel(**TINY_UNET), SaRAConfig(trainable_fraction=0.1))
    sd15.save_pretrained(tmp_path / "sd15-style")
    torch.manual_seed(0)
    sd2 = UNet2DConditionModel(**{**TINY_UNET, "cross_attention_dim": 48})
    before = observe(sd2)
    pattern = r"attn2\.to_k' was trained on a weight of shape \(32, 32\).*shape \(32, 48\).*made for another base model"
    with pytest.raises(InvalidAdapterError, match=pattern):
        PeftModel.from_pretrained(sd2, tmp_path / "sd15-style")
    assert not differences(before, observe(sd2))
    with pytest.raises(InvalidAdapterError, match=pattern):
        load_sara_adapter(SimpleNamespace(components={"unet": sd2}), tmp_path / "sd15-style", components=["unet"])
    assert not differences(before, observe(sd2))


def test_transposed_layer_with_the_same_number_of_entries_is_refused(tmp_path):
    class Transposed(MLPConv):
        def __init__(self):
            super().__init__()
            self.lin1 = torch.nn.Linear(16, 32)
            self.head = torch.nn.Linear(32, 4)

    trained_model().save_pretrained(tmp_path)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"'base_model.model.lin1' was trained on a weight of shape \(16, 32\)"):
        PeftModel.from_pretrained(Transposed().eval(), tmp_path)


def test_non_finite_values_are_refused_unless_allowed(tmp_path, monkeypatch):
    trained_model(nan=True).save_pretrained(tmp_path)
    base = fresh_model()
    before = observe(base)
    with pytest.raises(InvalidAdapterError, match=r"'base_model.model.conv'.*trainable values hold 3 non-finite"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not differences(before, observe(base))
    with allow_non_finite_values():
        loaded = PeftModel.from_pretrained(fresh_model(), tmp_path)
    assert torch.isnan(loaded.base_model.model.conv.trainable_entries("default")[1]).sum() == 3
    pipe = SimpleNamespace(components={"unet": fresh_model()})
    with pytest.raises(InvalidAdapterError, match="non-finite"):
        load_sara_adapter(pipe, tmp_path, components=["unet"])
    load_sara_adapter(pipe, tmp_path, components=["unet"], allow_non_finite=True)
    monkeypatch.setenv(ALLOW_NON_FINITE_ENV_VAR, "1")  # deprecated: still honoured, with a warning naming the way now
    with pytest.warns(FutureWarning, match=r"PEFT_SARA_ALLOW_NON_FINITE is deprecated.*allow_non_finite=True"):
        PeftModel.from_pretrained(fresh_model(), tmp_path)
    monkeypatch.setenv(ALLOW_NON_FINITE_ENV_VAR, "0")
    with pytest.warns(FutureWarning), pytest.raises(InvalidAdapterError, match="non-finite"):
        PeftModel.from_pretrained(fresh_model(), tmp_path)


def test_duplicates_and_overlaps_are_refused_even_in_self_consistent_files(source):
    tensors = load_file(source / WEIGHTS)
    target = get_peft_model(fresh_model(), SaRAConfig(target_modules=TARGETS, threshold=0.05))
    before = observe(target)
    duplicated = dict(tensors)
    key = "base_model.model.lin0.sara_index_gaps"
    duplicated[key] = with_indices_edited(
        duplicated[key], lambda indices: indices.index_fill(0, torch.tensor([5]), int(indices[4]))
    )
    with pytest.raises(InvalidAdapterError, match=r"'base_model.model.lin0'.*trainable indices repeat 1 entries"):
        set_peft_model_state_dict(target, resign(duplicated))
    overlapping = dict(tensors)
    trainable = decode_index_gaps(overlapping["base_model.model.lin1.sara_index_gaps"])
    key = "base_model.model.lin1.sara_frozen_index_gaps"
    overlapping[key] = with_indices_edited(
        overlapping[key], lambda frozen: frozen.index_fill(0, torch.tensor([0]), int(trainable[3]))
    )
    with pytest.raises(InvalidAdapterError, match=r"'base_model.model.lin1': 1 entries are both trainable and frozen"):
        set_peft_model_state_dict(target, resign(overlapping))
    assert not differences(before, observe(target))


def test_tensors_that_would_overwrite_base_weights_are_refused(source):
    tensors = load_file(source / WEIGHTS)
    tensors["base_model.model.head.weight"] = torch.zeros(4, 16)
    target = get_peft_model(fresh_model(), SaRAConfig(target_modules=TARGETS, threshold=0.05))
    before = observe(target)
    with pytest.raises(InvalidAdapterError, match=r"neither SaRA entries nor modules_to_save.*head.weight"):
        set_peft_model_state_dict(target, tensors)
    assert not differences(before, observe(target))


def test_config_errors_say_what_the_file_is(source, tmp_path):
    shutil.copy(source / WEIGHTS, tmp_path / WEIGHTS)
    raw = json.loads((source / CONFIG).read_text())
    for peft_type, message in ((None, "has no `peft_type`"), ("FOO", "'FOO' adapter, not a SaRA adapter.*import")):
        edited = {key: value for key, value in raw.items() if key != "peft_type"}
        if peft_type is not None:
            edited["peft_type"] = peft_type
        (tmp_path / CONFIG).write_text(json.dumps(edited))
        with pytest.raises(InvalidAdapterError, match=message):
            read_sara_config(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({**raw, "threshold": "small"}))
    with pytest.raises(InvalidAdapterError, match=re.escape("`threshold` must be float | None, got 'small'")):
        load_sara_adapter(SimpleNamespace(components={"unet": fresh_model()}), tmp_path, components=["unet"])
    (tmp_path / CONFIG).write_text(json.dumps(raw)[:-3])
    with pytest.raises(InvalidAdapterError, match="not valid JSON"):
        read_sara_config(tmp_path)


def test_every_config_field_with_every_hostile_value_reads_or_fails_cleanly(source, tmp_path):
    raw = json.loads((source / CONFIG).read_text())
    outcomes = Counter()
    for field in [field.name for field in dataclasses.fields(SaRAConfig)] + ["unknown_field"]:
        for value in CONFIG_VALUES + [[[1]], {"x": [1]}, -(10**30), "", 1.5]:
            (tmp_path / CONFIG).write_text(json.dumps({**raw, field: value}))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    read_sara_config(tmp_path)
                outcomes["read"] += 1
            except InvalidAdapterError:
                outcomes["refused"] += 1
    assert outcomes["read"] and outcomes["refused"]


def test_failed_peft_loads_leave_no_adapter_behind(source, tmp_path):
    shutil.copytree(source, tmp_path / "broken")
    tensors = load_file(source / WEIGHTS)
    del tensors["base_model.model.conv1x1.sara_index_gaps"]
    save_file(tensors, tmp_path / "broken" / WEIGHTS)
    model = get_peft_model(fresh_model(), SaRAConfig(target_modules=["lin0", "head"], trainable_fraction=0.1))
    before = observe(model)
    with pytest.raises(InvalidAdapterError, match="'base_model.model.conv1x1' lacks its 'sara_index_gaps'"):
        model.load_adapter(tmp_path / "broken", adapter_name="other")
    assert list(model.peft_config) == ["default"] and not differences(before, observe(model))
    base = fresh_model()
    base.lin0.weight.requires_grad_(False)
    before = observe(base)
    with pytest.raises(InvalidAdapterError):
        PeftModel.from_pretrained(base, tmp_path / "broken")
    assert not differences(before, observe(base)) and not hasattr(base, "peft_config")


# ------------------------------------------------------------------------------------------------- crash-safe saves
def _saved_state(folder: Path) -> dict:
    return observe(PeftModel.from_pretrained(fresh_model(), folder))


@pytest.mark.parametrize("saver", ["peft_model", "injected"])
def test_a_save_that_fails_midway_keeps_the_previous_adapter(tmp_path, monkeypatch, saver):
    first, second = trained_model(0), trained_model(1)

    def save(model):
        if saver == "peft_model":
            save_model_adapter(model, tmp_path)
        else:
            save_injected_adapter(model.base_model.model, tmp_path, "default")

    save(first)
    expected = _saved_state(tmp_path)
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        save(second)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == files  # no temp files, old bytes
    assert not differences(expected, _saved_state(tmp_path))


def test_killing_a_process_that_saves_in_a_loop_leaves_a_loadable_adapter(tmp_path, one_thread):
    """A child process saves two different adapters in turn, as fast as it can, and is SIGKILLed at a random moment;
    the folder then holds one of the two, whole (config, weights and checksums agree)."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    models = [trained_model(0), trained_model(1)]
    save_model_adapter(models[0], tmp_path)
    expected = []
    for model in models:
        with tempfile.TemporaryDirectory() as tmp:
            save_model_adapter(model, tmp)
            expected.append(_saved_state(Path(tmp)))
    rng = random.Random(0)
    for round_ in range(6):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: save forever, one byte per finished save
            os.close(read_end)
            try:
                for step in range(10**6):
                    if round_ % 2:
                        save_injected_adapter(models[step % 2].base_model.model, tmp_path, "default")
                    else:
                        save_model_adapter(models[step % 2], tmp_path)
                    os.write(write_end, b".")
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        os.close(write_end)
        saves, deadline = 0, time.monotonic() + 60
        while time.monotonic() < deadline and os.read(read_end, 1):
            saves += 1
            if rng.random() < 0.25:  # let it finish a random number of saves, then kill it mid-save
                break
        time.sleep(rng.uniform(0, 0.01))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        assert saves, f"round {round_}: the saving process finished no save"
        with safe_open(tmp_path / WEIGHTS, framework="pt") as handle:
            assert any(key.endswith("sara_format_version") for key in handle.keys())
        state = _saved_state(tmp_path)
        assert any(not differences(candidate, state) for candidate in expected), f"round {round_}: torn adapter"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s", "-q"]))
