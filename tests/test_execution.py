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


def test_cached_inference_weight_follows_every_change_it_depends_on():
    model = sara_model()
    layers = [getattr(model.base_model.model, name) for name in TARGETS]

    def check():
        """The no-grad output (cached patched weights) equals the training path's (patched in place per call)."""
        with torch.no_grad():
            cached = model(X)
        with torch.enable_grad():
            reference = model(X).detach()  # (drops the cached weights)
        torch.testing.assert_close(cached, reference, rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            model(X)  # cache the patched weights again: the next change must invalidate them
        return cached

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


def test_a_failed_patch_restores_the_weight_the_grad_mode_and_the_lock():
    from peft_sara.functional import patched_weight, storage_lock

    weight = torch.randn(6, 5)
    before, version = weight.clone(), weight._version
    good = (torch.tensor([0, 7], dtype=torch.int32), torch.tensor([1.0, 2.0]))
    bad = (torch.tensor([3, 99], dtype=torch.int32), torch.tensor([1.0, 2.0]))  # 99 is out of range
    with pytest.raises(IndexError):
        with patched_weight(weight, [good[0], bad[0]], [good[1], bad[1]], [1.0, 1.0], "reference"):
            pass
    assert torch.equal(weight, before) and weight._version == version and torch.is_grad_enabled()
    acquired = []

    def try_lock():  # from another thread: an RLock this thread still held would refuse
        lock = storage_lock(weight)
        acquired.append(lock.acquire(blocking=False))
        if acquired[-1]:
            lock.release()

    other = threading.Thread(target=try_lock)
    other.start()
    other.join()
    assert acquired == [True]
    with patched_weight(weight, [good[0]], [good[1]], [0.5], "reference") as patched:
        assert patched.view(-1)[7] == before.view(-1)[7] + 1.0 and not torch.is_grad_enabled()
    assert torch.equal(weight, before) and weight._version == version
