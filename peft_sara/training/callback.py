"""``SaRATrainerCallback``: SaRA's low-rank loss and progressive re-selection inside a ``transformers.Trainer``."""

from __future__ import annotations

from transformers import TrainerCallback

from .helper import SaRATrainingHelper


class SaRATrainerCallback(TrainerCallback):
    """Runs SaRA's training logic inside a ``transformers.Trainer``.

    Just before each optimizer step it adds the gradient of the low-rank loss to the SaRA values (once per optimizer
    step, whatever the gradient accumulation), and after each step it performs the progressive re-selection on the
    Trainer's own optimizer. The regulariser's value is added to the Trainer's logs as ``sara_rank_loss``.
    """

    def __init__(self, adapter_name: str | None = None, seed: int = 0) -> None:
        self.adapter_name = adapter_name
        self.seed = seed
        self.helper: SaRATrainingHelper | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.helper = SaRATrainingHelper(
            model, optimizer, total_steps=state.max_steps, adapter_name=self.adapter_name, seed=self.seed
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
