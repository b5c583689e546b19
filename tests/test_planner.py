"""The training-memory planner: plans on fake tensors agree with real CPU steps, and the command prints them."""

from __future__ import annotations

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from peft_sara.commands import plan_cmd
from peft_sara.planning import (
    PARTS,
    PRESETS,
    MethodSpec,
    PlanRequest,
    fraction_for_threshold,
    measure_training_memory,
    plan_training_memory,
    resolve_model,
)
from peft_sara.planning.analytic import adamw8bit_state_bytes
from peft_sara.planning.build import apply_method, build_model, trainable_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = PRESETS["tiny"]


def tiny_request(method: MethodSpec, **fields) -> PlanRequest:
    return PlanRequest(TINY, method, resolution=64, batch_size=2, dtype="float32", **fields)


@pytest.mark.parametrize(
    "method",
    [MethodSpec("sara", fraction=0.05), MethodSpec("lora", rank=4), MethodSpec("full")],
    ids=["sara", "lora", "full"],
)
def test_planned_peak_matches_the_measured_cpu_peak_within_10_percent(method):
    request = tiny_request(method)
    plan = plan_training_memory(request)
    measured = measure_training_memory(request)
    assert plan.peak_bytes == pytest.approx(measured.measured_bytes, rel=0.10)
    assert sum(plan.breakdown.values()) == plan.peak_bytes


def test_sara_plan_counts_the_modelled_entries_as_adapter_state():
    sara = plan_training_memory(tiny_request(MethodSpec("sara", fraction=0.05)))
    full = plan_training_memory(tiny_request(MethodSpec("full")))
    # float32 values + int32 indices per trainable entry (plus a few bytes of bookkeeping per layer); AdamW keeps two
    # float32 moments per value
    assert sara.breakdown["adapter"] == pytest.approx(8 * sara.trainable_parameters, rel=0.01)
    assert sara.breakdown["optimizer"] >= 8 * sara.trainable_parameters
    assert 0.04 * full.trainable_parameters < sara.trainable_parameters < 0.06 * full.trainable_parameters


def test_quantized_base_and_8bit_adamw_are_computed_not_traced():
    method = MethodSpec("lora", rank=4)
    plain = plan_training_memory(tiny_request(method))
    quantized = plan_training_memory(tiny_request(method, base_quantization="4bit", optimizer="adamw8bit"))
    assert quantized.breakdown["weights"] < plain.breakdown["weights"]
    assert quantized.breakdown["optimizer"] == adamw8bit_state_bytes([numel for numel in _trainable_numels(method)])
    with pytest.raises(ValueError, match="Full fine-tuning cannot train a quantized base"):
        tiny_request(MethodSpec("full"), base_quantization="4bit")


def _trainable_numels(method: MethodSpec) -> list[int]:
    with FakeTensorMode():
        model = apply_method(build_model(TINY, torch.float32, fake=True), method, fake=True)
        return [param.numel() for param in trainable_parameters(model)]


def test_threshold_fraction_follows_the_papers_sd15_counts():
    assert fraction_for_threshold(2e-3) == pytest.approx(50 / 860)
    assert fraction_for_threshold(8e-4) == pytest.approx(20 / 860)
    assert fraction_for_threshold(1e-4) == pytest.approx(2.5 / 860)


def test_a_config_folder_resolves_to_its_diffusers_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **TINY.config}))
    model = resolve_model(str(tmp_path))
    assert model.class_name == "UNet2DConditionModel" and model.config == TINY.config
    with pytest.raises(ValueError, match="preset"):
        resolve_model(str(tmp_path / "missing"))


def test_plan_command_prints_one_json_object_with_peak_and_breakdown(capsys):
    argv = "--model tiny --method sara --fraction 0.05 --resolution 64 --batch-size 2 --dtype float32 --json"
    assert plan_cmd.main(argv.split()) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan["breakdown"]) == set(PARTS)
    assert plan["peak_bytes"] == sum(plan["breakdown"].values())
    with pytest.raises(SystemExit) as exit_info:
        plan_cmd.main(["--help"])
    assert exit_info.value.code == 0
    assert "--gradient-checkpointing" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"layers_per_block": 100_000}, "blocks"),
        ({"transformer_layers_per_block": [[400] * 3] * 3}, "blocks"),
        ({"block_out_channels": list(range(32, 32 * 200, 32))}, "entries"),
        ({"cross_attention_dim": 10**12}, "beyond any real model"),
    ],
    ids=["layers", "nested-transformer-layers", "levels", "width"],
)
def test_a_folder_config_that_would_plan_for_hours_is_refused_at_once(tmp_path, edit, message):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **TINY.config, **edit}))
    with pytest.raises(ValueError, match=message):
        resolve_model(str(tmp_path))
    flux = {"_class_name": "FluxTransformer2DModel", "num_layers": 10**5, "num_single_layers": 0}
    (tmp_path / "config.json").write_text(json.dumps(flux))
    with pytest.raises(ValueError, match="blocks"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a model config"):
        resolve_model(str(tmp_path))


def test_every_preset_is_within_the_planning_bounds():
    from peft_sara.planning.presets import check_planning_cost

    for preset in PRESETS.values():
        check_planning_cost(preset.class_name, preset.config, preset.name)
