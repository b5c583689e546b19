"""``peft-sara push ADAPTER REPO_ID``: upload a saved SaRA adapter folder with the full SaRA model card."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from ..constants import CARD_NAME, CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME
from .output import parse_arguments

ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``peft-sara push``."""
    parser = argparse.ArgumentParser(
        prog="peft-sara push",
        description="Upload a SaRA adapter folder (a single model's, or a pipeline's with unet/, text_encoder/, ... "
        "subfolders) to the Hugging Face Hub, with a model card that says how to load it (library_name: peft, "
        "base_model_relation: adapter, SaRA tags, usage snippet). Only adapter files and the card are uploaded.",
    )
    parser.add_argument("adapter", type=Path, help="local SaRA adapter folder")
    parser.add_argument("repo_id", help="target repo, user/name (created if missing)")
    parser.add_argument("--base-model", default=None, help="Hub id of the base model, for the card (default: recorded)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    parser.add_argument("--revision", default=None, help="branch to push to")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of pushing")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    return parser


def stage_adapter(adapter: Path, staging: Path, repo_id: str, base_model: str | None) -> list[str]:
    """Copy the adapter files of ``adapter`` into ``staging`` and write the SaRA card; returns the components."""
    from ..adapter_files import adapter_component_names, read_adapter_weights, read_sara_config
    from ..atomic import write_text_atomic
    from ..cards import sara_model_card
    from ..tuner.file_format import parse_checkpoint

    components = adapter_component_names(adapter)
    configs, entries = {}, {}
    for component in components:
        source = adapter / component if component else adapter
        configs[component] = read_sara_config(source)
        parsed = parse_checkpoint(read_adapter_weights(source))
        entries[component] = sum(
            tensor.numel()
            for layer in parsed.layers.values()
            for name, tensor in layer.tensors.items()
            if name in ("sara_values", "sara_frozen_values")
        )
        target = staging / component if component else staging
        target.mkdir(parents=True, exist_ok=True)
        for name in ADAPTER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)
    recorded = next((config.base_model_name_or_path for config in configs.values()), None)
    card = sara_model_card(
        base_model=base_model or recorded,
        configs=configs,
        trainable_entries=entries,
        repo_id=repo_id,
        pipeline_class=None if components == [""] else "DiffusionPipeline",
    )
    write_text_atomic(staging / CARD_NAME, str(card))
    return components


def main(argv: list[str] | None = None) -> int:
    """Run ``peft-sara push``."""
    args = parse_arguments(build_parser(), argv)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=args.endpoint, token=args.token)
    repo_id = api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model").repo_id
    with tempfile.TemporaryDirectory(prefix="sara-push-") as tmp:
        stage_adapter(args.adapter, Path(tmp), repo_id, args.base_model)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=args.commit_message or "Upload SaRA adapter",
            revision=args.revision,
            create_pr=args.create_pr,
            repo_type="model",
        )
    print(f"pushed {args.adapter} to {repo_id}: {commit}")
    return 0


__all__ = ["main", "build_parser", "stage_adapter"]
