"""SaRA layers against a dense reference: forward, input gradients and value gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from peft_sara import Conv, Linear, SaRAConfig


def dense_reference_weight(layer, adapter: str = "default") -> torch.Tensor:
    """Differentiable effective weight built the obvious (dense) way."""
    weight = layer.get_base_layer().weight.detach()
    indices = layer.sara_indices[adapter].long()
    values = layer.sara_values[adapter]
    flat = weight.reshape(-1)
    patched = (flat[indices].float() + values).to(weight.dtype)
    return flat.index_put((indices,), patched).view_as(weight)


def wrap(module: nn.Module, dtype=torch.float32, fraction=0.3):
    model = nn.Sequential(module).to(dtype)
    peft_model = get_peft_model(
        model, SaRAConfig(trainable_fraction=fraction, target_modules=["0"], init_weights=False)
    )
    return peft_model, peft_model.base_model.model[0]


CONV_CASES = {
    "3x3": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    "1x1_no_bias": dict(in_channels=4, out_channels=6, kernel_size=1, bias=False),
    "stride2": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    "dilation2": dict(in_channels=4, out_channels=6, kernel_size=3, dilation=2, padding=2),
    "groups2": dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1),
    "depthwise": dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, padding=1),
    "same": dict(in_channels=4, out_channels=6, kernel_size=4, padding="same"),
    "valid_rect": dict(in_channels=4, out_channels=6, kernel_size=(3, 2), padding="valid"),
    "reflect": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    "circular": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="circular"),
}

TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def check_against_reference(peft_model, layer, functional, x, dtype):
    x_sara = x.clone().requires_grad_(True)
    out = peft_model(x_sara)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    x_ref = x.clone().requires_grad_(True)
    values = layer.sara_values["default"]
    values_grad, values.grad = values.grad, None
    ref_out = functional(x_ref, dense_reference_weight(layer))
    ref_out.backward(grad_out)

    assert torch.equal(out, ref_out), "forward must equal the dense reference bitwise"
    torch.testing.assert_close(x_sara.grad, x_ref.grad, **TOLERANCES[dtype])
    torch.testing.assert_close(values_grad, values.grad, **TOLERANCES[dtype])
    assert values_grad.dtype == torch.float32
    assert layer.get_base_layer().weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_dense_reference(dtype, bias):
    torch.manual_seed(0)
    peft_model, layer = wrap(nn.Linear(12, 10, bias=bias), dtype)
    assert isinstance(layer, Linear)
    base = layer.get_base_layer()
    x = torch.randn(3, 5, 12, dtype=dtype)
    check_against_reference(peft_model, layer, lambda x, w: F.linear(x, w, base.bias), x, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv2d_matches_dense_reference(case, dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(**CONV_CASES[case])
    reference_conv = nn.Conv2d(**CONV_CASES[case]).to(dtype)
    peft_model, layer = wrap(conv, dtype)
    assert isinstance(layer, Conv)
    base = layer.get_base_layer()
    reference_conv.bias = base.bias
    x = torch.randn(2, 4, 9, 9, dtype=dtype)
    check_against_reference(peft_model, layer, lambda x, w: reference_conv._conv_forward(x, w, base.bias), x, dtype)


@pytest.mark.parametrize("conv_cls, shape", [(nn.Conv1d, (2, 4, 11)), (nn.Conv3d, (2, 4, 5, 5, 5))])
def test_conv1d_and_conv3d_match_dense_reference(conv_cls, shape):
    torch.manual_seed(0)
    conv = conv_cls(4, 6, 3, padding=1, stride=2)
    peft_model, layer = wrap(conv)
    base = layer.get_base_layer()
    x = torch.randn(*shape)
    check_against_reference(peft_model, layer, lambda x, w: base._conv_forward(x, w, base.bias), x, torch.float32)


def test_transformers_conv1d_matches_dense_reference():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv1d = Conv1D(10, 12)  # nf=10 outputs, nx=12 inputs, weight stored (in, out)
    peft_model, layer = wrap(conv1d)
    assert (layer.in_features, layer.out_features) == (12, 10)
    base = layer.get_base_layer()
    x = torch.randn(3, 12)
    check_against_reference(peft_model, layer, lambda x, w: x @ w + base.bias, x, torch.float32)


def test_layers_expose_features_and_lora_conversion_support():
    _, conv_layer = wrap(nn.Conv2d(4, 6, 3))
    _, linear_layer = wrap(nn.Linear(7, 5))
    assert (conv_layer.in_features, conv_layer.out_features) == (4, 6)
    assert (linear_layer.in_features, linear_layer.out_features) == (7, 5)
    # PEFT's convert_to_lora treats a conv kernel as a batch of matrices: convs export through peft_sara.conversion.
    assert linear_layer.supports_lora_conversion() and not conv_layer.supports_lora_conversion()


def test_only_sparse_values_get_gradients_and_optimizer_state(mlp_conv):
    model = get_peft_model(mlp_conv, SaRAConfig(trainable_fraction=0.1, target_modules=["conv", "lin0", "lin1"]))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("sara_values" in name and p.dim() == 1 for name, p in trainable.items())
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model(torch.randn(2, 3, 4, 4)).pow(2).sum().backward()
    optimizer.step()
    assert all(p.grad is None for name, p in model.named_parameters() if not p.requires_grad)
    for param, state in optimizer.state.items():
        assert state["exp_avg"].shape == param.shape and param.dim() == 1
    # The base weights are restored bitwise after every forward/backward.
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, mlp_conv.lin0.base_layer.weight)


def test_base_weight_is_untouched_after_forward_and_backward(mlp_conv):
    before = {k: v.clone() for k, v in mlp_conv.state_dict().items()}
    model = get_peft_model(
        mlp_conv, SaRAConfig(trainable_fraction=0.2, target_modules=["conv", "lin0"], init_weights=False)
    )
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    after = {k.replace("base_layer.", ""): v for k, v in mlp_conv.state_dict().items() if "sara_" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_int32_indices_and_float32_values_whatever_the_base_dtype():
    _, layer = wrap(nn.Linear(16, 16), dtype=torch.bfloat16)
    assert layer.sara_indices["default"].dtype == torch.int32
    assert layer.sara_values["default"].dtype == torch.float32


def test_layers_accept_the_input_keyword_like_torch_modules(mlp_conv):
    model = get_peft_model(mlp_conv, SaRAConfig(trainable_fraction=0.3, target_modules=["lin1"], init_weights=False))
    layer = model.base_model.model.lin1
    x = torch.randn(2, 32)
    assert torch.equal(layer(input=x), layer(x))


def test_conv_follows_changes_of_the_wrapped_modules_settings():
    torch.manual_seed(0)
    peft_model, layer = wrap(nn.Conv2d(4, 6, 3, padding=1))
    base = layer.get_base_layer()
    x = torch.randn(1, 4, 9, 9)
    with torch.no_grad():
        peft_model(x)  # a first call, with the settings the module had
        base.stride, base.padding = (2, 2), (0, 0)
        assert torch.equal(peft_model(x), F.conv2d(x, dense_reference_weight(layer), base.bias, stride=2))
        base.padding_mode, base.padding, base.stride = "reflect", (1, 1), (1, 1)
        base._reversed_padding_repeated_twice = [1, 1, 1, 1]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        assert torch.equal(peft_model(x), F.conv2d(padded, dense_reference_weight(layer), base.bias))


class _LinearHoldingALinear(nn.Linear):
    """A base module that has a `base_layer` of its own: PEFT's walk goes on into it."""

    def __init__(self) -> None:
        super().__init__(8, 8)
        self.base_layer = nn.Linear(8, 8)


def test_get_base_layer_walks_like_peft():
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in (nn.Linear(8, 8), _LinearHoldingALinear()):
        _, layer = wrap(module)
        assert layer.get_base_layer() is BaseTunerLayer.get_base_layer(layer)
    assert layer.get_base_layer() is module.base_layer
