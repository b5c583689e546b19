"""``torch.compile(fullgraph=True)`` traces SaRA layers whole (the registered ``peft_sara::sparse_delta`` op), for
training and inference, on adapters created in memory and loaded from files, and matches eager execution."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import MLPConv, tiny_unet, unet_inputs
from peft import PeftModel, get_peft_model

from peft_sara import SaRAConfig
from peft_sara.custom_ops import op_from_spec, op_spec
from peft_sara.functional import ConvOp, LinearOp

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


@pytest.mark.parametrize(
    "op",
    [LinearOp(), LinearOp(transposed=True), ConvOp((1,), (0,), (1,), 1), ConvOp((2, 1), (1, 0), (1, 2), 2)],
)
def test_op_spec_round_trips(op):
    assert op_from_spec(op_spec(op)) == op


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
    # The base weights are bitwise untouched by the compiled patch/restore.
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
