"""Model cards for SaRA adapters and pushing adapters to the Hugging Face Hub.

The card's YAML header carries what the Hub indexes: ``library_name: peft``, ``base_model`` with
``base_model_relation: adapter``, ``pipeline_tag`` and the tags ``sara``, ``peft-sara``, ``diffusers``,
``text-to-image``; its body says how to load the adapter (``import peft_sara`` first, since PEFT has no plugin
discovery).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import peft
from huggingface_hub import HfApi, ModelCard, ModelCardData
from torch import nn

from .config import SaRAConfig

SARA_TAGS = ("sara", "peft-sara")
DIFFUSERS_TAGS = ("diffusers", "text-to-image")
PAPER_URL = "https://arxiv.org/abs/2409.06633"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")


def is_hub_repo_id(name: str | None) -> bool:
    """Whether ``name`` looks like a Hub repo id (and is not a local path)."""
    return bool(name) and _REPO_ID.match(name) is not None and not os.path.exists(name)


def _peft_sara_version() -> str:
    from . import __version__

    return __version__


def _describe(config: SaRAConfig) -> str:
    targets = config.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    # Pipes would end the Markdown table cell ("|w| < 2e-3").
    return f"trainable entries: {config.selection_rule}; target modules: `{targets}`".replace("|", "\\|")


def sara_model_card(
    base_model: str | None,
    configs: Mapping[str, SaRAConfig],
    trainable_entries: Mapping[str, int] | None = None,
    repo_id: str | None = None,
    adapter_name: str | None = None,
    pipeline_class: str | None = None,
    pipeline_tag: str | None = "text-to-image",
    prompt: str = "a photo in the style of the adapter",
    license: str | None = None,
    extra_tags: Sequence[str] = (),
) -> ModelCard:
    """Build the model card of a SaRA adapter.

    Args:
        base_model: Hub id of the base model / pipeline. Local paths are kept out of the YAML header (the Hub only
            accepts repo ids there) but mentioned in the text.
        configs: The adapter's config per component folder (``{"unet": cfg, ...}``); for a single model, per adapter
            folder (``{"": cfg}`` at the repo root).
        trainable_entries: Number of stored SaRA values per component, for the summary.
        repo_id: Where the adapter will live, for the usage snippet (default: a placeholder).
        adapter_name: Name used in the snippet.
        pipeline_class: Class of the pipeline the adapter was saved from; ``None`` for a single model.
        pipeline_tag: Hub pipeline tag; ``None`` for non-diffusion models.
        prompt: Prompt used in the usage snippet.
        license: License id for the header.
        extra_tags: More tags.
    """
    is_diffusion = pipeline_tag == "text-to-image"
    tags = list(SARA_TAGS) + (list(DIFFUSERS_TAGS) if is_diffusion else []) + list(extra_tags)
    hub_base = base_model if is_hub_repo_id(base_model) else None
    data = ModelCardData(
        library_name="peft",
        base_model=hub_base,
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys(tags)),
        license=license,
        base_model_relation="adapter" if hub_base else None,
    )
    repo = repo_id or "<your-username>/<this-repo>"
    base = base_model or "<base-model-id>"
    single_model = pipeline_class is None
    # A single model's adapter sits at the root, or in a subfolder named after it (PEFT's non-default adapters).
    folder = "" if "" in configs or not single_model else next(iter(configs))
    load_args = f'"{repo}"' + (f', subfolder="{folder}"' if folder else "")
    load_args += f', adapter_name="{adapter_name}"' if adapter_name else ""

    lines = [
        f"# SaRA adapter for {base}",
        "",
        f"A [SaRA]({PAPER_URL}) adapter (progressive sparse low-rank adaptation, ICLR 2025): a sparse update of the "
        'smallest-magnitude ("temporarily ineffective") pre-trained weights, stored as indices and values. It adds '
        "no inference cost once fused.",
        "",
    ]
    if base_model and not hub_base:
        lines += [f"Base model (local path at save time): `{base_model}`.", ""]
    if pipeline_class:
        lines += [f"Saved from a `{pipeline_class}`, one subfolder per adapted component.", ""]
    lines += ["| component | selection | stored values |", "| --- | --- | --- |"]
    for component, config in configs.items():
        count = (trainable_entries or {}).get(component)
        lines.append(f"| {component or '(root)'} | {_describe(config)} | {count if count is not None else '?'} |")
    lines += ["", "## How to use", "", "Install `peft-sara`, then:", "", "```python"]
    if is_diffusion:
        lines += [
            "import torch",
            "import peft_sara  # registers the SaRA method with PEFT",
            "from diffusers import DiffusionPipeline",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")',
            f"adapter = peft_sara.load_sara_adapter(pipe, {load_args})",
            f'image = pipe("{prompt}").images[0]',
            "",
            "# Strength, on/off and fusing work through diffusers' adapter API:",
            "pipe.set_adapters([adapter], [0.8])",
            "pipe.fuse_lora()  # bake the update into the weights; pipe.unfuse_lora() restores them",
        ]
        if single_model:
            lines += ["```", "", "Or on the model alone:", "", "```python"]
    if single_model:
        peft_args = f'"{repo}"' + (f', subfolder="{folder}"' if folder else "")
        lines += [
            "import peft_sara  # registers the SaRA method with PEFT",
            "from peft import PeftModel",
            "",
            f"model = PeftModel.from_pretrained(base_model, {peft_args})",
        ]
    lines += [
        "```",
        "",
        "Without `import peft_sara` first, PEFT does not know the `SARA` adapter type and fails with `KeyError: 'SARA'`.",
        "",
        "### Framework versions",
        "",
        f"- PEFT {peft.__version__}",
        f"- peft-sara {_peft_sara_version()}",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _is_pipeline(obj: Any) -> bool:
    return isinstance(getattr(obj, "components", None), dict) and not isinstance(obj, nn.Module)


def _write_single_model(
    model: nn.Module, folder: Path, adapter_name: str | None, base_model: str | None, repo_id: str
) -> None:
    """Save a ``PeftModel`` (or a model with an injected SaRA adapter) at the root of ``folder``, with our card."""
    from peft import PeftModel

    from .diffusers_utils import _num_sara_values, sara_adapter_names, save_component_adapter

    if isinstance(model, PeftModel):
        names = [adapter_name] if adapter_name else list(model.peft_config)
        inner = model.get_base_model()
        # PeftModel.save_pretrained writes "default" at the root and any other adapter in a subfolder of its name.
        folders = {name: "" if name == "default" else name for name in names}
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
        trainable_entries={folders[name]: _num_sara_values(inner, name) for name in names},
        pipeline_tag="text-to-image" if is_diffusion else None,
    )
    if isinstance(model, PeftModel):
        # Record the Hub id, not the local path the base was loaded from, in adapter_config.json (for this save only).
        saved_bases = {name: model.peft_config[name].base_model_name_or_path for name in names}
        try:
            for name in names:
                model.peft_config[name].base_model_name_or_path = base_model
            # PEFT's "auto" looks the base model up on the Hub to compare vocabulary sizes; pointless without one.
            has_vocab = getattr(getattr(inner, "config", None), "vocab_size", None) is not None
            model.save_pretrained(
                str(folder), selected_adapters=names, save_embedding_layers="auto" if has_vocab else False
            )
        finally:
            for name, saved in saved_bases.items():
                model.peft_config[name].base_model_name_or_path = saved
    else:
        save_component_adapter(model, folder, names[0], base_model)
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
    from .diffusers_utils import save_sara_adapter

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


__all__ = ["sara_model_card", "push_sara_adapter", "is_hub_repo_id", "SARA_TAGS"]
