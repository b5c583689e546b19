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


# (label, model factory, PEFT backend class the layer's backend is, backend name)
RESOLVED = [
    ("torchao-int8", lambda: torchao_model("Int8WeightOnlyConfig"), "TorchaoBackend", "torchao Int8Tensor"),
    ("quanto-qint8", lambda: quanto_model("qint8"), "QuantizationBackend", "optimum-quanto qint8 QLinear (frozen)"),
    ("gguf-Q8_0", lambda: gguf_model("Q8_0"), "QuantizationBackend", "GGUF Q8_0"),
]


@pytest.mark.parametrize(("label", "make_model", "peft_class", "name"), RESOLVED, ids=[r[0] for r in RESOLVED])
def test_each_layer_resolves_its_backend_once_with_peft_interface(label, make_model, peft_class, name, monkeypatch):
    import peft.utils.quantization_utils as peft_quantization

    import peft_sara.tuner.layer as layer_module

    model = get_peft_model(make_model(), SaRAConfig(**CONFIG))
    lin0 = model.base_model.model.lin0
    assert isinstance(lin0.quantization_backend, getattr(peft_quantization, peft_class))
    assert lin0.quantization_backend.backend_name == name
    assert {status.quantization_backend for status in model.get_layer_status()} == {name}  # PEFT reads the attribute
    calls = []
    original = layer_module.resolve_storage_backend
    monkeypatch.setattr(layer_module, "resolve_storage_backend", lambda base: calls.append(base) or original(base))
    train_square_loss(model, X, steps=2)
    with torch.no_grad():
        model(X)
    lin0.get_effective_weight()
    assert calls == []  # forward, backward and reads use the backend resolved at creation


def test_plain_layers_have_no_backend_and_take_the_main_path_until_hooked_disabled_or_merged():
    from peft_sara.tuner.base_weight import ExecutionPath

    torch.manual_seed(0)
    model = get_peft_model(TwoLinear(), SaRAConfig(**CONFIG))
    lin0 = model.base_model.model.lin0
    assert lin0.quantization_backend is None
    assert lin0.execution_path() is ExecutionPath.MAIN
    with model.disable_adapter():
        assert lin0.execution_path() is ExecutionPath.OFF
    model.merge_adapter()
    assert lin0.execution_path() is ExecutionPath.OFF
    model.unmerge_adapter()
    handle = lin0.get_base_layer().register_forward_pre_hook(lambda module, args: None)
    assert lin0.execution_path() is ExecutionPath.COMPOSABLE
    handle.remove()
    assert lin0.execution_path() is ExecutionPath.MAIN
    assert lin0.execution_path(["no-such-adapter"]) is ExecutionPath.OFF


def test_a_weight_replaced_or_cast_after_injection_is_resolved_again():
    quanto = pytest.importorskip("optimum.quanto")
    model = get_peft_model(quanto_model("qint8", frozen=False), SaRAConfig(**CONFIG))
    lin0 = model.base_model.model.lin0
    assert "not frozen" in lin0.composable_reason()
    quanto.freeze(model)  # replaces the weight object by a quantized one
    assert lin0.composable_reason().endswith("(frozen)")
    with torch.no_grad():
        unmerged = model(X)
        with pytest.warns(UserWarning, match=r"qint8 QLinear \(frozen\) layers requantizes"):
            model.merge_adapter()
        model.unmerge_adapter()
        assert torch.equal(model(X), unmerged)

    torch.manual_seed(0)
    plain = get_peft_model(TwoLinear(), SaRAConfig(**CONFIG))
    base = plain.base_model.model.lin0.get_base_layer()
    base.to(torch.float8_e4m3fn)  # cast in place: the same parameter object, another storage
    before = base.weight.clone()
    assert plain.base_model.model.lin0.composable_reason() == "the base weight is stored in torch.float8_e4m3fn"
    with pytest.raises(ValueError, match="Cannot merge .* stored in torch.float8_e4m3fn"):
        plain.base_model.model.lin0.merge()
    assert torch.equal(base.weight.view(torch.uint8), before.view(torch.uint8))


def test_offloaded_layers_keep_their_backend_across_forwards(monkeypatch):
    from accelerate import cpu_offload

    import peft_sara.tuner.layer as layer_module

    torch.manual_seed(0)
    model = get_peft_model(TwoLinear(), SaRAConfig(**CONFIG))
    with torch.no_grad():
        expected = model(X)
    calls = []
    original = layer_module.resolve_storage_backend
    monkeypatch.setattr(layer_module, "resolve_storage_backend", lambda base: calls.append(base) or original(base))
    cpu_offload(model.base_model.model, execution_device=torch.device("cpu"))
    lin0 = model.base_model.model.lin0
    assert lin0.composable_reason() == "the base layer has forward hooks (offloading, layerwise casting, ...)"
    assert lin0.storage_backend().backend_name == "the base weight is on the meta device (offloaded)"
    with torch.no_grad():
        for _ in range(3):  # each forward onloads the weight and puts a new meta parameter back
            torch.testing.assert_close(model(X), expected, rtol=1e-5, atol=1e-6)
    assert len(calls) == 2  # once per layer, for the meta weight the offloading put in place
