"""``torch.compile(fullgraph=True)`` traces SaRA layers whole (dynamo traces the autograd function of the main path),
for training and inference, on adapters created in memory and loaded from files, matches eager execution, and keeps
its graph when values, scales and the trainable set change."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import MLPConv, tiny_unet, unet_inputs
from peft import PeftModel, get_peft_model

from peft_sara import SaRAConfig, sara_layers

TARGETS = ["conv", "conv1x1", "lin0", "lin1"]
X = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=False):
        yield
    torch._dynamo.reset()


def sara_mlp():
    torch.manual_seed(0)
    return get_peft_model(MLPConv(), SaRAConfig(target_modules=TARGETS, trainable_fraction=0.3, init_weights=False))


def gradients(model):
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_fullgraph_train_step_matches_eager(backend):
    eager = sara_mlp().train()
    loss = eager(X).pow(2).mean()
    loss.backward()
    expected = gradients(eager)

    model = sara_mlp().train()
    inner = model.base_model.model

    def train_loss(x):
        return inner(x).pow(2).mean()

    compiled = torch.compile(train_loss, fullgraph=True, backend=backend)
    compiled_loss = compiled(X)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    got = gradients(model)
    assert got.keys() == expected.keys() and any("sara_values" in name for name in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    # The base weights are bitwise untouched.
    base = {name: p for name, p in sara_mlp().named_parameters() if "base_layer" in name}
    for name, param in model.named_parameters():
        if "base_layer" in name:
            assert torch.equal(param, base[name])


def test_compiled_training_steps_follow_eager_steps_without_recompiling():
    runs = []
    for compile_model in (False, True):
        model = sara_mlp().train()
        inner = model.base_model.model
        forward = torch.compile(inner, fullgraph=True, backend="aot_eager") if compile_model else inner
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        with torch._dynamo.config.patch(error_on_recompile=compile_model):
            for step in range(3):
                x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(step))
                forward(x).pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
        runs.append({name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad})
    for name in runs[0]:
        torch.testing.assert_close(runs[1][name], runs[0][name], rtol=1e-4, atol=1e-6)


def test_fullgraph_inference_of_a_unet_adapter_loaded_from_files(tmp_path):
    torch.manual_seed(0)
    trained = get_peft_model(tiny_unet(), SaRAConfig(trainable_fraction=0.1, init_weights=False))
    trained.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_unet(), tmp_path).eval()
    unet = loaded.base_model.model
    with torch.no_grad():
        expected = [unet(**unet_inputs(seed=seed)).sample for seed in (1, 2)]
        compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = [compiled(**unet_inputs(seed=seed)).sample for seed in (1, 2)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert not torch.equal(expected[0], tiny_unet()(**unet_inputs(seed=1)).sample)  # the adapter is active


def test_fullgraph_compile_of_the_composable_path():
    model = sara_mlp()
    model.base_model.model.lin0.base_layer.register_forward_pre_hook(lambda module, args: None)
    with torch.no_grad():
        expected = model(X)
        compiled = torch.compile(model.base_model.model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(X), expected)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_no_recompile_across_value_scale_and_trainable_set_changes(backend):
    model = sara_mlp().train()
    inner = model.base_model.model
    layers = [layer for _, layer in sara_layers(model)]
    compiled = torch.compile(inner, fullgraph=True, backend=backend)
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(5))

    def run(forward):
        model.zero_grad()
        loss = forward(x).pow(2).mean()
        loss.backward()
        return loss.detach(), gradients(model)

    def check():
        eager_loss, eager_grads = run(inner)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled_loss, compiled_grads = run(compiled)
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert compiled_grads.keys() == eager_grads.keys()
        for name in eager_grads:
            torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6)
        return compiled_loss

    run(compiled)  # the one compilation
    first = check()
    with torch.no_grad():
        for layer in layers:  # an optimizer step
            layer.sara_values["default"].add_(0.05)
    assert not torch.equal(check(), first)
    for layer in layers:
        layer.set_scale("default", 0.5)
    check()
    generator = torch.Generator().manual_seed(0)
    for layer in layers:  # a progressive re-selection: a live prefix, an inert tail, frozen entries
        keep = torch.rand(layer.num_trainable("default"), generator=generator) < 0.6
        layer.reselect("default", keep)
        assert 0 < layer.num_trainable("default") < layer.sara_values["default"].numel()
    check()
    _, compiled_grads = run(compiled)
    for layer in layers:  # the inert tail gets no gradient in the compiled graph either
        count = layer.num_trainable("default")
        assert torch.count_nonzero(layer.sara_values["default"].grad[count:]) == 0
    with torch.no_grad():
        for layer in layers:
            layer.sara_values["default"][: layer.num_trainable("default")].add_(-0.02)
    check()
