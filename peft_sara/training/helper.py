"""``SaRATrainingHelper``: step counting, the low-rank loss and progressive re-selection for any training loop.

The helper never changes a learning rate; :func:`paper_learning_rate` gives the paper's fitted default.
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from ..tuner.config import SaRAConfig
from ..tuner.layer import sara_layers
from ..tuner.regularizers import layer_nuclear_norm, qualifies_for_rank_loss, sample_layers
from .optimizer import check_optimizer_state_can_follow, compact_optimizer_state, unwrap_optimizer
from .weight_decay import SparseWeightDecay, WeightDecayMode


def paper_learning_rate(threshold: float) -> float:
    """The paper's fitted learning rate for a threshold: ``1e-3 * exp(-350 * threshold)`` (4.97e-4 at 2e-3)."""
    return 1e-3 * math.exp(-350.0 * threshold)


def resolve_sara_adapter(model: nn.Module, adapter_name: str | None) -> tuple[str, SaRAConfig]:
    """The SaRA adapter to train (``adapter_name``, or the model's active one) and its config; clear errors otherwise."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        raise ValueError("The model carries no PEFT config: wrap it with get_peft_model or add_adapter first.")
    if adapter_name is None:
        active = getattr(model, "active_adapter", None)
        adapter_name = active if isinstance(active, str) and active in configs else next(iter(configs))
    if adapter_name not in configs:
        raise ValueError(f"Adapter '{adapter_name}' not found; available: {sorted(configs)}.")
    config = configs[adapter_name]
    if not isinstance(config, SaRAConfig):
        raise ValueError(f"Adapter '{adapter_name}' is a {type(config).__name__}, not a SaRAConfig.")
    return adapter_name, config


class SaRATrainingHelper:
    """Owns SaRA's per-step training logic: step counting, low-rank loss sampling and progressive re-selection.

    Args:
        model: a PeftModel (or a diffusers/transformers model with a SaRA adapter added in place).
        optimizer: the optimizer over the SaRA values (plain, or wrapped by accelerate); re-selection re-orders its
            per-entry state in place. May be None if you manage optimizer state yourself (then use the masks
            returned by :meth:`reselect`).
        total_steps: planned optimizer steps; with ``progressive_fraction`` it sets the re-selection step.
        adapter_name: the SaRA adapter to train (default: the active one).
        seed: seed of the generator that samples layers for the low-rank loss.
        weight_decay: decoupled weight decay the helper applies to the trainable entries with every optimizer step
            (before the optimizer's update, at its group's current learning rate). Build the optimizer with
            ``weight_decay=0`` then: the helper refuses an optimizer that decays the SaRA values too.
        weight_decay_mode: ``"delta"`` (default): ``delta <- delta - lr * wd * delta``, the update decays toward the
            pre-trained weight, as ``AdamW(weight_decay=wd)`` decays any PEFT adapter. ``"official"``: ``w <- w - lr *
            wd * w`` on the selected entries, the selected weights decay toward 0, as the official SaRA code
            (``optim/adamw2.py``) and pytorch-optimizer's port do. See :mod:`peft_sara.training.weight_decay`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        total_steps: int | None = None,
        adapter_name: str | None = None,
        seed: int = 0,
        weight_decay: float = 0.0,
        weight_decay_mode: WeightDecayMode = "delta",
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.adapter_name, self.config = resolve_sara_adapter(model, adapter_name)
        self.total_steps = total_steps
        self.progressive_step = self._progressive_step()
        self.global_step = 0
        self.reselected = False
        self.generator = torch.Generator().manual_seed(seed)
        self.last_regularization: float = 0.0
        self.rank_layers = [
            layer
            for name, layer in sara_layers(model)
            if self.adapter_name in layer.sara_values
            and qualifies_for_rank_loss(layer, self.config.rank_min_dim)
            and self._matches_rank_targets(name)
        ]
        if self.config.lambda_rank > 0 and not self.rank_layers:
            warnings.warn(
                f"lambda_rank={self.config.lambda_rank} but no SaRA layer qualifies for the low-rank loss "
                f"(both matrix dimensions > rank_min_dim={self.config.rank_min_dim}"
                + (", and matching rank_target_modules" if self.config.rank_target_modules is not None else "")
                + "): the loss is 0. Lower `rank_min_dim` for small models.",
                stacklevel=2,
            )
        self.weight_decay = self._weight_decay(weight_decay, weight_decay_mode)

    def _weight_decay(self, weight_decay: float, mode: WeightDecayMode) -> SparseWeightDecay | None:
        layers = [(name, layer) for name, layer in sara_layers(self.model) if self.adapter_name in layer.sara_values]
        if weight_decay:
            return SparseWeightDecay(layers, self.adapter_name, self.optimizer, weight_decay, mode)
        if mode == "official" and self.optimizer is not None:
            params = {layer.sara_values[self.adapter_name] for _, layer in layers}
            for group in unwrap_optimizer(self.optimizer).param_groups:
                if group.get("weight_decay", 0) and any(param in params for param in group["params"]):
                    raise ValueError(
                        f"weight_decay_mode='official' asks for the official rule, but the optimizer's own "
                        f"weight_decay={group['weight_decay']} decays the SaRA deltas (the 'delta' rule). Pass "
                        f"weight_decay={group['weight_decay']} to the helper and weight_decay=0 to the optimizer."
                    )
        return None

    def _progressive_step(self) -> int | None:
        if self.config.progressive_step is not None:
            return self.config.progressive_step
        if self.config.progressive_fraction is None or self.total_steps is None:
            return None
        return max(1, round(self.config.progressive_fraction * self.total_steps))

    def _matches_rank_targets(self, name: str) -> bool:
        targets = self.config.rank_target_modules
        if targets is None:
            return True
        # PEFT's own module matching (exact name, dotted suffix, or full-match regex), on a config holding only the
        # low-rank targets. Layer names inside a PeftModel carry its "base_model.model." prefix, as PEFT expects.
        rank_targets = SimpleNamespace(
            target_modules=targets,
            exclude_modules=None,
            modules_to_save=None,
            target_parameters=None,
            layers_to_transform=None,
            layers_pattern=None,
        )
        return bool(check_target_module_exists(rank_targets, name))

    def regularization(self) -> torch.Tensor:
        """``lambda_rank * sum ||Delta_W||_*`` over this step's sampled layers (a differentiable scalar)."""
        device = next((layer.sara_values[self.adapter_name].device for layer in self.rank_layers), torch.device("cpu"))
        if self.config.lambda_rank == 0 or not self.rank_layers:
            self.last_regularization = 0.0
            return torch.zeros((), device=device)
        count = None if self.config.rank_layers_per_step == "all" else self.config.rank_layers_per_step
        chosen = sample_layers(self.rank_layers, count, self.generator)
        total = sum(
            layer_nuclear_norm(
                layer, self.adapter_name, self.config.rank_method, self.config.rank_oversample, self.config.rank_target
            )
            for layer in chosen
        )
        loss = self.config.lambda_rank * total
        self.last_regularization = float(loss.detach())
        return loss

    def step(self) -> bool:
        """Advance one optimizer step; returns True when this step performed the progressive re-selection."""
        self.global_step += 1
        if self.progressive_step is not None and not self.reselected and self.global_step >= self.progressive_step:
            self.reselect()
            return True
        return False

    def reselection_due(self) -> bool:
        """Whether the next :meth:`step` performs the progressive re-selection."""
        return (
            self.progressive_step is not None and not self.reselected and self.global_step + 1 >= self.progressive_step
        )

    @torch.no_grad()
    def reselect(self) -> dict[nn.Parameter, torch.Tensor]:
        """Shrink every layer's trainable set to the entries still within its cutoff, in place.

        Values Parameters keep their size and identity (survivors move to the front; the freed tail is zeroed and
        inert), pending gradients follow their entries, and the optimizer's per-entry state is re-ordered the same
        way, so DDP / FSDP2 / accelerate wrappers built before stay valid. Under ``torch.distributed`` every rank
        applies rank 0's decision. Returns each values Parameter's mask over its previously trainable entries.
        """
        layers = [(name, layer) for name, layer in sara_layers(self.model) if self.adapter_name in layer.sara_values]
        params = {
            layer.sara_values[self.adapter_name]: f"{name}.sara_values.{self.adapter_name}" for name, layer in layers
        }
        if self.optimizer is not None:
            check_optimizer_state_can_follow(self.optimizer, params)  # before anything changes
        masks = _agree_across_ranks([layer.reselection_mask(self.adapter_name) for _, layer in layers])
        trainable = sum(mask.numel() for mask in masks)
        if trainable and not any(bool(mask.any()) for mask in masks):
            raise RuntimeError(
                f"Progressive re-selection at step {self.global_step} would freeze all {trainable:,} trainable entries of "
                f"SaRA adapter '{self.adapter_name}': every one has grown past its selection cutoff (threshold="
                f"{self.config.threshold}), so nothing would be left to train. Nothing was changed. Lower the learning "
                "rate, re-select earlier (a smaller progressive_fraction / progressive_step), or train without "
                "re-selection (progressive_fraction=None)."
            )
        keep_masks = {
            layer.sara_values[self.adapter_name]: layer.reselect(self.adapter_name, keep)
            for (_, layer), keep in zip(layers, masks)
        }
        if self.optimizer is not None:
            compact_optimizer_state(self.optimizer, keep_masks)
        self.reselected = True
        return keep_masks

    def trainable_count(self) -> int:
        """Current number of trainable SaRA entries."""
        return sum(
            layer.num_trainable(self.adapter_name)
            for _, layer in sara_layers(self.model)
            if self.adapter_name in layer.sara_values
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "reselected": self.reselected,
            "generator": self.generator.get_state(),
            "progressive_step": self.progressive_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step = state["global_step"]
        self.reselected = state["reselected"]
        self.generator.set_state(state["generator"])
        self.progressive_step = state["progressive_step"]


def _agree_across_ranks(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rank 0's re-selection masks on every rank when ``torch.distributed`` runs (else ``masks`` as they are).

    Data-parallel ranks hold bitwise-identical values, and a mask is a pure function of them and the base weight, so
    the broadcast normally changes nothing; it guarantees that every rank keeps the same entries (and so the same
    buffer sizes) even if they drifted, and says so.
    """
    if not masks or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return masks
    local = torch.cat(masks).to(torch.uint8)
    decided = local.clone()
    dist.broadcast(decided, src=0)
    differing = int((local != decided).sum())
    if differing:
        warnings.warn(
            f"Rank {dist.get_rank()}'s progressive re-selection differed from rank 0's in {differing} entries: the "
            "ranks' SaRA values or base weights had diverged. Rank 0's decision is applied on every rank.",
            stacklevel=3,
        )
    return list(decided.bool().split([mask.numel() for mask in masks]))


__all__ = ["SaRATrainingHelper", "paper_learning_rate", "resolve_sara_adapter"]
