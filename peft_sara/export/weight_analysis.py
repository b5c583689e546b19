"""The paper's observation, measured on any model: how many pre-trained weights are tiny, and whether zeroing them
matters more than zeroing as many random weights.

Layers are the ones SaRA can adapt (``nn.Linear``, ``nn.Conv1d/2d/3d``, transformers' ``Conv1D``).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_write
from ..tuner.layer import LAYER_CLASSES

# The paper's thresholds (Sec. 3): 2e-4 / 8e-4 / 2e-3 select about 5M / 20M / 50M of SD1.5's UNet; 1e-3 is its FID test.
DEFAULT_THRESHOLDS = (2e-4, 8e-4, 1e-3, 2e-3)
# Weights sampled per layer for the histogram (enough for a smooth curve, bounded memory on large models).
HISTOGRAM_SAMPLES_PER_LAYER = 200_000


def adaptable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module SaRA could adapt, in order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if any(matches(module) for matches, _ in LAYER_CLASSES) and getattr(module, "weight", None) is not None
    ]


def small_weight_fractions(
    model: nn.Module, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, progress: bool = False
) -> dict[str, Any]:
    """Per layer and in total, the fraction of weights with ``|w| < t`` for each threshold ``t``."""
    thresholds = sorted(thresholds)
    layers, below_total, count_total = [], [0] * len(thresholds), 0
    for name, module in tqdm(adaptable_layers(model), desc="counting small weights", disable=not progress):
        magnitudes = module.weight.detach().abs().reshape(-1).float()
        below = [int((magnitudes < threshold).sum()) for threshold in thresholds]
        layers.append(
            {
                "module": name,
                "kind": type(module).__name__,
                "weights": magnitudes.numel(),
                "fractions": {f"{t:g}": count / magnitudes.numel() for t, count in zip(thresholds, below)},
            }
        )
        below_total = [total + count for total, count in zip(below_total, below)]
        count_total += magnitudes.numel()
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear / Conv / Conv1D layer to analyse.")
    totals = {f"{t:g}": count / count_total for t, count in zip(thresholds, below_total)}
    return {"thresholds": list(thresholds), "weights": count_total, "fractions": totals, "layers": layers}


def save_histogram(
    model: nn.Module, path: str | os.PathLike, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, seed: int = 0
) -> bool:
    """Write a PNG histogram of ``log10 |w|`` over the adaptable layers, thresholds marked. Needs matplotlib;
    returns False (nothing written) without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _, module in adaptable_layers(model):
        flat = module.weight.detach().reshape(-1).float()
        if flat.numel() > HISTOGRAM_SAMPLES_PER_LAYER:
            flat = flat[torch.randint(flat.numel(), (HISTOGRAM_SAMPLES_PER_LAYER,), generator=generator)]
        samples.append(flat.abs())
    magnitudes = torch.cat(samples)
    logs = magnitudes[magnitudes > 0].log10().numpy()
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.hist(logs, bins=120, color="#4c72b0")
    colors = plt.get_cmap("autumn")
    for position, threshold in enumerate(sorted(thresholds)):
        share = float((magnitudes < threshold).float().mean())
        axis.axvline(
            math.log10(threshold),
            color=colors(position / max(1, len(thresholds) - 1)),
            linestyle="--",
            linewidth=1,
            label=f"|w| < {threshold:g}: {share:.2%}",
        )
    axis.legend(loc="upper left", fontsize=8)
    axis.set_xlabel("log10 |w|  (Linear / Conv weights)")
    axis.set_ylabel("count (sampled)")
    axis.set_title(f"{type(model).__name__}: weight magnitudes")
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    with atomic_write(path) as file:
        file.write(buffer.getvalue())
    return True


def first_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model output (``.sample``, ``last_hidden_state``, the first element, or the tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return first_tensor(next(iter(output.values())))
    if isinstance(output, (tuple, list)):
        return first_tensor(output[0])
    raise TypeError(f"Cannot find a tensor in a model output of type {type(output).__name__}.")


@torch.no_grad()
def zeroing_effect(
    model: nn.Module,
    inputs: Mapping[str, Any],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, float]]:
    """For each threshold: the relative output change ``||f'(x) - f(x)|| / ||f(x)||`` when every weight with
    ``|w| < t`` is zeroed, and when as many random weights (the same number per layer) are zeroed instead.

    Weights are restored bitwise afterwards.
    """
    layers = adaptable_layers(model)
    reference = first_tensor(model(**inputs)).float()
    scale = float(torch.linalg.vector_norm(reference)) or 1.0
    generator = torch.Generator().manual_seed(seed)
    results = []
    for threshold in tqdm(sorted(thresholds), desc="zeroing weights", disable=not progress):
        changes = {}
        zeroed = 0
        for mode in ("small", "random"):
            backups = []
            for _, module in layers:
                if not module.weight.is_contiguous():
                    module.weight.data = module.weight.data.contiguous()  # same values; the view below must alias
                weight = module.weight.data
                flat = weight.view(-1)
                small = (weight.abs() < threshold).view(-1)
                count = int(small.sum())
                if mode == "small":
                    chosen = small.nonzero().view(-1)
                    zeroed += count
                else:
                    chosen = torch.randperm(flat.numel(), generator=generator)[:count].to(flat.device)
                backups.append((flat, chosen, flat[chosen].clone()))
                flat[chosen] = 0
            try:
                changed = first_tensor(model(**inputs)).float()
                changes[mode] = float(torch.linalg.vector_norm(changed - reference)) / scale
            finally:
                for flat, chosen, saved in backups:
                    flat[chosen] = saved
        results.append(
            {
                "threshold": threshold,
                "zeroed_weights": zeroed,
                "relative_change_small": changes["small"],
                "relative_change_random": changes["random"],
            }
        )
    return results


__all__ = ["DEFAULT_THRESHOLDS", "adaptable_layers", "small_weight_fractions", "save_histogram", "zeroing_effect"]
