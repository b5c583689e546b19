"""Merging onto quantized bases stops only for the reasons the README table gives: tensor-subclass weights (torchao,
optimum-quanto, whose ``data_ptr()`` is 0) are not mistaken for tied weights, truly tied weights still refuse, and a
requantizing merge warns once per operation, not once per layer."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_sara import SaRAConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dict(target_modules=["a", "b", "c"], trainable_fraction=0.1, init_weights=False)


class ThreeSquare(nn.Module):
    """Three Linear layers of the same shape: same shape and a zero ``data_ptr()`` once quantized to a subclass."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(128, 128), nn.Linear(128, 128), nn.Linear(128, 128)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def quanto_model():
    quanto = pytest.importorskip("optimum.quanto")
    torch.manual_seed(0)
    model = ThreeSquare()
    quanto.quantize(model, weights=quanto.qint8)
    quanto.freeze(model)
    return model


def merge_warnings(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
    return [str(w.message) for w in caught if "requantizes" in str(w.message)]


def test_frozen_quanto_base_merges_and_warns_once_for_all_layers():
    model = get_peft_model(quanto_model(), SaRAConfig(**CONFIG))
    assert all(not layer.sara_tied_layers for _, layer in model.base_model.sara_layers())
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = model(x)
    messages = merge_warnings(model)
    assert len(messages) == 1 and "3 optimum-quanto qint8 QLinear (frozen) layers" in messages[0], messages
    assert all(layer.merged for _, layer in model.base_model.sara_layers())
    model.unmerge_adapter()
    with torch.no_grad():
        assert torch.equal(model(x), unmerged)


def test_torchao_int8_merge_is_refused_for_its_own_reason_not_as_tied():
    torchao_quantization = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    base = ThreeSquare()
    torchao_quantization.quantize_(base, torchao_quantization.Int8WeightOnlyConfig())
    model = get_peft_model(base, SaRAConfig(**CONFIG))
    assert all(not layer.sara_tied_layers for _, layer in model.base_model.sara_layers())
    with pytest.raises(ValueError, match="Cannot merge") as refusal:
        model.merge_adapter()
    assert "shares its weight" not in str(refusal.value) and "torchao" in str(refusal.value)


def test_truly_tied_weights_still_refuse_to_merge():
    torch.manual_seed(0)
    base = ThreeSquare()
    base.b.weight = base.a.weight  # one Parameter in two layers
    model = get_peft_model(base, SaRAConfig(**CONFIG))
    with pytest.raises(ValueError, match=r"layer 'a' shares its weight with \['b'\]"):
        model.merge_adapter()
