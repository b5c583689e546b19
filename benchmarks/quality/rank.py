"""Rank of a trained SaRA update: nuclear norm and effective rank of each layer's Delta_W, and how well the adapter
travels as a LoRA (the exporter's whole-adapter relative error at several ranks).

The numbers come from the library: :func:`peft_sara.tuner.regularizers.delta_rank_stats` and
:func:`peft_sara.conversion.convert_to_lora` (the same export ``benchmarks/export_rank.py`` measures on the demo's
default run; here it is measured on the ablation runs, with and without the low-rank loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from peft_sara.conversion import convert_to_lora, parse_rank
from peft_sara.training import sara_layers
from peft_sara.tuner.regularizers import delta_rank_stats


def update_rank_report(model: nn.Module, export_ranks: Sequence[str]) -> dict[str, Any] | None:
    """Rank statistics of ``model``'s SaRA update (None for a model without SaRA layers)."""
    layers = [(name, layer) for name, layer in sara_layers(model) if "default" in layer.sara_values]
    if not layers:
        return None
    stats = [delta_rank_stats(layer, "default") for _, layer in layers]
    active = [item for item in stats if item["nuclear_norm"] > 0]
    exports = []
    for rank in export_ranks:
        export = convert_to_lora(model, rank=parse_rank(rank), component="unet")
        factors = [layer_factors for _, layer_factors in export.layers()]
        exports.append(
            {
                "rank": rank,
                "total_relative_error": export.total_error,
                "lora_parameters": export.parameter_count(),
                "mean_layer_rank": sum(item.rank for item in factors) / len(factors),
            }
        )
    return {
        "layers": len(stats),
        "nuclear_norm_total": sum(item["nuclear_norm"] for item in stats),
        "mean_effective_rank": sum(item["effective_rank"] for item in active) / max(1, len(active)),
        "mean_effective_rank_share": sum(item["effective_rank"] / min(item["shape"]) for item in active)
        / max(1, len(active)),
        "mean_numerical_rank": sum(item["rank"] for item in active) / max(1, len(active)),
        "exports": exports,
    }
