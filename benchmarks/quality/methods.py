"""The fine-tuning methods compared, each built on a copy of the pretrained base at a trainable-parameter budget.

``budget`` is the share of the targeted weights (the Linear and Conv layers SaRA adapts by default) that SaRA trains;
every parameter-matched method gets the same *count*:

- ``sara``: SaRA as in the paper: the smallest-|w| entries of each layer, low-rank loss (lambda 5e-4 on one sampled
  layer per step, the official script's setting), progressive re-selection half-way.
- ``lora``: PEFT LoRA on the same modules at the rank whose parameter count is closest to SaRA's.
- ``lora_r8``: PEFT LoRA with PEFT's defaults (``r=8, lora_alpha=8``) on the same modules, whatever the budget.
- ``full``: every weight of the UNet (budget ignored).
- ``supertuning``: PEFT Super-Tuning in its smallest-magnitude mode (``select_top=False``); PEFT supports only
  ``nn.Linear``, so it adapts the Linear layers among SaRA's targets, at the density that gives SaRA's count.
- ``shira``: PEFT SHiRA (random sparse support); Linear only as well, rank ``r`` chosen to give SaRA's count.
- ``sara_linear``: SaRA on those same Linear layers at that density: separates "which layers" from "which entries"
  in the comparison with Super-Tuning and SHiRA.
- ablations of SaRA (paper Table 2): ``sara_no_progressive``, ``sara_no_rank``, ``sara_plain`` (neither),
  ``sara_rank_all`` (lambda 5e-3 on every layer every step: a low-rank loss that binds), ``largest`` and ``random``
  (the largest-|w| or random entries of each layer, same count per layer; low-rank loss, no re-selection, which is
  defined by the small-weight threshold).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers import UNet2DModel
from peft import LoraConfig, ShiraConfig, SupertuningConfig, get_peft_model
from torch import nn

from peft_sara import SaRAConfig
from peft_sara.demo.finetune import adapted_module_names, make_lora_model
from peft_sara.training import sara_layers

PAPER_LAMBDA = 5e-4  # the official training script's lambda_rank
BINDING_LAMBDA = 5e-3  # the paper appendix's lambda, here on every layer every step

MAIN_METHODS = ("sara", "lora", "lora_r8", "full", "supertuning", "shira", "sara_linear")
ABLATIONS = ("sara_no_progressive", "sara_no_rank", "sara_plain", "sara_rank_all", "largest", "random")
LABELS = {
    "sara": "SaRA",
    "lora": "LoRA (same params)",
    "lora_r8": "LoRA r=8 (PEFT default)",
    "full": "full fine-tuning",
    "supertuning": "Super-Tuning (smallest |w|, Linear only)",
    "shira": "SHiRA (random, Linear only)",
    "sara_linear": "SaRA, Linear only",
    "sara_no_progressive": "SaRA w/o progressive",
    "sara_no_rank": "SaRA w/o low-rank loss",
    "sara_plain": "SaRA w/o both",
    "sara_rank_all": "SaRA, low-rank loss on all layers (5e-3)",
    "largest": "largest |w| instead",
    "random": "random entries instead",
}
COLORS = {
    "sara": "tab:red",
    "lora": "tab:blue",
    "lora_r8": "tab:cyan",
    "full": "black",
    "supertuning": "tab:green",
    "shira": "tab:purple",
    "sara_linear": "tab:orange",
    "sara_no_progressive": "tab:orange",
    "sara_no_rank": "tab:pink",
    "sara_plain": "tab:brown",
    "sara_rank_all": "tab:olive",
    "largest": "tab:gray",
    "random": "tab:purple",
}


@dataclass
class BuiltMethod:
    """A model ready to train, its trainable count, and whether the SaRA training helper drives it."""

    model: nn.Module
    trainable: int
    use_sara_helper: bool
    note: str = ""


def sara_config(budget: float, rank_min_dim: int, progressive: bool = True, lambda_rank: float = PAPER_LAMBDA):
    """SaRA on the default UNet targets, the smallest ``budget`` of every weight."""
    return SaRAConfig(
        trainable_fraction=budget,
        lambda_rank=lambda_rank,
        rank_min_dim=rank_min_dim,
        progressive_fraction=0.5 if progressive else None,
    )


def _sara(base: UNet2DModel, config: SaRAConfig) -> nn.Module:
    return get_peft_model(copy.deepcopy(base), config)


def _trainable(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


def reselect_entries(model: nn.Module, rule: str, seed: int) -> None:
    """Replace every SaRA layer's selection by as many of its largest-|w| (``rule="largest"``) or random entries."""
    generator = torch.Generator().manual_seed(seed)
    for _, layer in sara_layers(model):
        count = layer.num_trainable("default")
        magnitudes = layer.get_base_layer().weight.detach().reshape(-1).abs()
        if rule == "largest":
            chosen = torch.argsort(magnitudes, descending=True, stable=True)[:count]
        else:
            chosen = torch.randperm(magnitudes.numel(), generator=generator)[:count]
        indices, _ = layer.trainable_entries("default")
        layer.set_trainable_entries("default", torch.sort(chosen).values.to(indices.dtype))


def linear_targets(model: nn.Module, names: list[str]) -> list[str]:
    """Those of ``names`` that are ``nn.Linear`` in ``model`` (PEFT's Super-Tuning and SHiRA support only these)."""
    modules = dict(model.named_modules())
    return [name for name in names if isinstance(modules[name], nn.Linear)]


def build_method(method: str, base: UNet2DModel, budget: float, seed: int, rank_min_dim: int) -> BuiltMethod:
    """``method`` (see the module docstring) on a copy of ``base`` at ``budget``."""
    torch.manual_seed(seed)  # LoRA's A matrices and PEFT's other random initialisations
    sara_variants = {
        "sara": {},
        "sara_no_progressive": {"progressive": False},
        "sara_no_rank": {"lambda_rank": 0.0},
        "sara_plain": {"progressive": False, "lambda_rank": 0.0},
        "largest": {"progressive": False},
        "random": {"progressive": False},
    }
    if method in sara_variants or method == "sara_rank_all":
        config = sara_config(budget, rank_min_dim, **sara_variants.get(method, {}))
        if method == "sara_rank_all":
            config = sara_config(budget, rank_min_dim, lambda_rank=BINDING_LAMBDA)
            config.rank_layers_per_step = "all"
        model = _sara(base, config)
        if method in ("largest", "random"):
            reselect_entries(model, method, seed)
        return BuiltMethod(model, _trainable(model), use_sara_helper=True)
    if method == "full":
        model = copy.deepcopy(base)
        model.requires_grad_(True)
        return BuiltMethod(model, _trainable(model), use_sara_helper=False)
    reference = _sara(base, sara_config(budget, rank_min_dim))
    count, targets = _trainable(reference), adapted_module_names(reference)
    if method == "lora":
        model = make_lora_model(base, targets, count, seed)
        return BuiltMethod(model, _trainable(model), False, f"r={model.peft_config['default'].r}")
    if method == "lora_r8":
        model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=list(targets)))
        return BuiltMethod(model, _trainable(model), False, f"r={model.peft_config['default'].r}")
    linear = linear_targets(base, targets)
    modules = dict(base.named_modules())
    linear_weights = sum(modules[name].weight.numel() for name in linear)
    density = min(1.0, count / linear_weights)
    if method == "sara_linear":
        config = sara_config(density, rank_min_dim)
        config.target_modules = linear
        model = _sara(base, config)
        return BuiltMethod(model, _trainable(model), True, f"density {density:.1%} of {len(linear)} Linear layers")
    if method == "supertuning":
        config = SupertuningConfig(target_modules=linear, sparsity=1.0 - density, select_top=False)
        model = get_peft_model(copy.deepcopy(base), config)
        return BuiltMethod(model, _trainable(model), False, f"density {density:.1%} of {len(linear)} Linear layers")
    if method == "shira":
        per_rank = sum(modules[name].in_features + modules[name].out_features for name in linear)
        largest_rank = min(
            modules[name].in_features
            * modules[name].out_features
            // (modules[name].in_features + modules[name].out_features)
            for name in linear
        )
        rank = max(1, min(largest_rank, round(count / per_rank)))
        config = ShiraConfig(target_modules=linear, r=rank, random_seed=seed)
        model = get_peft_model(copy.deepcopy(base), config)
        return BuiltMethod(model, _trainable(model), False, f"r={rank} on {len(linear)} Linear layers")
    raise ValueError(f"Unknown method {method!r}; choose one of {MAIN_METHODS + ABLATIONS}.")
