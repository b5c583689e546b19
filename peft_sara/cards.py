"""Model cards for SaRA adapters.

The card's YAML header carries what the Hub indexes: ``library_name: peft``, ``base_model`` with
``base_model_relation: adapter``, ``pipeline_tag`` and the tags ``sara``, ``peft-sara``, ``diffusers``,
``text-to-image``; its body says how to load the adapter (``import peft_sara`` first, since PEFT has no plugin
discovery).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import peft
from huggingface_hub import ModelCard, ModelCardData

from .constants import DIFFUSERS_TAGS, PAPER_URL, __version__
from .tuner.config import SaRAConfig
from .tuner.names import SARA_TAGS

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")


def is_hub_repo_id(name: str | None) -> bool:
    """Whether ``name`` looks like a Hub repo id (and is not a local path)."""
    return bool(name) and _REPO_ID.match(name) is not None and not os.path.exists(name)


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
        f"- peft-sara {__version__}",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


__all__ = ["sara_model_card", "is_hub_repo_id", "SARA_TAGS"]
