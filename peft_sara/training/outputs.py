"""What a training run leaves at the end: the adapter of its trained components in PEFT format (one subfolder per
component, with a model card), and optionally the same update as a diffusers-format LoRA
(``pytorch_lora_weights.safetensors``, read by ``pipe.load_lora_weights``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..conversion import ExportResult, export_adapter
from ..pipelines import save_sara_adapter
from .components import DEFAULT_ADAPTER_NAME


def recorded_base_model(name_or_path: str) -> str:
    """What an adapter should record as its base: a Hub id as given, a local folder as an absolute path, so that
    ``peft-sara export`` / ``merge`` find it from any working directory."""
    return os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path


def save_trained_adapter(
    pipe: Any,
    output_dir: str | os.PathLike,
    components: Sequence[str],
    *,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    base_model: str | None = None,
    repo_id: str | None = None,
    export_lora_rank: int | float | str | None = None,
) -> ExportResult | None:
    """Save the trained adapter of a pipeline and, with ``export_lora_rank``, export it as a LoRA beside it.

    Args:
        pipe: the pipeline whose components were trained.
        output_dir: the folder to write: one PEFT subfolder per component (``unet/``, ``text_encoder/``, ...), a
            model card ``README.md`` (:func:`peft_sara.save_sara_adapter`).
        components: the trained components' names.
        adapter_name: the trained adapter.
        base_model: the base recorded in ``adapter_config.json`` and the card (see :func:`recorded_base_model`);
            default: where the pipeline was loaded from.
        repo_id: the Hub repo the adapter is meant for, used in the card's usage snippet.
        export_lora_rank: also write ``pytorch_lora_weights.safetensors``, the update as a LoRA of this rank per layer
            (an integer), ``"full"`` (exact) or an energy fraction such as 0.99 (``peft_sara.conversion.parse_rank``).

    Returns:
        The LoRA export (its paths and approximation errors), or None without ``export_lora_rank``.
    """
    save_sara_adapter(
        pipe, output_dir, adapter_name=adapter_name, components=list(components), base_model=base_model, repo_id=repo_id
    )
    if export_lora_rank is None:
        return None
    return export_adapter(
        pipe, output_dir, "diffusers", rank=export_lora_rank, adapter_name=adapter_name, components=list(components)
    )


__all__ = ["recorded_base_model", "save_trained_adapter"]
