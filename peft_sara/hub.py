"""Pushing SaRA adapters (of a pipeline, a ``PeftModel`` or a model with an injected adapter) to the Hugging Face Hub,
with the full model card (``peft_sara.cards``)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from peft import PeftModel
from torch import nn

from .adapter_files import adapter_subfolder, save_injected_adapter, save_model_adapter
from .cards import SARA_TAGS, is_hub_repo_id, sara_model_card
from .pipelines import save_sara_adapter
from .tuner.layer import count_entries, sara_adapter_names


def _is_pipeline(obj: Any) -> bool:
    return isinstance(getattr(obj, "components", None), dict) and not isinstance(obj, nn.Module)


def _write_single_model(
    model: nn.Module, folder: Path, adapter_name: str | None, base_model: str | None, repo_id: str
) -> None:
    """Save a ``PeftModel`` (or a model with an injected SaRA adapter) at the root of ``folder``, with our card."""
    if isinstance(model, PeftModel):
        names = [adapter_name] if adapter_name else list(model.peft_config)
        inner = model.get_base_model()
        folders = {name: adapter_subfolder(name) for name in names}
    else:
        names = [adapter_name] if adapter_name else sara_adapter_names(model)
        if len(names) != 1:
            raise ValueError(f"Pass `adapter_name=`: the model has SaRA adapters {names}.")
        inner = model
        folders = {names[0]: ""}
    configs = {folders[name]: model.peft_config[name] for name in names}
    is_diffusion = type(inner).__module__.startswith("diffusers")
    base_model = base_model or next(iter(configs.values())).base_model_name_or_path
    card = sara_model_card(
        base_model=base_model,
        configs=configs,
        repo_id=repo_id,
        adapter_name=adapter_name,
        trainable_entries={folders[name]: count_entries(inner, name) for name in names},
        pipeline_tag="text-to-image" if is_diffusion else None,
    )
    if isinstance(model, PeftModel):
        # Record the Hub id, not the local path the base was loaded from, in adapter_config.json.
        save_model_adapter(model, folder, names, base_model)
    else:
        save_injected_adapter(model, folder, names[0], base_model)
    # Written last: PEFT's save_pretrained edits README.md and sets `base_model` from the base model's config, which
    # can be a local path or even a `pathlib.Path` (invalid YAML for the Hub).
    card.save(str(folder / "README.md"))


def push_sara_adapter(
    pipe_or_model: Any,
    repo_id: str,
    adapter_name: str | None = None,
    components: Sequence[str] | None = None,
    base_model: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
) -> str:
    """Save a SaRA adapter with its model card and upload it to the Hub.

    Args:
        pipe_or_model: A ``DiffusionPipeline`` (saved with :func:`peft_sara.save_sara_adapter`, one subfolder per
            component), a ``PeftModel`` (saved with ``save_pretrained``), or a model with an injected SaRA adapter
            (e.g. a UNet after ``add_adapter``), saved at the repo root.
        repo_id: ``"user/name"``; created if missing.
        adapter_name: Which adapter (may be omitted when there is only one).
        components: For pipelines, only these components.
        base_model: Hub id of the base model, for ``adapter_config.json`` and the card.
        private, token, revision, commit_message, create_pr: As in ``HfApi.upload_folder``.
        endpoint: Hub endpoint (default: ``HF_ENDPOINT`` or huggingface.co).

    Returns:
        The commit URL (a ``huggingface_hub.CommitInfo``, which is a ``str``; ``.pr_url`` is set with ``create_pr``).
    """
    api = HfApi(endpoint=endpoint, token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    with tempfile.TemporaryDirectory(prefix="sara-push-") as tmp:
        folder = Path(tmp)
        if _is_pipeline(pipe_or_model):
            save_sara_adapter(
                pipe_or_model,
                folder,
                adapter_name=adapter_name,
                components=components,
                base_model=base_model,
                repo_id=repo_id,
            )
        elif isinstance(pipe_or_model, nn.Module):
            _write_single_model(pipe_or_model, folder, adapter_name, base_model, repo_id)
        else:
            raise TypeError(
                f"push_sara_adapter expects a DiffusionPipeline, a PeftModel or a model with a SaRA adapter, got "
                f"{type(pipe_or_model).__name__}."
            )
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message or "Upload SaRA adapter",
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )


__all__ = ["push_sara_adapter", "sara_model_card", "is_hub_repo_id", "SARA_TAGS"]
