"""The package's public seams: the layer's update API, adapter-wide settings, the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model

import peft_sara
from peft_sara import SaRAConfig, SparseUpdate, sara_layers
from peft_sara.tuner.layer import count_entries, sara_adapter_names

TARGETS = ["conv", "conv1x1", "lin0", "lin1"]


def test_sparse_update_is_the_layers_whole_update_including_frozen_entries(mlp_conv):
    model = get_peft_model(mlp_conv, SaRAConfig(trainable_fraction=0.3, target_modules=TARGETS, init_weights=False))
    for _, layer in model.base_model.sara_layers():
        layer.reselect("default")  # moves the entries that grew past the cutoff to the frozen set
        layer.set_scale("default", 0.5)
        update = layer.get_sparse_update("default")
        assert isinstance(update, SparseUpdate)
        assert update.indices.dtype == torch.int64 and update.values.dtype == torch.float32
        assert not update.values.requires_grad and update.scale == 0.5
        assert update.weight_shape == layer.get_base_layer().weight.shape
        assert update.indices.numel() == layer.num_entries("default")
        trainable_indices, trainable_values = layer.trainable_entries("default")
        frozen_indices, _ = layer.frozen_entries("default")
        assert layer.num_entries("default", trainable_only=True) == trainable_values.numel()
        assert layer.num_entries("default") == trainable_values.numel() + frozen_indices.numel()
        # Dense reference: the effective weight minus the base weight.
        base = layer.get_base_layer().weight.detach().float()
        expected = layer.get_effective_weight(["default"]).float() - base
        torch.testing.assert_close(update.to_dense(), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.get_delta_weight("default").float(), expected, rtol=0, atol=1e-6)
        # The live prefix of the values Parameter (a view of it after re-selection), differentiable.
        assert trainable_values.requires_grad
        assert trainable_values.data_ptr() == layer.sara_values["default"].data_ptr()
    assert count_entries(model, "default") == sum(layer.num_entries("default") for _, layer in sara_layers(model))
    assert sara_adapter_names(model) == ["default"]


def test_the_kernel_is_a_runtime_choice_not_saved_with_the_adapter(mlp_conv, tmp_path):
    from conftest import MLPConv

    model = get_peft_model(mlp_conv, SaRAConfig(trainable_fraction=0.1, target_modules=TARGETS))
    peft_sara.set_sara_kernel(model, "reference")
    model.add_adapter("other", SaRAConfig(trainable_fraction=0.1, target_modules=TARGETS))
    assert {kernel for _, layer in sara_layers(model) for kernel in layer.sara_kernel.values()} == {"reference"}
    model.save_pretrained(tmp_path)
    assert "kernel" not in json.loads((tmp_path / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="`kernel` must be one of"):
        peft_sara.set_sara_kernel(model, "cuda")
    with pytest.warns(FutureWarning, match="kernel=.*deprecated"):  # the old spelling still works, for now
        deprecated = SaRAConfig(trainable_fraction=0.1, target_modules=TARGETS, kernel="reference")
    with pytest.raises(ValueError, match=r"same `kernel`, got \['auto', 'reference'\]"):
        get_peft_model(MLPConv(), SaRAConfig(trainable_fraction=0.1, target_modules=TARGETS)).add_adapter(
            "mixed", deprecated
        )


def test_rank_loss_targets_follow_peft_module_matching(mlp_conv):
    from peft_sara.training import SaRATrainingHelper

    def rank_layer_count(targets):
        config = SaRAConfig(
            trainable_fraction=0.2,
            target_modules=TARGETS,
            lambda_rank=1e-3,
            rank_min_dim=1,
            rank_target_modules=targets,
        )
        model = get_peft_model(type(mlp_conv)(), config)
        return len(SaRATrainingHelper(model, None, total_steps=4).rank_layers)

    assert rank_layer_count(None) == 4
    assert rank_layer_count(["lin0", "lin1"]) == 2  # dotted suffixes
    assert rank_layer_count(r".*\.lin\d") == 2  # full-match regex on the module name
    assert rank_layer_count(["in0"]) == 0  # a suffix must end at a dot


def test_cli_lists_subcommands_and_forwards_help():
    result = subprocess.run([sys.executable, "-m", "peft_sara", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in result.stdout and "peft-sara <subcommand> --help" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "peft_sara", "demo", "--help"], capture_output=True, text=True, check=True
    )
    assert "--quick" in result.stdout and "--output-dir" in result.stdout
    version = subprocess.run([sys.executable, "-m", "peft_sara", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and peft_sara.__version__ in version.stdout


def test_cli_rejects_unknown_subcommand_clearly():
    result = subprocess.run([sys.executable, "-m", "peft_sara", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice: 'frobnicate'" in result.stderr


def test_public_training_and_hub_names_are_importable():
    from peft_sara import training
    from peft_sara.hub import push_sara_adapter, sara_model_card  # noqa: F401

    for name in (
        "SaRATrainingHelper",
        "SaRATrainerCallback",
        "save_training_state",
        "load_training_state",
        "paper_learning_rate",
        "sara_layers",
    ):
        assert hasattr(training, name), name
