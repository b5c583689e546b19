"""SaRA on quantized bases beyond bitsandbytes (tested in test_base_storage.py): torchao, optimum-quanto and diffusers'
GGUF weights. Each backend: selection reads the dequantized weight, the layer runs the backend's own forward plus the
update, training leaves the quantized weight untouched, the adapter saves and loads, and merging follows the
backend's stated policy (requantize with a warning and unmerge bitwise, or refuse naming the backend)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import train_square_loss
from peft import PeftModel, get_peft_model
from torch import nn

from peft_sara import SaRAConfig
from peft_sara.tuner.base_weight import readable_weight
from peft_sara.tuner.selection import select_trainable_indices

X = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
CONFIG = dict(target_modules=["lin0", "lin1"], trainable_fraction=0.1, init_weights=False)


class TwoLinear(nn.Module):
    """In-features of 128: a whole number of GGUF blocks (32) and of quanto's qint4 groups (128)."""

    def __init__(self, in_features: int = 128, hidden: int = 128) -> None:
        super().__init__()
        self.lin0 = nn.Linear(in_features, hidden)
        self.lin1 = nn.Linear(hidden, 32)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def torchao_model(config_name: str):
    torchao_quantization = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    model = TwoLinear()
    torchao_quantization.quantize_(model, getattr(torchao_quantization, config_name)())
    return model


def quanto_model(qtype_name: str, frozen: bool = True):
    quanto = pytest.importorskip("optimum.quanto")
    torch.manual_seed(0)
    model = TwoLinear()
    quanto.quantize(model, weights=getattr(quanto, qtype_name))
    if frozen:
        quanto.freeze(model)
    return model


def gguf_model(quant_type_name: str, width: int = 128):
    """What diffusers' GGUF loader builds: ``GGUFLinear`` layers holding ``GGUFParameter``s of packed blocks."""
    gguf = pytest.importorskip("gguf")
    gguf_utils = pytest.importorskip("diffusers.quantizers.gguf.utils")
    torch.manual_seed(0)
    model = TwoLinear(width, width)
    quant_type = gguf.GGMLQuantizationType[quant_type_name]
    for name in ("lin0", "lin1"):
        dense = getattr(model, name)
        layer = gguf_utils.GGUFLinear(dense.in_features, dense.out_features, bias=True, compute_dtype=torch.float32)
        weight = dense.weight.detach().numpy()
        try:
            packed = gguf.quants.quantize(weight, quant_type)
        except NotImplementedError:  # K-quants: the gguf package only reads them; any bytes of the right size do
            block_size, type_size = gguf.GGML_QUANT_SIZES[quant_type]
            packed = torch.zeros(weight.shape[0], weight.shape[1] // block_size * type_size, dtype=torch.uint8).numpy()
        layer.weight = gguf_utils.GGUFParameter(torch.from_numpy(packed), quant_type=quant_type)
        layer.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=False)
        setattr(model, name, layer)
    return model


def stored_weights(model: nn.Module) -> list[torch.Tensor]:
    """A bitwise fingerprint of the quantized base weights (their dequantized values and raw storage)."""
    fingerprint = []
    for name in ("lin0", "lin1"):
        base = getattr(model.base_model.model, name).get_base_layer()
        with readable_weight(base) as weight:
            fingerprint.append(weight.clone())
    return fingerprint


# (backend label, model factory, merge policy, what the composable reason names)
BACKENDS = [
    ("torchao-int8", lambda: torchao_model("Int8WeightOnlyConfig"), "refuse", "torchao Int8Tensor"),
    ("torchao-float8", lambda: torchao_model("Float8WeightOnlyConfig"), "refuse", "torchao Float8Tensor"),
    ("quanto-qint8", lambda: quanto_model("qint8"), "requantize", "optimum-quanto qint8 QLinear (frozen)"),
    ("quanto-qint4", lambda: quanto_model("qint4"), "requantize", "optimum-quanto qint4 QLinear (frozen)"),
    ("quanto-qint8-unfrozen", lambda: quanto_model("qint8", frozen=False), "requantize", "not frozen"),
    ("gguf-Q8_0", lambda: gguf_model("Q8_0"), "requantize", "GGUF Q8_0"),
    ("gguf-Q4_0", lambda: gguf_model("Q4_0"), "requantize", "GGUF Q4_0"),
]


@pytest.mark.parametrize(("label", "make_model", "policy", "named"), BACKENDS, ids=[b[0] for b in BACKENDS])
def test_quantized_base_selects_trains_saves_loads_and_merges_per_policy(label, make_model, policy, named, tmp_path):
    model = get_peft_model(make_model(), SaRAConfig(**CONFIG))
    lin0 = model.base_model.model.lin0
    assert named in lin0.composable_reason()
    # Selection reads the dequantized weight; flat indices address its logical shape.
    assert lin0.weight_shape == (128, 128)
    with readable_weight(lin0.get_base_layer()) as weight:
        expected_indices, _ = select_trainable_indices(weight, trainable_fraction=0.1)
    assert torch.equal(lin0.sara_indices["default"].long(), expected_indices.long())

    # The backend's own forward plus the update: close to the dense effective weight (weight-only quantization).
    with torch.no_grad():
        reference = nn.functional.linear(X, lin0.get_effective_weight(), lin0.get_base_layer().bias)
        torch.testing.assert_close(lin0(X), reference, rtol=2e-2, atol=2e-2)

    before = stored_weights(model)
    losses = train_square_loss(model, X, steps=3)
    assert losses[-1] < losses[0]
    assert all(torch.equal(a, b) for a, b in zip(before, stored_weights(model)))  # the base is never written

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    with torch.no_grad():
        unmerged = loaded(X)
        torch.testing.assert_close(unmerged, model(X))
        if policy == "refuse":
            with pytest.raises(ValueError, match=f"Cannot merge.*{named}"):
                loaded.merge_adapter()
            assert not loaded.base_model.model.lin0.merged
            assert torch.equal(loaded(X), unmerged)
            return
        stored_type = type(loaded.base_model.model.lin0.get_base_layer().weight)
        with pytest.warns(UserWarning, match="requantizes the whole layer"):
            loaded.merge_adapter()
        merged = loaded(X)
        assert type(loaded.base_model.model.lin0.get_base_layer().weight) is stored_type
        assert (merged - unmerged).abs().max() < 0.1 * unmerged.abs().max()  # requantization rounds
        loaded.unmerge_adapter()
        assert torch.equal(loaded(X), unmerged)  # the original quantized weight is back, bitwise


def test_gguf_merge_into_a_k_quant_is_refused_without_changes():
    model = get_peft_model(gguf_model("Q4_K", width=256), SaRAConfig(**CONFIG))
    lin0 = model.base_model.model.lin0
    assert lin0.weight_shape == (256, 256)  # Q4_K packs 256 entries in 144 bytes: the stored rows are 144 wide
    assert lin0.get_base_layer().weight.shape == (256, 144)
    before = lin0.get_base_layer().weight.clone()
    with pytest.raises(ValueError, match="cannot quantize to Q4_K"):
        model.merge_adapter()
    assert torch.equal(lin0.get_base_layer().weight, before)
    assert not lin0.merged


def test_merge_warning_names_the_backend():
    model = get_peft_model(quanto_model("qint8"), SaRAConfig(**CONFIG))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
    assert any("optimum-quanto qint8 QLinear" in str(w.message) for w in caught)
