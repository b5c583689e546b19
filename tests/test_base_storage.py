"""Base weights SaRA cannot patch in place: bitsandbytes 4-bit / 8-bit, offloaded (meta) and tied weights; plus the
inference path that never writes into the base (concurrent ``state_dict()``, autocast caches)."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from conftest import MLPConv, train_square_loss
from peft import PeftModel, get_peft_model
from torch import nn

from peft_sara import SaRAConfig
from peft_sara.tuner.selection import select_trainable_indices

bnb = pytest.importorskip("bitsandbytes")
from peft.utils.integrations import dequantize_bnb_weight  # noqa: E402


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(48, 64)
        self.lin1 = nn.Linear(64, 32)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def quantized_model(kind: str, seed: int = 0) -> TwoLinear:
    torch.manual_seed(seed)
    model = TwoLinear()
    for name in ("lin0", "lin1"):
        dense = getattr(model, name)
        if kind == "4bit":
            layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, compute_dtype=torch.float32)
            layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
        setattr(model, name, layer.to("cpu"))
    return model


def dequantized(layer) -> torch.Tensor:
    base = layer.get_base_layer()
    return dequantize_bnb_weight(base.weight, state=getattr(base, "state", None))


def quantized_state(layer) -> list[torch.Tensor]:
    weight = layer.get_base_layer().weight
    return [weight.data.clone()] + ([weight.quant_state.absmax.clone()] if hasattr(weight, "quant_state") else [])


CONFIG = dict(target_modules=["lin0", "lin1"], trainable_fraction=0.2, init_weights=False)
X = torch.randn(6, 48, generator=torch.Generator().manual_seed(1))


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_quantized_base_selects_trains_saves_loads_and_merges(kind, tmp_path):
    model = get_peft_model(quantized_model(kind), SaRAConfig(**CONFIG))
    lin0 = model.base_model.model.lin0
    # Selection reads the dequantized weight; flat indices address its logical shape.
    assert lin0.weight_shape == (64, 48)
    expected_indices, _ = select_trainable_indices(dequantized(lin0), trainable_fraction=0.2)
    assert torch.equal(lin0.sara_indices["default"].long(), expected_indices.long())
    before = quantized_state(lin0)

    # The forward is the base layer's own quantized forward plus the sparse update (dense reference for 4-bit,
    # whose CPU forward computes with exactly the dequantized weight).
    if kind == "4bit":
        reference = nn.functional.linear(X, lin0.get_effective_weight(), lin0.get_base_layer().bias)
        torch.testing.assert_close(lin0(X), reference, rtol=1e-5, atol=1e-5)

    losses = train_square_loss(model, X, steps=4)
    assert losses[-1] < losses[0]
    assert all(torch.equal(a, b) for a, b in zip(before, quantized_state(lin0)))  # base untouched by training

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(quantized_model(kind), tmp_path)
    for name in ("lin0", "lin1"):
        trained, reloaded = getattr(model.base_model.model, name), getattr(loaded.base_model.model, name)
        assert torch.equal(trained.sara_values["default"], reloaded.sara_values["default"])
    with torch.no_grad():
        unmerged = loaded(X)
        with pytest.warns(UserWarning, match=f"requantizes the whole layer.*{kind}|{kind}.*requantizes"):
            loaded.merge_adapter()
        merged = loaded(X)
        assert (merged - unmerged).abs().max() < 0.1 * unmerged.abs().max()  # requantization rounds
        loaded_lin0 = loaded.base_model.model.lin0
        assert type(loaded_lin0.get_base_layer().weight).__name__ in ("Params4bit", "Int8Params")
        merged_weight = dequantized(loaded_lin0)
        reference = loaded_lin0.get_base_layer()  # noqa: F841  (kept quantized)
        loaded.unmerge_adapter()
        assert torch.equal(loaded(X), unmerged)  # the original quantized weight is back, bitwise
    assert not torch.equal(merged_weight, dequantized(loaded_lin0))


def test_quantized_merge_of_a_broken_adapter_is_refused_without_changes():
    model = get_peft_model(quantized_model("4bit"), SaRAConfig(**CONFIG))
    lin0 = model.base_model.model.lin0
    with torch.no_grad():
        lin0.sara_values["default"][0] = float("nan")
    before = quantized_state(lin0)
    with pytest.raises(ValueError, match="NaNs or infs"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(a, b) for a, b in zip(before, quantized_state(lin0)))
    assert not lin0.merged


def test_adapter_created_on_an_offloaded_model_matches_one_created_in_memory():
    from accelerate import cpu_offload

    config = dict(target_modules=["conv", "conv1x1", "lin0", "lin1"], trainable_fraction=0.3)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    in_memory = get_peft_model(MLPConv(), SaRAConfig(**config))
    torch.manual_seed(0)
    offloaded_base = MLPConv()
    cpu_offload(offloaded_base, execution_device=torch.device("cpu"))
    assert offloaded_base.lin0.weight.device.type == "meta"
    offloaded = get_peft_model(offloaded_base, SaRAConfig(**config))
    for name in config["target_modules"]:
        a, b = getattr(in_memory.base_model.model, name), getattr(offloaded.base_model.model, name)
        assert torch.equal(a.sara_indices["default"], b.sara_indices["default"])
        assert b.sara_values["default"].device.type == "cpu"
        with torch.no_grad():
            a.sara_values["default"].normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
            b.sara_values["default"].copy_(a.sara_values["default"])
    with torch.no_grad():
        torch.testing.assert_close(offloaded(x), in_memory(x), rtol=1e-5, atol=1e-6)
    offloaded(x).sum().backward()
    assert offloaded.base_model.model.lin0.sara_values["default"].grad is not None
    # PEFT onloads offloaded layers to merge them (and writes the result back to the offload map).
    with torch.no_grad():
        unmerged = offloaded(x)
        offloaded.merge_adapter()
        torch.testing.assert_close(offloaded(x), unmerged, rtol=1e-5, atol=1e-6)
        offloaded.unmerge_adapter()
        assert torch.equal(offloaded(x), unmerged)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(16, 16)  # untied, merged before the tied pair is reached
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(self.first(x))))


def test_tied_weights_run_exactly_unmerged_and_refuse_to_merge():
    torch.manual_seed(0)
    model = get_peft_model(
        Tied(), SaRAConfig(target_modules=["first", "a", "b"], trainable_fraction=0.3, init_weights=False)
    )
    inner = model.base_model.model
    assert inner.a.get_base_layer().weight is inner.b.get_base_layer().weight
    x = torch.randn(4, 16, requires_grad=True)

    def dense(layer, inputs):
        return nn.functional.linear(inputs, layer.get_effective_weight(), layer.get_base_layer().bias)

    expected = dense(inner.b, torch.relu(dense(inner.a, dense(inner.first, x))))
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.sum().backward()  # no "modified by an inplace operation" from the shared weight
    assert inner.a.sara_values["default"].grad is not None and inner.b.sara_values["default"].grad is not None

    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"layer '.*a' shares its weight with \['.*b'\].*Nothing was merged"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="shares its weight"):
        model.merge_and_unload()
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert not any(layer.merged for layer in (inner.first, inner.a, inner.b))


def test_state_dict_during_concurrent_inference_never_sees_a_patched_weight():
    torch.manual_seed(0)
    model = get_peft_model(
        MLPConv(), SaRAConfig(target_modules=["conv", "lin0", "lin1"], trainable_fraction=0.5, init_weights=False)
    )
    clean = {key: value.clone() for key, value in model.state_dict().items()}
    stop, errors = threading.Event(), []

    def serve():
        with torch.no_grad():
            while not stop.is_set():
                model(torch.randn(2, 3, 4, 4))

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(50):
            snapshot = {key: value.clone() for key, value in model.state_dict().items()}
            errors += [key for key in clean if not torch.equal(snapshot[key], clean[key])]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []


def test_autocast_cache_of_a_grad_requiring_base_weight_does_not_leak_into_disable_adapter():
    torch.manual_seed(0)
    model = get_peft_model(
        MLPConv(), SaRAConfig(target_modules=["lin0", "lin1"], trainable_fraction=0.5, init_weights=False)
    )
    for name in ("lin0", "lin1"):
        getattr(model.base_model.model, name).get_base_layer().weight.requires_grad_(True)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with model.disable_adapter():
            base_only = model(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = model(x)
        with model.disable_adapter():
            after = model(x)
    assert not torch.equal(adapted, base_only)
    assert torch.equal(after, base_only)


def test_merge_warning_names_the_layer_kind():
    model = get_peft_model(quantized_model("4bit"), SaRAConfig(**CONFIG))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
    assert any("Linear4bit" in str(w.message) for w in caught)


def test_4bit_layout_is_the_same_on_cpus_with_and_without_avx512_bf16():
    """On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight for CPU inference on its first no-grad eval forward (a
    layout with bfloat16 block scales that needs in_features >= the block size). SaRA adapts the canonical layout
    everywhere: it unpacks a weight packed before injection and keeps the layer from repacking, so selection, merge and
    unmerge see one weight on every x86 CPU. The packing itself is plain PyTorch, so this runs on any CPU."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    reference = get_peft_model(quantized_model("4bit"), SaRAConfig(**CONFIG))
    model = quantized_model("4bit")
    for layer in (model.lin0, model.lin1):
        layer.support_avx512bf16_for_cpu = True
    # What an eval forward on an AVX512-BF16 CPU does to a layer with in_features >= the block size (lin1; on lin0, 48
    # inputs, bitsandbytes' repack fails: SaRA must keep it from being attempted at all).
    model.lin1.weight.data, model.lin1.weight.quant_state = _convert_weight_packed_for_cpu(
        model.lin1.weight.data, model.lin1.weight.quant_state
    )
    model = get_peft_model(model, SaRAConfig(**CONFIG))
    for name in ("lin0", "lin1"):
        layer, expected = getattr(model.base_model.model, name), getattr(reference.base_model.model, name)
        base = layer.get_base_layer()
        assert base.support_avx512bf16_for_cpu is False
        assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
        assert layer.weight_shape == expected.weight_shape == base.weight.quant_state.shape
        # lin0 was never packed: the same selection as without the flag; lin1's repack had rounded its block scales to
        # bfloat16 (bitsandbytes' doing, before SaRA): its selection is that of the weight it now computes with.
        selected, _ = select_trainable_indices(dequantized(layer), trainable_fraction=0.2)
        assert torch.equal(layer.sara_indices["default"], selected)
    assert torch.equal(
        model.base_model.model.lin0.sara_indices["default"], reference.base_model.model.lin0.sara_indices["default"]
    )
    model.eval()
    before = [quantized_state(getattr(model.base_model.model, name)) for name in ("lin0", "lin1")]
    with torch.no_grad():
        unmerged = model(X)  # an eval forward that would repack on an AVX512-BF16 CPU
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.merge_adapter()
        torch.testing.assert_close(model(X), unmerged, rtol=0.05, atol=0.05)
        model.unmerge_adapter()
    after = [quantized_state(getattr(model.base_model.model, name)) for name in ("lin0", "lin1")]
    assert all(torch.equal(a, b) for pair in zip(before, after) for a, b in zip(*pair))


def test_4bit_layers_qualify_for_the_low_rank_loss_by_their_logical_shape():
    from peft_sara.tuner.regularizers import layer_nuclear_norm, qualifies_for_rank_loss

    model = get_peft_model(quantized_model("4bit"), SaRAConfig(**CONFIG))
    layer = model.base_model.model.lin0
    assert layer.get_base_layer().weight.shape != (64, 48)  # packed storage
    assert qualifies_for_rank_loss(layer, min_dim=40)
    dense = layer.get_sparse_update("default").to_dense().reshape(64, 48)
    for target in ("delta", "masked_weight"):
        norm = layer_nuclear_norm(layer, "default", target=target)
        assert torch.isfinite(norm)
    torch.testing.assert_close(layer_nuclear_norm(layer, "default"), torch.linalg.svdvals(dense).sum())
