"""Training SaRA the paper's way: low-rank loss, progressive re-selection, optimizer consistency, exact resume.

One object, :class:`SaRATrainingHelper`, hooks into any loop::

    helper = SaRATrainingHelper(model, optimizer, total_steps=max_steps)
    for batch in loader:
        loss = compute_loss(model, batch) + helper.regularization()
        loss.backward()
        optimizer.step(); lr_scheduler.step(); optimizer.zero_grad()
        helper.step()          # re-selects at the progressive step and keeps the optimizer consistent

``helper.py`` (the helper, the paper's learning rate), ``optimizer.py`` (re-ordering optimizer state in place at
re-selection), ``checkpoint.py`` (bitwise resume), ``callback.py`` (transformers ``Trainer``).
"""

from ..layer import sara_layers
from .callback import SaRATrainerCallback
from .checkpoint import TRAINING_STATE_NAME, load_training_state, save_training_state
from .helper import SaRATrainingHelper, paper_learning_rate, resolve_sara_adapter
from .optimizer import compact_optimizer_state, unwrap_optimizer

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
]
