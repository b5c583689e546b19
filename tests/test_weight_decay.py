"""The helper's weight decay: ``weight_decay_mode="official"`` trains to the weights of a plain-PyTorch transcription
of the official SaRA optimizer (sjtuplayer/SaRA ``optim/adamw2.py``: decay the whole weight, Adam-update it, put the
unselected entries back), with progressive re-selection; ``"delta"`` equals AdamW's own weight decay over the deltas;
the two differ; double decay and a re-selection that would leave nothing to train are refused before anything
changes."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_sara import SaRAConfig, sara_layers
from peft_sara.training import SaRATrainingHelper

pytestmark = pytest.mark.usefixtures("one_thread")

LR, WD, BETAS, EPS = 1e-2, 0.5, (0.9, 0.999), 1e-8
STEPS, RESELECT_AT = 16, 8
TARGETS = ["0", "2"]


def base_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 6)).double()


def batches():
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(16, 12, generator=generator, dtype=torch.float64),
            torch.randn(16, 6, generator=generator, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def train_sara(mode, helper_decay, optimizer_decay, reselect=True):
    config = SaRAConfig(
        target_modules=TARGETS, trainable_fraction=0.3, progressive_step=RESELECT_AT if reselect else None
    )
    model = get_peft_model(base_model(), config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=optimizer_decay)
    helper = SaRATrainingHelper(model, optimizer, weight_decay=helper_decay, weight_decay_mode=mode)
    for x, y in batches():
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        helper.step()
    layers = dict(sara_layers(model))
    return model, {name.split(".")[-1]: layer for name, layer in layers.items()}


def official_reference(model, reselect=True):
    """AdamW2's step on the whole weight ``w`` of each adapted layer, with its selection masks (no SaRA code)."""
    reference = base_model()
    _, layers = model, {name.split(".")[-1]: layer for name, layer in sara_layers(model)}
    weights = {name: reference[int(name)].weight for name in TARGETS}
    masks, cutoffs = {}, {}
    for name in TARGETS:
        layer = layers[name]
        indices, _ = layer.trainable_entries("default")
        frozen, _ = layer.frozen_entries("default")
        mask = torch.zeros(weights[name].numel(), dtype=torch.float64)
        mask[torch.cat([indices, frozen]).long()] = 1  # every entry selected at the start
        masks[name] = mask.reshape(weights[name].shape)
        cutoffs[name] = layer.sara_cutoff["default"]
    for p in reference.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    state = {name: (torch.zeros_like(w), torch.zeros_like(w)) for name, w in weights.items()}
    for step, (x, y) in enumerate(batches(), start=1):
        if reselect and step == RESELECT_AT + 1:  # `update_mask`: keep the entries still within the cutoff
            with torch.no_grad():
                for name, w in weights.items():
                    masks[name] = masks[name] * (w.abs().float() <= cutoffs[name]).double()
        nn.functional.mse_loss(reference(x), y).backward()
        with torch.no_grad():
            for name, w in weights.items():
                mask, (m, v) = masks[name], state[name]
                original = w.clone()
                grad = w.grad
                w.mul_(1 - LR * WD)
                m.mul_(BETAS[0]).add_(grad, alpha=1 - BETAS[0])
                v.mul_(BETAS[1]).addcmul_(grad, grad, value=1 - BETAS[1])
                bias1, bias2 = 1 - BETAS[0] ** step, 1 - BETAS[1] ** step
                w.addcdiv_(m, (v.sqrt() / math.sqrt(bias2)).add_(EPS), value=-LR / bias1)
                w.mul_(mask).add_(original * (1 - mask))
                w.grad = None
    return {name: w.detach() for name, w in weights.items()}


def effective(layers):
    return {name: layer.get_effective_weight(["default"]) for name, layer in layers.items()}


@pytest.mark.parametrize("reselect", [False, True], ids=["plain", "progressive"])
def test_official_mode_matches_the_official_optimizer(reselect):
    model, layers = train_sara("official", WD, 0.0, reselect)
    if reselect:
        assert any(layer.frozen_entries("default")[0].numel() for layer in layers.values())  # re-selection happened
    expected = official_reference(model, reselect)
    got = effective(layers)
    base = base_model()
    for name in TARGETS:
        update = (expected[name] - base[int(name)].weight.detach()).abs().max()
        assert update > 1e-3
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-9 * float(update))


def test_delta_mode_is_adamw_weight_decay_and_differs_from_official():
    _, by_helper = train_sara("delta", WD, 0.0)
    _, by_adamw = train_sara("delta", 0.0, WD)
    _, official = train_sara("official", WD, 0.0)
    for name in TARGETS:
        torch.testing.assert_close(
            by_helper[name].get_effective_weight(["default"]),
            by_adamw[name].get_effective_weight(["default"]),
            rtol=0,
            atol=1e-12,
        )
        gap = by_helper[name].get_effective_weight(["default"]) - official[name].get_effective_weight(["default"])
        assert gap.abs().max() > 1e-4  # the two rules are not the same training


def test_double_decay_and_a_mode_without_decay_are_refused():
    model = get_peft_model(base_model(), SaRAConfig(target_modules=TARGETS, trainable_fraction=0.3))
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="two decays would apply"):
        SaRATrainingHelper(model, torch.optim.AdamW(params, weight_decay=1e-2), weight_decay=1e-2)
    with pytest.raises(ValueError, match="official.*optimizer's own weight_decay=0.01.*Pass weight_decay=0.01"):
        SaRATrainingHelper(model, torch.optim.AdamW(params, weight_decay=1e-2), weight_decay_mode="official")
    with pytest.raises(ValueError, match="weight_decay_mode"):
        SaRATrainingHelper(model, torch.optim.AdamW(params, weight_decay=0), weight_decay=1e-2, weight_decay_mode="w")
    with pytest.raises(ValueError, match="pass the optimizer"):
        SaRATrainingHelper(model, None, weight_decay=1e-2)
    optimizer = torch.optim.AdamW(params, weight_decay=0)
    first = SaRATrainingHelper(model, optimizer, weight_decay=1e-2)
    with pytest.raises(ValueError, match="Another SaRATrainingHelper already applies weight decay"):
        SaRATrainingHelper(model, optimizer, weight_decay=1e-2, weight_decay_mode="official")
    first.weight_decay.remove()
    SaRATrainingHelper(model, optimizer, weight_decay=1e-2)  # one decay again


def test_reselection_that_would_freeze_everything_is_refused_before_it_happens():
    model = get_peft_model(base_model(), SaRAConfig(target_modules=TARGETS, trainable_fraction=0.3, progressive_step=1))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    helper = SaRATrainingHelper(model, optimizer)
    with torch.no_grad():
        for _, layer in sara_layers(model):
            layer.sara_values["default"].fill_(10.0)  # every entry far past its cutoff
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="would freeze all .* trainable entries.*Nothing was changed"):
        helper.step()
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_trainer_callback_official_mode_moves_the_trainers_decay_to_the_selected_weights(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from peft_sara.training import SaRATrainerCallback

    class Pairs(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            x, y = batches()[index]
            return {"x": x[0], "y": y[0]}

    class SquareTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            return nn.functional.mse_loss(model(inputs["x"]), inputs["y"])

    trained = {}
    for mode in ("delta", "official"):
        model = get_peft_model(base_model(), SaRAConfig(target_modules=TARGETS, trainable_fraction=0.3))
        callback = SaRATrainerCallback(weight_decay_mode=mode)
        args = TrainingArguments(
            output_dir=str(tmp_path / mode),
            per_device_train_batch_size=1,
            max_steps=3,
            learning_rate=LR,
            weight_decay=WD,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            remove_unused_columns=False,
        )
        trainer = SquareTrainer(model=model, args=args, train_dataset=Pairs(), callbacks=[callback])
        trainer.train()
        groups = trainer.optimizer.param_groups
        values = {layer.sara_values["default"] for _, layer in sara_layers(model)}
        decays = {group["weight_decay"] for group in groups if any(p in values for p in group["params"])}
        if mode == "official":
            assert decays == {0.0} and callback.helper.weight_decay.weight_decay == WD
        else:
            assert decays == {WD} and callback.helper.weight_decay is None
        trained[mode] = {name: layer.get_effective_weight(["default"]) for name, layer in sara_layers(model)}
    assert any((trained["delta"][k] - trained["official"][k]).abs().max() > 1e-5 for k in trained["delta"])
