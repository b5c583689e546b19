"""Execution safety: threads, version counters, double backward, dtypes, hooks, layerwise casting, guard rails."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import MLPConv
from peft import get_peft_model
from torch import nn

from peft_sara import SaRAConfig

TARGETS = ["conv", "conv1x1", "lin0", "lin1"]
X = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(3))


def sara_model(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    base = MLPConv().to(dtype).eval()
    kwargs.setdefault("trainable_fraction", 0.3)
    return get_peft_model(base, SaRAConfig(target_modules=TARGETS, init_weights=False, **kwargs))


def base_weights(model):
    return {name: param.detach().clone() for name, param in model.named_parameters() if "base_layer" in name}


def test_concurrent_inference_gives_right_outputs_and_leaves_the_base_untouched(one_thread):
    model = sara_model()
    before = base_weights(model)
    inputs = [torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    errors, outputs = [], {}

    def serve(worker):
        try:
            with torch.no_grad():
                for _ in range(25):
                    for i, x in enumerate(inputs):
                        outputs[(worker, i)] = model(x)
                        if not torch.equal(outputs[(worker, i)], expected[i]):
                            errors.append((worker, i))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    after = base_weights(model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_patching_preserves_the_version_counter_of_a_weight_another_op_saved():
    model = sara_model()
    lin1 = model.base_model.model.lin1
    weight = lin1.get_base_layer().weight
    x = torch.randn(5, 32, requires_grad=True)
    untargeted = (x @ weight.t()).sum()  # saves `weight` for its backward
    version = weight._version
    sara_out = lin1(torch.randn(5, 32)).sum()
    assert weight._version == version
    (untargeted + sara_out).backward()  # no "modified by an inplace operation"
    assert x.grad is not None and lin1.sara_values["default"].grad is not None


@pytest.mark.parametrize("name", ["lin1", "conv"])
def test_double_backward_matches_a_dense_reference(name):
    model = sara_model(torch.float64)
    layer = getattr(model.base_model.model, name)
    values = layer.sara_values["default"]
    x = torch.randn(3, 32, dtype=torch.float64) if name == "lin1" else torch.randn(2, 3, 5, 5, dtype=torch.float64)
    x.requires_grad_(True)

    def penalty(output_of):
        out = output_of(x)
        (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        return grad_x.pow(2).sum()

    penalty(layer).backward()
    sara_grad = values.grad.clone()

    base = layer.get_base_layer()
    indices = layer.sara_indices["default"].long()
    reference_values = values.detach().clone().requires_grad_(True)

    def dense(inputs):
        weight = (
            base.weight.detach()
            .reshape(-1)
            .index_put((indices,), base.weight.detach().reshape(-1)[indices] + reference_values)
        )
        weight = weight.view(base.weight.shape)
        if name == "lin1":
            return nn.functional.linear(inputs, weight, base.bias)
        return nn.functional.conv2d(inputs, weight, base.bias, padding=1)

    penalty(dense).backward()
    torch.testing.assert_close(sara_grad, reference_values.grad, rtol=1e-10, atol=1e-12)


def test_float64_base_keeps_float64_values_and_exact_merge():
    model = sara_model(torch.float64)
    layer = model.base_model.model.lin1
    assert layer.sara_values["default"].dtype == torch.float64
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        merged = model(x)
    assert torch.equal(unmerged, merged)
    delta = layer.get_delta_weight("default")
    assert delta.dtype == torch.float64 and delta.abs().max() > 0


def test_autocast_adapter_dtype_false_keeps_the_base_dtype():
    torch.manual_seed(0)
    base = MLPConv().to(torch.bfloat16)
    config = SaRAConfig(target_modules=TARGETS, trainable_fraction=0.2)
    kept = get_peft_model(base, config, autocast_adapter_dtype=False)
    assert {p.dtype for n, p in kept.named_parameters() if "sara_values" in n} == {torch.bfloat16}
    upcast = get_peft_model(MLPConv().to(torch.bfloat16), SaRAConfig(target_modules=TARGETS, trainable_fraction=0.2))
    assert {p.dtype for n, p in upcast.named_parameters() if "sara_values" in n} == {torch.float32}


def test_base_layer_hooks_run_and_the_composable_path_matches_the_fast_path():
    model = sara_model()
    with torch.no_grad():
        fast = model(X)
    calls = []
    for name in TARGETS:
        base = getattr(model.base_model.model, name).get_base_layer()
        base.register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))
    for name in TARGETS:
        assert getattr(model.base_model.model, name).composable_reason() is not None
    with torch.no_grad():
        composed = model(X)
    assert len(calls) == len(TARGETS)
    torch.testing.assert_close(composed, fast, rtol=1e-5, atol=1e-6)
    # Training through the composable path reaches the values.
    model(X).sum().backward()
    assert all(getattr(model.base_model.model, n).sara_values["default"].grad is not None for n in TARGETS)


@pytest.mark.parametrize("storage_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_diffusers_layerwise_casting_runs_sara_adapters(storage_dtype):
    from conftest import tiny_unet, unet_inputs

    unet = tiny_unet()
    unet.add_adapter(SaRAConfig(trainable_fraction=0.05, init_weights=False))
    inputs = unet_inputs()
    with torch.no_grad():
        reference = unet(**inputs).sample
    unet.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=torch.float32)
    with torch.no_grad():
        cast = unet(**inputs).sample
    assert torch.isfinite(cast).all()
    # Storage rounding only: the adapted model stays close to the float32 one.
    assert (cast - reference).abs().mean() < 0.1 * reference.abs().mean()


def test_accelerate_cpu_offload_runs_the_adapter():
    from accelerate import cpu_offload

    model = sara_model()
    with torch.no_grad():
        expected = model(X)
    cpu_offload(model.base_model.model, execution_device=torch.device("cpu"))
    with torch.no_grad():
        offloaded = model(X)
    torch.testing.assert_close(offloaded, expected, rtol=1e-5, atol=1e-6)


def test_base_weight_that_requires_grad_is_a_clear_error():
    model = sara_model()
    model.base_model.model.lin1.get_base_layer().weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="requires grad, but SaRA trains only its sparse values"):
        model(X)
    with torch.no_grad():
        model(X)  # inference is fine


def test_reselection_and_new_adapters_while_merged_are_refused():
    model = sara_model()
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="while adapters \\['default'\\] are merged"):
        model.base_model.model.lin1.reselect("default")
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        model.add_adapter("other", SaRAConfig(target_modules=TARGETS, trainable_fraction=0.1))


def test_no_grad_inference_follows_every_change_and_keeps_no_weight_copy():
    model = sara_model()
    layers = [getattr(model.base_model.model, name) for name in TARGETS]
    adapted_bytes = sum(layer.get_base_layer().weight.nbytes for layer in layers)

    def kept_tensor_bytes(layer):
        """Bytes of every tensor the layer holds (parameters, buffers, attributes) beyond its base layer's."""
        held = {id(t): t for t in layer.parameters()} | {id(t): t for t in layer.buffers()}
        held |= {id(v): v for v in vars(layer).values() if isinstance(v, torch.Tensor)}
        base = {id(t) for t in layer.get_base_layer().parameters()} | {id(t) for t in layer.get_base_layer().buffers()}
        return sum(t.nbytes for key, t in held.items() if key not in base)

    def check():
        """The no-grad output equals the training path's after each change, and nothing weight-sized is kept."""
        with torch.no_grad():
            inference = model(X)
        with torch.enable_grad():
            reference = model(X).detach()
        torch.testing.assert_close(inference, reference, rtol=1e-6, atol=1e-6)
        entries = sum(layer.num_entries(name) for layer in layers for name in layer.sara_values)
        # values (4 bytes) + indices (4 bytes) per entry, plus 0-d scale / count tensors: no weight copies
        assert sum(kept_tensor_bytes(layer) for layer in layers) <= 8 * entries + 64 * len(layers) < adapted_bytes
        return inference

    first = check()
    with torch.no_grad():
        for layer in layers:  # an optimizer step
            layer.sara_values["default"].add_(0.05)
    stepped = check()
    assert not torch.equal(stepped, first)
    for layer in layers:
        layer.set_scale("default", 0.5)
    check()
    with torch.no_grad():
        layers[0].get_base_layer().weight.mul_(1.5)  # the base weight edited in place
    check()
    layers[1].get_base_layer().weight.data = layers[1].get_base_layer().weight.data.clone() * 0.5  # swapped storage
    check()
    model.add_adapter("other", SaRAConfig(target_modules=TARGETS, trainable_fraction=0.1, init_weights=False))
    model.set_adapter("other")
    other = check()
    with torch.no_grad(), model.disable_adapter():
        disabled = model(X)
    assert not torch.equal(other, disabled)
    model.set_adapter("default")
    check()


@pytest.mark.parametrize("grad", [True, False])
def test_forward_and_backward_never_write_the_base_weight(grad):
    model = sara_model()
    weights = {name: param for name, param in model.named_parameters() if "base_layer" in name}
    before = {name: (param.detach().clone(), param._version, param.data_ptr()) for name, param in weights.items()}
    writes = []

    class WriteSpy(torch.utils._python_dispatch.TorchDispatchMode):
        """Records any in-place or out= op whose output aliases a base weight's storage."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            mutated = func._schema.is_mutable
            if mutated:
                pointers = {param.untyped_storage().data_ptr() for param in weights.values()}
                for arg in list(args) + list(kwargs.values()):
                    if isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() in pointers:
                        writes.append(str(func))
            return func(*args, **kwargs)

    with WriteSpy(), torch.set_grad_enabled(grad):
        output = model(X)
        if grad:
            output.square().sum().backward()
    assert writes == []
    for name, param in weights.items():
        saved, version, pointer = before[name]
        assert torch.equal(param, saved) and param._version == version and param.data_ptr() == pointer, name


def test_a_non_contiguous_base_weight_is_used_as_it_is():
    torch.manual_seed(0)
    base = nn.Linear(12, 8)
    base.weight = nn.Parameter(torch.randn(12, 8).t(), requires_grad=False)  # transposed view: not contiguous
    expected_base = base.weight.detach().clone()
    model = get_peft_model(
        nn.Sequential(base), SaRAConfig(target_modules=["0"], trainable_fraction=0.3, init_weights=False)
    )
    layer = model.base_model.model[0]
    x = torch.randn(5, 12)
    reference = nn.functional.linear(x, layer.get_effective_weight(), layer.get_base_layer().bias)
    torch.testing.assert_close(model(x), reference)
    assert not layer.get_base_layer().weight.is_contiguous()
    model.merge_adapter()
    torch.testing.assert_close(model(x), reference)
    model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, expected_base)


@pytest.mark.parametrize("name", ["lin1", "conv"])
def test_both_paths_save_only_the_input_and_the_values_for_backward(name):
    model = sara_model()
    layer = getattr(model.base_model.model, name)
    x = torch.randn(5, 32) if name == "lin1" else torch.randn(2, 3, 5, 5)
    weight_shape = layer.get_base_layer().weight.shape
    expected = None
    for composable in (False, True):
        if composable:  # a hooked base layer runs itself plus the update (offloading, layerwise casting, ...)
            layer.get_base_layer().register_forward_pre_hook(lambda module, args: None)
        assert (layer.composable_reason() is not None) == composable
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            output = layer(x)
        assert not any(
            t.shape == weight_shape and t.data_ptr() != layer.get_base_layer().weight.data_ptr() for t in saved
        )
        layer.sara_values["default"].grad = None
        output.square().sum().backward()
        grad = layer.sara_values["default"].grad.clone()
        if expected is None:
            expected = (output.detach(), grad)
        else:
            torch.testing.assert_close(output, expected[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad, expected[1], rtol=1e-5, atol=1e-6)
