"""Issue 20: every load is all-or-nothing, no file runs code, and what is validated is what is loaded.

One test per class of failure, each on several examples; "unchanged" means every tensor (bitwise), ``requires_grad``,
module types, ``peft_config`` keys and active adapters (``observe`` of ``test_untrusted_files``).
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from conftest import MLPConv
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_untrusted_files import differences, observe, resign

from peft_sara import SaRAConfig
from peft_sara.training import load_training_state, save_training_state
from peft_sara.tuner.file_format import InvalidAdapterError

TARGETS = ["conv", "conv1x1", "lin0", "lin1"]
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def fresh(seed: int = 0) -> MLPConv:
    torch.manual_seed(seed)
    return MLPConv().eval()


def saved_adapter(folder, seed=1, **config) -> None:
    model = get_peft_model(fresh(), SaRAConfig(target_modules=TARGETS, threshold=0.05, init_weights=False, **config))
    torch.manual_seed(seed)
    for _, layer in model.base_model.sara_layers():
        with torch.no_grad():
            layer.trainable_entries("default")[1].add_(0.01 * torch.randn_like(layer.trainable_entries("default")[1]))
    model.save_pretrained(folder)


def edit_config(folder, **changes) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


def edit_weights(folder, edit) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS)


# ------------------------------------------------------------------------------------------------- case 2: injection
@pytest.mark.parametrize(
    "change",
    [
        {"target_modules": ["lin0", "lin1", "head", "relu_missing", "conv"], "exclude_modules": None},  # no failure
        {"target_modules": "(lin0|lin1|\\.?)$"},  # matches the root module too: not a supported layer
        {"task_type": "CAUSAL_LM"},  # a PeftModel subclass that expects a language model
    ],
    ids=["control", "unsupported-target", "task-type"],
)
def test_a_from_pretrained_that_fails_leaves_the_callers_base_model_unchanged(tmp_path, change):
    saved_adapter(tmp_path)
    edit_config(tmp_path, **change)
    base = fresh()
    before = observe(base)
    try:
        PeftModel.from_pretrained(base, tmp_path)
    except Exception:  # noqa: BLE001 - any refusal is fine, as long as nothing changed
        assert not differences(before, observe(base))
        assert not any("sara" in type(module).__module__ for module in base.modules())


def test_a_refused_load_adapter_leaves_no_orphan_and_keeps_training_flags(tmp_path):
    saved_adapter(tmp_path / "good")
    saved_adapter(tmp_path / "bad", seed=2)
    edit_weights(tmp_path / "bad", lambda t: t.update({k: t[k] * 0 + 7 for k in t if k.endswith("sara_checksum")}))
    model = get_peft_model(fresh(), SaRAConfig(target_modules=TARGETS, threshold=0.05))
    before = observe(model)
    for attempt in range(3):  # refused loads do not pile up
        with pytest.raises(InvalidAdapterError):
            model.load_adapter(tmp_path / "bad", adapter_name=f"other{attempt}")
        assert not differences(before, observe(model))
    assert all(p.requires_grad for n, p in model.named_parameters() if "sara_values.default" in n)
    model.load_adapter(tmp_path / "good", adapter_name="other")  # and a good one still loads


# ------------------------------------------------------------------------------------------------- cases 3, 5, 6: keys
@pytest.mark.parametrize(
    "extra_key",
    ["base_model.model.head.weight", "head.weight", "base_model.model.conv.base_layer.weight"],
    ids=["base-weight", "unprefixed-base-weight", "wrapped-base-weight"],
)
def test_tensors_outside_sara_and_declared_modules_to_save_are_refused(tmp_path, extra_key):
    saved_adapter(tmp_path)
    edit_weights(tmp_path, lambda t: t.update({extra_key: torch.zeros(4, 16)}))
    base = fresh()
    before = observe(base)
    with pytest.raises(InvalidAdapterError):
        PeftModel.from_pretrained(base, tmp_path)
    assert not differences(before, observe(base))


def _respell(prefix_from: str, prefix_to: str, keep_both: bool):
    def edit(tensors):
        for key in [k for k in tensors if k.startswith(prefix_from + "lin1.")]:
            tensors[prefix_to + key.removeprefix(prefix_from)] = tensors[key].clone()
            if not keep_both:
                del tensors[key]

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_respell("base_model.model.", "", keep_both=True), "twice"),  # the same tensor under two spellings
        (_respell("base_model.model.", "base_model.model._orig_mod.", keep_both=False), "match no SaRA layer"),
    ],
    ids=["duplicate-spelling", "wrapper-prefix"],
)
def test_what_is_validated_is_exactly_what_is_loaded(tmp_path, edit, message):
    saved_adapter(tmp_path)
    edit_weights(tmp_path, edit)
    with pytest.raises(InvalidAdapterError, match=message):
        PeftModel.from_pretrained(fresh(), tmp_path)


def test_checksums_bind_the_layer_name_and_cover_modules_to_save(tmp_path):
    from peft_sara.tuner.file_format import entries_checksum

    tensors = {"sara_index_gaps": torch.arange(3, dtype=torch.uint8), "sara_values": torch.ones(3)}
    assert not torch.equal(entries_checksum("down.0", tensors), entries_checksum("down.1", tensors))  # swap detected
    saved_adapter(tmp_path, modules_to_save=["head"])
    edit_weights(tmp_path, lambda t: t.update({"base_model.model.head.bias": t["base_model.model.head.bias"] + 1}))
    with pytest.raises(InvalidAdapterError, match="modules_to_save tensors do not match"):
        PeftModel.from_pretrained(fresh(), tmp_path)


# ------------------------------------------------------------------------------------------------- case 8: overflow
@pytest.mark.parametrize(
    ("value", "dtype"), [(3e38, torch.float32), (1e5, torch.float16), (float("inf"), torch.float32)]
)
def test_values_that_overflow_the_effective_weight_are_refused(tmp_path, value, dtype):
    saved_adapter(tmp_path)
    edit_weights(
        tmp_path,
        lambda t: t.update({"base_model.model.lin1.sara_values": t["base_model.model.lin1.sara_values"] * 0 + value}),
    )
    edit_weights(tmp_path, resign)
    base = fresh().to(dtype)
    before = observe(base)
    with pytest.raises(InvalidAdapterError, match="lin1"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not differences(before, observe(base))


# ------------------------------------------------------------------------------------------------- case 9: merged
def test_loading_over_a_merged_adapter_of_the_same_name_is_refused(tmp_path):
    saved_adapter(tmp_path)
    model = PeftModel.from_pretrained(fresh(), tmp_path)
    model.merge_adapter()
    before = observe(model)
    with pytest.raises(ValueError, match="merged"):
        model.load_adapter(tmp_path, adapter_name="default")
    assert not differences(before, observe(model))


# ------------------------------------------------------------------------------------------------- case 11
def test_a_downloaded_kernel_choice_is_ignored_and_paths_cannot_escape(tmp_path):
    saved_adapter(tmp_path / "adapter")
    edit_config(tmp_path / "adapter", kernel="triton")
    loaded = PeftModel.from_pretrained(fresh(), tmp_path / "adapter")
    assert loaded.peft_config["default"].kernel == "auto"
    loaded(torch.randn(2, 3, 4, 4))  # a CPU forward runs
    from peft_sara.resolve import resolve_adapter_folder

    for subfolder in ("../adapter", "/etc", "a/../../b"):
        with pytest.raises(InvalidAdapterError, match="relative path"):
            resolve_adapter_folder(tmp_path / "adapter", subfolder, None, None, None, True)
    with pytest.raises(InvalidAdapterError, match="relative path"):
        resolve_adapter_folder(tmp_path / "adapter", None, None, None, None, True, weight_name="../x.safetensors")


# ------------------------------------------------------------------------------------------------- case 1: training state
class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _checkpoint(tmp_path):
    model = get_peft_model(fresh(), SaRAConfig(target_modules=TARGETS, threshold=0.05, init_weights=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    optimizer.step()
    save_training_state(str(tmp_path / "ckpt"), model, optimizer)
    target = get_peft_model(fresh(), SaRAConfig(target_modules=TARGETS, threshold=0.05))
    return tmp_path / "ckpt", target


@pytest.mark.parametrize("damage", ["pickle", "truncate", "missing", "json", "groups"])
def test_a_hostile_or_broken_training_state_runs_no_code_and_changes_nothing(tmp_path, monkeypatch, damage):
    monkeypatch.chdir(tmp_path)
    folder, model = _checkpoint(tmp_path)
    state_file = folder / "sara_training_state.safetensors"
    if damage == "pickle":
        state_file.write_bytes(pickle.dumps({"optimizer": RunsCode()}))
    elif damage == "truncate":
        state_file.write_bytes(state_file.read_bytes()[:100])
    elif damage == "missing":
        state_file.unlink()
    elif damage == "json":
        from safetensors import safe_open

        with safe_open(state_file, framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        save_file(tensors, state_file, metadata={"sara_training_state": '{"version": 1, "state": {"dict": [[1]]}}'})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if damage == "groups":  # another optimizer layout: two groups
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1e-2)
    before = observe(model)
    with pytest.raises((InvalidAdapterError, FileNotFoundError, ValueError)):
        load_training_state(str(folder), model, optimizer)
    assert not (tmp_path / "pwned").exists()
    assert not differences(before, observe(model))
    assert not optimizer.state
