"""What a saved SaRA adapter holds, read from its files alone (no base model): per layer the trainable and frozen
entries, density, ||Delta_W||_F and effective rank; per component the file size; totals."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapter_files import adapter_component_names, read_adapter_weights, read_reported_config_fields
from ..constants import SAFETENSORS_NAME
from ..resolve import resolve_adapter_folder
from ..tuner.file_format import WEIGHT_SHAPE_NAME
from ..tuner.names import selection_rule
from ..tuner.reader import MAX_DENSE_PER_STORED_ENTRY, LayerEntries, check_checkpoint_file
from .lowrank import effective_rank, numerical_rank

# Imports no PEFT, diffusers or transformers: `peft-sara inspect` reads files (the weights checked as a load checks
# them; of the config, its kind and the fields reported here).


def _layer_row(name: str, entries: LayerEntries, shape: tuple[int, ...], ranks: bool) -> dict[str, Any]:
    values, frozen_values = entries.values.float(), entries.frozen_values.float()
    indices = torch.cat([entries.indices.long(), entries.frozen_indices.long()])
    all_values = torch.cat([values, frozen_values])
    stored = all_values.numel()
    row: dict[str, Any] = {
        "module": name,
        "weight_shape": list(shape),
        "trainable": values.numel(),
        "frozen": frozen_values.numel(),
        "density": stored / math.prod(shape) if math.prod(shape) else None,
        "delta_norm": float(torch.linalg.vector_norm(all_values)),  # entries are distinct: the dense norm
        "effective_rank": None,
        "rank": None,
    }
    if ranks and stored and math.prod(shape) <= MAX_DENSE_PER_STORED_ENTRY * stored:
        # the dense update (SparseUpdate.to_dense at scale 1; its module imports the kernels, and they torch's compiler)
        matrix = torch.zeros(math.prod(shape)).index_add(0, indices, all_values).reshape(shape[0], -1)
        singular_values = torch.linalg.svdvals(matrix)
        row["effective_rank"] = round(effective_rank(singular_values), 3)
        row["rank"] = numerical_rank(singular_values, tuple(matrix.shape))
    return row


def inspect_adapter(
    source: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    ranks: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Statistics of a SaRA adapter folder or Hub repo, from its files (see the module docstring).

    ``ranks=False`` skips the SVD per layer (effective ranks are then ``None``), as do layers whose recorded weight is
    more than :data:`MAX_DENSE_PER_STORED_ENTRY` times their stored entries. The files are validated first
    (``peft_sara.tuner.reader.check_checkpoint_file``): a corrupted or hostile file raises ``InvalidAdapterError``.
    """
    folder = resolve_adapter_folder(source, subfolder, revision, token, cache_dir, local_files_only)
    components = []
    for component in adapter_component_names(folder):
        component_folder = folder / component if component else folder
        config = read_reported_config_fields(component_folder)
        parsed, entries = check_checkpoint_file(read_adapter_weights(component_folder), allow_non_finite=True)
        layers = [
            _layer_row(name, entries[name], tuple(int(size) for size in checkpoint.tensors[WEIGHT_SHAPE_NAME]), ranks)
            for name, checkpoint in tqdm(
                sorted(parsed.layers.items()), desc=f"inspecting {component or 'adapter'}", disable=not progress
            )
        ]
        weights_file = component_folder / SAFETENSORS_NAME
        components.append(
            {
                "component": component,
                "selection": selection_rule(config.get("threshold"), config.get("trainable_fraction")),
                "base_model": config.get("base_model_name_or_path"),
                "file_bytes": weights_file.stat().st_size if weights_file.is_file() else None,
                "layers": layers,
                "trainable": sum(row["trainable"] for row in layers),
                "frozen": sum(row["frozen"] for row in layers),
                "delta_norm": math.sqrt(sum(row["delta_norm"] ** 2 for row in layers)),
            }
        )
    targeted = [row for component in components for row in component["layers"] if row["weight_shape"]]
    entries = sum(row["trainable"] + row["frozen"] for row in targeted)
    weights = sum(math.prod(row["weight_shape"]) for row in targeted)
    return {
        "adapter": str(source),
        "folder": str(folder),
        "base_model": next((c["base_model"] for c in components if c["base_model"]), None),
        "components": components,
        "totals": {
            "layers": sum(len(c["layers"]) for c in components),
            "trainable": sum(c["trainable"] for c in components),
            "frozen": sum(c["frozen"] for c in components),
            "density": entries / weights if weights else None,
            "delta_norm": math.sqrt(sum(c["delta_norm"] ** 2 for c in components)),
            "file_bytes": sum(c["file_bytes"] or 0 for c in components),
        },
    }


__all__ = ["inspect_adapter"]
