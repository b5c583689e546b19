"""Fine-tuning the pretrained base to the new style, with SaRA and (for comparison) PEFT LoRA.

Both methods run through the same loop with the same batches, noise, timesteps, schedule and seed; only the
adapter, its learning rate and SaRA's training helper differ.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from ..training import SaRATrainingHelper, sara_layers
from ..tuner.config import SaRAConfig
from .diffusion import BatchSampler, diffusion_loss, predict_noise, recent_mean

WEIGHT_DECAY = 1e-2  # AdamW's decay of the trained parameters (SaRA's deltas), the same for both methods


def make_sara_model(base: UNet2DModel, trainable_fraction: float, lambda_rank: float, rank_min_dim: int) -> PeftModel:
    """A copy of ``base`` with a SaRA adapter on diffusers' default UNet targets (``target_modules=None``)."""
    config = SaRAConfig(
        trainable_fraction=trainable_fraction,
        lambda_rank=lambda_rank,
        rank_min_dim=rank_min_dim,
        progressive_fraction=0.5,
    )
    return get_peft_model(copy.deepcopy(base), config)


def adapted_module_names(model: PeftModel) -> list[str]:
    """Dotted names (relative to the UNet) of the modules carrying a SaRA layer."""
    return sorted(name for name, _ in sara_layers(model.get_base_model()))


def selection_summary(model: PeftModel) -> dict:
    """How SaRA's selection came out: per-layer |w| cutoffs and the number of selected entries."""
    cutoffs, selected, targeted = [], 0, 0
    for _, layer in sara_layers(model.get_base_model()):
        cutoffs.append(layer.sara_cutoff["default"])
        selected += layer.num_trainable("default")
        targeted += layer.get_base_layer().weight.numel()
    cutoffs.sort()
    return {
        "rule": model.peft_config["default"].selection_rule,
        "layers": len(cutoffs),
        "targeted_weights": targeted,
        "selected_entries": selected,
        "cutoff_min": cutoffs[0],
        "cutoff_median": cutoffs[len(cutoffs) // 2],
        "cutoff_max": cutoffs[-1],
    }


def make_lora_model(base: UNet2DModel, target_names: list[str], parameter_budget: int, seed: int) -> PeftModel:
    """A copy of ``base`` with a LoRA adapter on exactly ``target_names``, at the rank whose trainable-parameter
    count is closest to ``parameter_budget`` (LoRA's count grows linearly with the rank)."""
    per_rank, _ = get_peft_model(copy.deepcopy(base), _lora_config(target_names, 1)).get_nb_trainable_parameters()
    rank = max(1, round(parameter_budget / per_rank))
    torch.manual_seed(seed)  # LoRA draws its A matrices from the global generator
    return get_peft_model(copy.deepcopy(base), _lora_config(target_names, rank))


def _lora_config(target_names: list[str], rank: int) -> LoraConfig:
    # alpha = rank keeps the LoRA scale at 1, so the learning rate alone sets the step size
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_names), init_lora_weights=True)


@dataclass
class FinetuneHistory:
    """What one fine-tuning run did."""

    losses: list[float] = field(default_factory=list)  # diffusion loss per step (without the low-rank term)
    rank_losses: list[float] = field(default_factory=list)  # SaRA's low-rank loss per step (0 for LoRA)
    reselected_at_step: int | None = None
    trainable_after_reselection: int | None = None
    seconds: float = 0.0
    # (step, held-out losses) at each checkpoint: the training trajectory the trade-off plot draws
    checkpoints: list[tuple[int, dict[str, float]]] = field(default_factory=list)


def finetune(
    model: PeftModel,
    noise_scheduler: DDPMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    description: str,
    use_sara_helper: bool,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    checkpoint_steps: Sequence[int] = (),
    progress_bar: bool = True,
    evaluate_start: bool = True,
) -> FinetuneHistory:
    """Train ``model``'s trainable parameters on (images, labels); with ``use_sara_helper`` the SaRA training helper
    adds the low-rank loss and performs the progressive re-selection (it keeps the optimizer in step).

    ``evaluate(model)`` runs before training (step 0, unless ``evaluate_start`` is False) and after each of
    ``checkpoint_steps``; its results are recorded in ``history.checkpoints`` (its time is not counted in
    ``history.seconds``).
    """
    history = FinetuneHistory()
    evaluation_seconds = 0.0

    def checkpoint(step: int) -> None:
        nonlocal evaluation_seconds
        started = time.perf_counter()
        history.checkpoints.append((step, evaluate(model)))
        model.train()
        evaluation_seconds += time.perf_counter() - started

    if evaluate is not None and evaluate_start:
        checkpoint(0)
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=WEIGHT_DECAY)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    helper = SaRATrainingHelper(model, optimizer, total_steps=steps, seed=seed) if use_sara_helper else None
    batches = BatchSampler(images, labels, batch_size, seed)
    model.train()
    start = time.perf_counter()
    progress = tqdm(range(steps), desc=description, unit="step", dynamic_ncols=True, disable=not progress_bar)
    for step in progress:
        loss = diffusion_loss(model, noise_scheduler, *batches.next())
        rank_loss = helper.regularization() if helper is not None else torch.zeros(())
        (loss + rank_loss).backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.losses.append(loss.item())
        history.rank_losses.append(rank_loss.item())
        if helper is not None and helper.step():
            history.reselected_at_step = step + 1
            history.trainable_after_reselection = helper.trainable_count()
            if progress_bar:
                progress.write(
                    f"  progressive re-selection at step {step + 1}: {history.trainable_after_reselection:,} "
                    "entries still below their cutoff stay trainable, the rest are frozen at their learned values"
                )
        progress.set_postfix(loss=f"{recent_mean(history.losses):.4f}")
        if evaluate is not None and step + 1 in checkpoint_steps:
            checkpoint(step + 1)
    history.seconds = time.perf_counter() - start - evaluation_seconds
    model.eval()
    return history


@torch.no_grad()
def reload_max_difference(trained: PeftModel, base: UNet2DModel, adapter_dir: Path, seed: int) -> float:
    """Load ``adapter_dir`` into a fresh copy of ``base`` with ``PeftModel.from_pretrained`` and return the largest
    absolute difference between its noise prediction and ``trained``'s on a fixed batch."""
    fresh = UNet2DModel.from_config(base.config)
    fresh.load_state_dict(base.state_dict())
    reloaded = PeftModel.from_pretrained(fresh, adapter_dir).eval()
    generator = torch.Generator().manual_seed(seed)
    size, channels, classes = base.config.sample_size, base.config.in_channels, base.config.num_class_embeds
    noisy = torch.randn((10, channels, size, size), generator=generator)
    timesteps = torch.linspace(0, 999, 10).long()
    labels = torch.arange(10) % classes
    expected = predict_noise(trained.eval(), noisy, timesteps, labels)
    return float((predict_noise(reloaded, noisy, timesteps, labels) - expected).abs().max())
