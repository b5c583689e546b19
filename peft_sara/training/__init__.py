"""Training SaRA the paper's way: low-rank loss, progressive re-selection, optimizer consistency, exact resume.

One object, :class:`SaRATrainingHelper`, hooks into any loop::

    helper = SaRATrainingHelper(model, optimizer, total_steps=max_steps)
    for batch in loader:
        loss = compute_loss(model, batch) + helper.regularization()
        loss.backward()
        optimizer.step(); lr_scheduler.step(); optimizer.zero_grad()
        helper.step()          # re-selects at the progressive step and keeps the optimizer consistent

Training the components of a diffusers pipeline (as ``examples/train_*_sara.py`` do), the loop stays yours::

    params = add_sara_adapter(pipe.unet, config, gradient_checkpointing=True)    # in place, float32 values
    optimizer = torch.optim.AdamW(params, lr=paper_learning_rate(config.threshold))
    unet = TrainedComponent("unet", pipe.unet, optimizer, lr_scheduler, SaRATrainingHelper(pipe.unet, optimizer))
    resume_from_checkpoint(latest_checkpoint(output_dir), [unet])                 # if there is one
    ...                                                                          # the loop, as above
    save_training_checkpoint(checkpoint_folder(output_dir, step), [unet])        # every N steps
    save_trained_adapter(pipe, output_dir, ["unet"], export_lora_rank=8)         # PEFT folders + a LoRA

Weight decay: ``AdamW(weight_decay=wd)`` decays the trained deltas toward 0, i.e. the update toward the pre-trained
weight (the default, as for any PEFT adapter). The official SaRA code decays the selected *weights* toward 0 instead:
``SaRATrainingHelper(model, optimizer, weight_decay=wd, weight_decay_mode="official")`` with ``AdamW(weight_decay=0)``
(``weight_decay.py``).

``helper.py`` (the helper, the paper's learning rate), ``optimizer.py`` (re-ordering optimizer state in place at
re-selection), ``checkpoint.py`` (one component's bitwise resume), ``components.py`` (adapters on pipeline
components), ``checkpoint_folders.py`` (a run's ``checkpoint-<step>/`` folders), ``outputs.py`` (saving and exporting
at the end), ``callback.py`` (transformers ``Trainer``).
"""

from ..tuner.layer import sara_layers
from .callback import SaRATrainerCallback
from .checkpoint import TRAINING_STATE_NAME, load_training_state, save_training_state
from .checkpoint_folders import (
    CHECKPOINT_PREFIX,
    checkpoint_folder,
    checkpoint_steps,
    latest_checkpoint,
    remove_old_checkpoints,
    resume_from_checkpoint,
    save_training_checkpoint,
)
from .components import DEFAULT_ADAPTER_NAME, TrainedComponent, add_sara_adapter
from .helper import SaRATrainingHelper, paper_learning_rate, resolve_sara_adapter
from .optimizer import compact_optimizer_state, unwrap_optimizer
from .outputs import recorded_base_model, save_trained_adapter

__all__ = [
    "SaRATrainingHelper",
    "SaRATrainerCallback",
    "paper_learning_rate",
    "save_training_state",
    "load_training_state",
    "compact_optimizer_state",
    "unwrap_optimizer",
    "resolve_sara_adapter",
    "sara_layers",
    "TRAINING_STATE_NAME",
    "add_sara_adapter",
    "TrainedComponent",
    "DEFAULT_ADAPTER_NAME",
    "save_training_checkpoint",
    "resume_from_checkpoint",
    "checkpoint_folder",
    "checkpoint_steps",
    "latest_checkpoint",
    "remove_old_checkpoints",
    "CHECKPOINT_PREFIX",
    "save_trained_adapter",
    "recorded_base_model",
]
