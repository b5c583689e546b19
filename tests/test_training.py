"""Low-rank loss, progressive re-selection, resume, Trainer/accelerate hooks, adapter scaling and combination."""

from __future__ import annotations

import pytest
import torch
from conftest import MLPConv, tiny_unet, unet_inputs
from peft import get_peft_model

from peft_sara import SaRAConfig
from peft_sara.merging import combine_adapters, set_adapter_strength
from peft_sara.training import (
    SaRATrainingHelper,
    load_training_state,
    paper_learning_rate,
    save_training_state,
)
from peft_sara.tuner.regularizers import delta_rank_stats, layer_nuclear_norm

TARGETS = ["conv", "lin0", "lin1"]


def make_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    if "threshold" not in kwargs:
        kwargs.setdefault("trainable_fraction", 0.3)
    kwargs.setdefault("init_weights", False)
    return get_peft_model(MLPConv(), SaRAConfig(target_modules=TARGETS, **kwargs))


def batches(count, seed=123):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, 4, 4, generator=generator), torch.randn(4, 4, generator=generator)) for _ in range(count)
    ]


def dense_delta(layer, with_base=False):
    weight = layer.get_base_layer().weight.detach()
    values = layer.sara_values["default"]
    indices = layer.sara_indices["default"].long()
    base = weight.reshape(-1)[indices].float() if with_base else 0
    flat = torch.zeros(weight.numel()).index_put((indices,), values + base)
    return flat.view(weight.shape[0], -1)


@pytest.mark.parametrize("target", ["delta", "masked_weight"])
def test_nuclear_norm_and_gradient_match_dense_reference(target):
    model = make_model()
    layer = model.base_model.model.lin0
    values = layer.sara_values["default"]
    norm = layer_nuclear_norm(layer, "default", target=target)
    (grad,) = torch.autograd.grad(norm, values)
    reference = torch.linalg.svdvals(dense_delta(layer, with_base=target == "masked_weight")).sum()
    (reference_grad,) = torch.autograd.grad(reference, values)
    torch.testing.assert_close(norm, reference, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad, reference_grad, atol=1e-4, rtol=1e-4)


def test_conv_nuclear_norm_uses_out_by_in_times_kernel_matrix():
    model = make_model()
    layer = model.base_model.model.conv
    norm = layer_nuclear_norm(layer, "default")
    assert dense_delta(layer).shape == (8, 27)
    torch.testing.assert_close(norm, torch.linalg.svdvals(dense_delta(layer)).sum(), atol=1e-4, rtol=1e-5)
    stats = delta_rank_stats(layer, "default")
    assert stats["shape"] == [8, 27] and 0 < stats["effective_rank"] <= 8


def test_randomized_nuclear_norm_is_exact_for_low_rank_updates():
    model = make_model(trainable_fraction=1.0)
    layer = model.base_model.model.lin0
    low_rank = torch.randn(32, 2) @ torch.randn(2, 128)
    with torch.no_grad():
        layer.sara_values["default"].copy_(low_rank.reshape(-1)[layer.sara_indices["default"].long()])
    exact = layer_nuclear_norm(layer, "default", method="svd")
    approximate = layer_nuclear_norm(layer, "default", method="randomized", oversample=8)
    torch.testing.assert_close(approximate, exact, rtol=1e-4, atol=1e-4)


def train(model, steps, lr=1e-2, lambda_rank=None, helper_seed=0, data=None):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    helper = SaRATrainingHelper(model, optimizer, total_steps=steps, seed=helper_seed)
    for x, y in data or batches(steps):
        loss = torch.nn.functional.mse_loss(model(x), y) + helper.regularization()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        helper.step()
    return optimizer, scheduler, helper


def test_low_rank_loss_lowers_the_nuclear_norm_of_the_update():
    norms = []
    for lambda_rank in (0.0, 0.05):
        model = make_model(
            init_weights=True,
            lambda_rank=lambda_rank,
            rank_layers_per_step="all",
            rank_min_dim=4,
            progressive_fraction=None,
        )
        train(model, 30)
        norms.append(
            sum(delta_rank_stats(layer, "default")["nuclear_norm"] for _, layer in model.base_model.sara_layers())
        )
    assert norms[1] < 0.9 * norms[0]


def test_regularizer_samples_the_configured_number_of_layers():
    model = make_model(lambda_rank=1.0, rank_layers_per_step=1, rank_min_dim=4)
    helper = SaRATrainingHelper(model, total_steps=10)
    assert len(helper.rank_layers) == 3
    values = [helper.regularization().item() for _ in range(8)]
    assert len({round(v, 5) for v in values}) > 1  # different layers are drawn
    per_layer = {round(layer_nuclear_norm(layer, "default").item(), 5) for layer in helper.rank_layers}
    assert {round(v, 5) for v in values} <= per_layer
    assert SaRATrainingHelper(make_model(), total_steps=10).regularization().item() == 0.0


def test_reselection_compacts_in_place_keeping_parameters_optimizer_and_adam_moments():
    model = make_model(threshold=0.05, init_weights=True, progressive_fraction=None)
    optimizer, _, helper = train(model, 6, lr=5e-2, data=batches(6))
    layer = model.base_model.model.lin0
    param = layer.sara_values["default"]
    capacity = param.numel()
    param_groups = [list(group["params"]) for group in optimizer.param_groups]
    old_indices = layer.sara_indices["default"].clone()
    old_values = param.detach().clone()
    old_state = {k: v.clone() for k, v in optimizer.state[param].items()}
    current = layer.get_base_layer().weight.reshape(-1)[old_indices.long()] + old_values
    expected_keep = current.abs() < 0.05
    kept = int(expected_keep.sum())
    assert 0 < kept < capacity, "the test needs some entries to leave the band"
    outputs_before = model(batches(1, seed=9)[0][0])

    masks = helper.reselect()
    assert list(masks) == [layer.sara_values["default"] for _, layer in model.base_model.sara_layers()]
    assert torch.equal(masks[param], expected_keep)
    # Same Parameter, same size, same optimizer: nothing to re-wrap.
    assert layer.sara_values["default"] is param and param.numel() == capacity
    assert [list(group["params"]) for group in optimizer.param_groups] == param_groups
    indices, values = layer.trainable_entries("default")
    assert layer.num_trainable("default") == kept == values.numel()
    assert torch.equal(indices, old_indices[expected_keep]) and torch.equal(values, old_values[expected_keep])
    assert torch.equal(layer.sara_frozen_indices["default"], old_indices[~expected_keep])
    assert torch.equal(layer.sara_frozen_values["default"], old_values[~expected_keep])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizer.state[param][key][:kept], old_state[key][expected_keep])
        assert not optimizer.state[param][key][kept:].any()
    assert torch.equal(optimizer.state[param]["step"], old_state["step"])
    assert not param.detach()[kept:].any() and not layer.sara_indices["default"][kept:].any()
    assert torch.equal(model(batches(1, seed=9)[0][0]), outputs_before), "re-selection must not change the model"


def test_bfloat16_reselection_decides_on_the_weight_the_forward_uses():
    # In bfloat16, w + delta is rounded before it is used: an entry whose float32 sum is just inside the cutoff can be
    # outside it as the model sees it. The re-selection reads the same rounded weight a merge writes.
    model = make_model(threshold=0.05, init_weights=True, progressive_fraction=None).to(torch.bfloat16)
    layer = model.base_model.model.lin0
    indices, values = layer.trainable_entries("default")
    base = layer.get_base_layer().weight.detach().reshape(-1)[indices.long()]
    cutoff = layer.cutoff("default")
    # Deltas that bring every entry to just inside the cutoff in float32; bfloat16 rounds some of them out.
    target = torch.sign(base.float() + 1e-12) * (cutoff - 1e-5)
    with torch.no_grad():
        layer.sara_values["default"][: values.numel()] = (target - base.float()).to(values.dtype)
    merged = layer.get_effective_weight(["default"]).reshape(-1)[indices.long()]
    expected = merged.float().abs() <= cutoff
    assert 0 < int(expected.sum()) < expected.numel(), "the test needs rounding to push some entries out"
    assert torch.equal(layer.reselection_mask("default"), expected)


def test_freed_slots_stay_inert_through_training():
    model = make_model(threshold=0.05, init_weights=True, progressive_step=3)
    optimizer, _, helper = train(model, 8, lr=5e-2, data=batches(8))
    assert helper.reselected
    for _, layer in model.base_model.sara_layers():
        param, kept = layer.sara_values["default"], layer.num_trainable("default")
        # Zero value, zero gradient, zero optimizer state after five more AdamW steps (with weight decay).
        assert not param.detach()[kept:].any()
        assert param.grad is None or not param.grad[kept:].any()
        assert all(not state[kept:].any() for state in optimizer.state[param].values() if state.dim())
        # Never written to the weight: the effective weight differs from the base only at stored entries.
        update = layer.get_sparse_update("default")
        assert (
            update.indices.numel() == layer.num_entries("default") == kept + layer.frozen_entries("default")[0].numel()
        )
        changed = (layer.get_effective_weight(["default"]) != layer.get_base_layer().weight).reshape(-1)
        assert set(changed.nonzero().reshape(-1).tolist()) <= set(update.indices.tolist())


def test_pending_gradients_follow_their_entries_through_reselection():
    model = make_model(threshold=0.05, init_weights=True, progressive_fraction=None)
    optimizer, _, helper = train(model, 6, lr=5e-2, data=batches(6))
    x, y = batches(1, seed=5)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()  # accumulated, not yet stepped
    layer = model.base_model.model.lin0
    param = layer.sara_values["default"]
    pending = param.grad.clone()
    keep = helper.reselect()[param]
    kept = int(keep.sum())
    assert 0 < kept < param.numel()
    assert torch.equal(param.grad[:kept], pending[keep]) and not param.grad[kept:].any()


@pytest.mark.parametrize("fraction, cutoff", [(0.1, 0.0), (0.3, 0.01)])
def test_trainable_fraction_keeps_entries_tied_with_the_cutoff(fraction, cutoff):
    model = make_model(trainable_fraction=0.3, init_weights=True)
    layer = model.base_model.model.lin0
    weight = layer.get_base_layer().weight
    with torch.no_grad():  # quantised-looking: 20% zeros, then +-0.01, ...: the selection ends inside a run of ties
        weight.copy_(torch.randint(-2, 3, weight.shape, generator=torch.Generator().manual_seed(0)) * 0.01)
    layer.update_layer("tied", SaRAConfig(target_modules=TARGETS, trainable_fraction=fraction))
    selected = weight.reshape(-1)[layer.sara_indices["tied"].long()]
    assert layer.sara_cutoff["tied"] == selected.abs().max().item() == pytest.approx(cutoff)
    assert layer.reselect("tied").all(), "entries tied with the cutoff have not grown: they stay trainable"


def test_threshold_cutoff_selects_exactly_the_strictly_smaller_magnitudes():
    from peft_sara.tuner.selection import select_trainable_indices, still_ineffective, threshold_cutoff

    threshold = 2e-3
    at = torch.tensor(threshold, dtype=torch.float32)
    edges = torch.stack([at, torch.nextafter(at, torch.tensor(0.0)), torch.nextafter(at, torch.tensor(1.0))])
    weight = torch.cat([torch.randn(4000) * 3e-3, edges, -edges, torch.zeros(3)])
    indices, cutoff = select_trainable_indices(weight, threshold=threshold)
    assert cutoff == threshold_cutoff(threshold) < threshold
    assert torch.equal(indices.long(), torch.nonzero(weight.abs() < threshold).reshape(-1))
    assert torch.equal(still_ineffective(weight, cutoff), weight.abs() < threshold)
    assert select_trainable_indices(weight, threshold=0.0)[0].numel() == 0


def test_selection_is_a_pure_function_of_the_weights():
    # What lets every data-parallel rank select alike without communicating (the helper still broadcasts rank 0's
    # re-selection): same bits in, same selection out, whatever the thread count.
    from peft_sara.tuner.selection import select_trainable_indices

    weight = (torch.randn(257, 129) * 1e-2).to(torch.bfloat16).float()  # many exact ties
    threads = torch.get_num_threads()
    try:
        results = []
        for num_threads in (1, max(2, threads)):
            torch.set_num_threads(num_threads)
            results.append(select_trainable_indices(weight.clone(), trainable_fraction=0.1))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]


def test_state_dict_holds_only_live_entries_and_loads_back_into_the_same_parameters():
    model = make_model(threshold=0.05, init_weights=True, progressive_step=3)
    train(model, 5, lr=5e-2, data=batches(5))
    layer = model.base_model.model.lin0
    kept = layer.num_trainable("default")
    assert kept < layer.sara_values["default"].numel()
    state = model.state_dict()
    prefix = "base_model.model.lin0."
    assert state[prefix + "sara_values.default"].shape == state[prefix + "sara_indices.default"].shape == (kept,)
    fresh = make_model(threshold=0.05, init_weights=True, progressive_step=3)
    fresh_param = fresh.base_model.model.lin0.sara_values["default"]
    fresh.load_state_dict(state)
    fresh_layer = fresh.base_model.model.lin0
    assert fresh_layer.sara_values["default"] is fresh_param and fresh_layer.num_trainable("default") == kept
    x = batches(1, seed=9)[0][0]
    assert torch.equal(fresh(x), model(x))
    for (_, a), (_, b) in zip(model.base_model.sara_layers(), fresh.base_model.sara_layers()):
        for got, expected in zip(a.trainable_entries("default") + a.frozen_entries("default"),
                                 b.trainable_entries("default") + b.frozen_entries("default")):  # fmt: skip
            assert torch.equal(got, expected)


def test_helper_refuses_an_optimizer_that_does_not_hold_the_values():
    model = make_model(threshold=0.05, progressive_step=1)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters() if p.requires_grad]
    helper = SaRATrainingHelper(model, torch.optim.AdamW(copies), total_steps=2)
    counts = [layer.num_trainable("default") for _, layer in model.base_model.sara_layers()]
    with pytest.raises(ValueError, match="not in the optimizer's parameter groups.*DeepSpeed ZeRO"):
        helper.step()
    assert [layer.num_trainable("default") for _, layer in model.base_model.sara_layers()] == counts


def test_progressive_step_defaults_to_half_of_planned_steps():
    model = make_model(threshold=0.05)
    helper = SaRATrainingHelper(model, total_steps=10)
    assert helper.progressive_step == 5
    assert [helper.step() for _ in range(6)] == [False] * 4 + [True, False]
    assert SaRATrainingHelper(make_model(progressive_step=3), total_steps=10).progressive_step == 3


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    steps, split = 8, 5  # the re-selection happens at step 4, before the checkpoint
    config = dict(threshold=0.05, init_weights=True, lambda_rank=0.01, rank_min_dim=4)
    data = batches(steps)

    reference = make_model(**config)
    train(reference, steps, lr=5e-2, data=data)

    def run(model, optimizer, scheduler, helper, chunk):
        for x, y in chunk:
            loss = torch.nn.functional.mse_loss(model(x), y) + helper.regularization()
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            helper.step()

    def build(model):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=1e-2)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return optimizer, scheduler, SaRATrainingHelper(model, optimizer, total_steps=steps)

    first = make_model(**config)
    optimizer, scheduler, helper = build(first)
    run(first, optimizer, scheduler, helper, data[:split])
    assert helper.reselected
    save_training_state(tmp_path, first, optimizer, scheduler, helper)

    resumed = make_model(**config)  # a fresh process would rebuild exactly this
    optimizer, scheduler, helper = build(resumed)
    load_training_state(tmp_path, resumed, optimizer, scheduler, helper)
    run(resumed, optimizer, scheduler, helper, data[split:])

    for (_, a), (_, b) in zip(reference.base_model.sara_layers(), resumed.base_model.sara_layers()):
        assert torch.equal(a.sara_indices["default"], b.sara_indices["default"])
        assert torch.equal(a.sara_values["default"], b.sara_values["default"])
        assert torch.equal(a.sara_frozen_values["default"], b.sara_frozen_values["default"])


def test_paper_learning_rate():
    assert paper_learning_rate(2e-3) == pytest.approx(4.966e-4, rel=1e-3)


def test_adapter_strength_and_combination(tmp_path):
    model = make_model()
    x = batches(1)[0][0]
    with model.disable_adapter():
        base_out = model(x)
    full_out = model(x)
    set_adapter_strength(model, 0.0)
    assert torch.equal(model(x), base_out)
    set_adapter_strength(model, 1.0)
    assert torch.equal(model(x), full_out)

    model.add_adapter("b", SaRAConfig(target_modules=["lin0", "lin1"], trainable_fraction=0.2, init_weights=False))
    combine_adapters(model, ["default", "b"], [0.5, 0.25], "mix")
    for _, layer in model.base_model.sara_layers():
        expected = 0.5 * layer.get_delta_weight("default").float()
        if "b" in layer.sara_values:
            expected += 0.25 * layer.get_delta_weight("b").float()
        torch.testing.assert_close(layer.get_delta_weight("mix").float(), expected, atol=1e-7, rtol=1e-6)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    from peft import PeftModel

    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(MLPConv(), tmp_path / "mix")
    model.set_adapter("mix")
    assert torch.equal(reloaded(x), model(x))


def test_accelerate_loop_trains_a_tiny_unet():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = get_peft_model(tiny_unet(), SaRAConfig(trainable_fraction=0.05, lambda_rank=1e-3, rank_min_dim=16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    helper = SaRATrainingHelper(accelerator.unwrap_model(model), optimizer, total_steps=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(4):
        inputs = unet_inputs(batch=1, seed=step)
        loss = model(**inputs).sample.pow(2).mean() + helper.regularization()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        helper.step()
    assert helper.reselected and helper.last_regularization > 0
    after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(before[n][:1], after[n][:1]) for n in after if after[n].numel())


def test_trainer_callback_runs_real_steps_on_a_tiny_unet(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from peft_sara.training import SaRATrainerCallback

    class Noise(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            inputs = unet_inputs(batch=1, seed=index)
            return {key: value[0] for key, value in inputs.items()}

    class DenoisingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            return model(**inputs).sample.pow(2).mean()

    model = get_peft_model(tiny_unet(), SaRAConfig(trainable_fraction=0.05, lambda_rank=1e-3, rank_min_dim=16))
    callback = SaRATrainerCallback()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=1,
        max_steps=2,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,
    )
    trainer = DenoisingTrainer(model=model, args=args, train_dataset=Noise(), callbacks=[callback])
    before = model.get_nb_trainable_parameters()[0]
    trainer.train()
    assert callback.helper.global_step == 2 and callback.helper.reselected
    assert model.get_nb_trainable_parameters()[0] <= before
    assert callback.helper.last_regularization > 0


def test_training_state_round_trip_on_a_diffusers_model_with_an_injected_adapter(tmp_path):
    from peft import PeftModel

    unet = tiny_unet()
    unet.add_adapter(SaRAConfig(trainable_fraction=0.05, init_weights=False, progressive_step=1))
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    helper = SaRATrainingHelper(unet, optimizer, total_steps=2)
    unet(**unet_inputs(batch=1)).sample.pow(2).mean().backward()
    optimizer.step()
    helper.step()  # re-selects: trainable sets shrink
    save_training_state(tmp_path, unet, optimizer, helper=helper)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()

    fresh = tiny_unet()
    fresh.add_adapter(SaRAConfig(trainable_fraction=0.05, progressive_step=1))
    fresh_optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    fresh_helper = SaRATrainingHelper(fresh, fresh_optimizer, total_steps=2)
    load_training_state(tmp_path, fresh, fresh_optimizer, helper=fresh_helper)
    assert fresh_helper.reselected and fresh_helper.global_step == 1
    assert torch.equal(fresh(**unet_inputs()).sample, unet(**unet_inputs()).sample)
    # The same files load into a PeftModel, although their keys lack PEFT's "base_model.model." prefix.
    as_peft_model = PeftModel.from_pretrained(tiny_unet(), tmp_path)
    assert torch.equal(as_peft_model(**unet_inputs()).sample, unet(**unet_inputs()).sample)


def test_reselection_refuses_optimizer_state_it_cannot_reindex_before_changing_anything():
    model = make_model(threshold=0.05, progressive_step=1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    param = model.base_model.model.lin1.sara_values["default"]
    optimizer.state[param] = {"step": torch.tensor(3.0), "blockwise_scale": torch.ones(2)}
    helper = SaRATrainingHelper(model, optimizer, total_steps=2)
    with pytest.raises(ValueError, match="Cannot re-order optimizer state 'blockwise_scale' of shape \\(2,\\)"):
        helper.reselect()
    assert not helper.reselected and model.base_model.model.lin1.frozen_entries("default")[0].numel() == 0


def test_helper_warns_when_no_layer_qualifies_for_the_low_rank_loss():
    with pytest.warns(UserWarning, match="no SaRA layer qualifies for the low-rank loss"):
        SaRATrainingHelper(make_model(lambda_rank=1e-3, rank_min_dim=1000), total_steps=4)


def test_compiled_model_follows_reselection_without_recompiling_by_hand():
    model = make_model(threshold=0.05, init_weights=True, progressive_step=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    helper = SaRATrainingHelper(model, optimizer, total_steps=4)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for x, y in batches(4):
        out = compiled(x)
        assert torch.equal(out, model(x))
        torch.nn.functional.mse_loss(out, y).backward()
        optimizer.step()
        optimizer.zero_grad()
        helper.step()
    assert helper.reselected
    compiled(batches(1, seed=7)[0][0]).sum().backward()
    for _, layer in model.base_model.sara_layers():
        kept = layer.num_trainable("default")
        assert not layer.sara_values["default"].grad[kept:].any()
