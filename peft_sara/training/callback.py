"""``SaRATrainerCallback``: SaRA's low-rank loss and progressive re-selection inside a ``transformers.Trainer``."""

from __future__ import annotations

from transformers import TrainerCallback

from ..tuner.layer import sara_layers
from .helper import SaRATrainingHelper, resolve_sara_adapter
from .optimizer import unwrap_optimizer
from .weight_decay import WeightDecayMode


class SaRATrainerCallback(TrainerCallback):
    """Runs SaRA's training logic inside a ``transformers.Trainer``.

    Just before each optimizer step it adds the gradient of the low-rank loss to the SaRA values (once per optimizer
    step, whatever the gradient accumulation), and after each step it performs the progressive re-selection on the
    Trainer's own optimizer. The regulariser's value is added to the Trainer's logs as ``sara_rank_loss``.

    ``weight_decay_mode``: what ``TrainingArguments.weight_decay`` decays. ``"delta"`` (default): the Trainer's AdamW
    decays the SaRA deltas, the update toward the pre-trained weight. ``"official"``: the selected weights toward 0, as
    the official SaRA code does; the callback then takes the decay off the optimizer's parameter groups that hold SaRA
    values (other parameters in those groups lose it too) and applies it itself (see
    :mod:`peft_sara.training.weight_decay`).
    """

    def __init__(self, adapter_name: str | None = None, seed: int = 0, weight_decay_mode: WeightDecayMode = "delta"):
        self.adapter_name = adapter_name
        self.seed = seed
        self.weight_decay_mode = weight_decay_mode
        self.helper: SaRATrainingHelper | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        weight_decay = 0.0
        if self.weight_decay_mode == "official" and optimizer is not None:
            name, _ = resolve_sara_adapter(model, self.adapter_name)
            values = {layer.sara_values[name] for _, layer in sara_layers(model) if name in layer.sara_values}
            for group in unwrap_optimizer(optimizer).param_groups:
                if group.get("weight_decay", 0) and any(param in values for param in group["params"]):
                    weight_decay = group["weight_decay"]
                    group["weight_decay"] = 0.0
        self.helper = SaRATrainingHelper(
            model,
            optimizer,
            total_steps=state.max_steps,
            adapter_name=self.adapter_name,
            seed=self.seed,
            weight_decay=weight_decay,
            weight_decay_mode=self.weight_decay_mode,
        )
        self.helper.global_step = state.global_step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        regularization = self.helper.regularization()
        if regularization.requires_grad:
            regularization.backward()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self.helper.optimizer = optimizer
        self.helper.step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.helper is not None:
            logs["sara_rank_loss"] = self.helper.last_regularization
            logs["sara_trainable"] = self.helper.trainable_count()


__all__ = ["SaRATrainerCallback"]
