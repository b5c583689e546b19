"""Finding an adapter: a local folder, or the adapter files of a Hugging Face Hub repo."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError

from .atomic import recover_folder
from .config_checks import check_relative_path
from .constants import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME

# Files fetched from a Hub repo: never the base model or anything else that happens to live there.
ADAPTER_FILE_PATTERNS = (CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME)


def resolve_adapter_folder(
    source: str | os.PathLike,
    subfolder: str | None,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
    weight_name: str | None = None,
) -> Path:
    """A local folder holding the adapter: ``source`` itself, or a snapshot of the Hub repo ``source``.

    Repo ids are resolved with ``huggingface_hub.snapshot_download``, fetching only adapter files (never a base model
    that lives in the same repo, plus ``weight_name`` when the weights have a custom file name); it honours the cache,
    ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT``. ``subfolder`` and ``weight_name`` must stay inside the adapter folder.
    """
    for value, what in ((subfolder, "subfolder"), (weight_name, "weight_name")):
        if value is not None:
            check_relative_path(value, what)
    if os.path.isdir(source):
        root = Path(source)
        recover_folder(root)  # a save killed while publishing: finish it first (peft_sara.atomic)
    elif os.path.exists(source):
        raise ValueError(
            f"'{source}' is a file: pass the folder that holds '{CONFIG_NAME}' (or the component folders)."
        )
    else:
        prefix = f"{subfolder.strip('/')}/" if subfolder else ""
        names = ADAPTER_FILE_PATTERNS + ((weight_name,) if weight_name else ())
        patterns = [f"{prefix}{name}" for name in names]
        patterns += [f"{prefix}*/{name}" for name in names]
        try:
            root = Path(
                snapshot_download(
                    repo_id=str(source),
                    revision=revision,
                    token=token,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                    allow_patterns=patterns,
                )
            )
        except HFValidationError as err:
            raise FileNotFoundError(
                f"'{source}' is neither an existing folder nor a valid Hub repo id ('user/name')."
            ) from err
    folder = root / subfolder if subfolder else root
    if subfolder and not folder.resolve().is_relative_to(root.resolve()):  # a symlink out of the adapter folder
        raise ValueError(f"The subfolder {subfolder!r} of '{source}' leads outside the adapter folder.")
    if not folder.is_dir():
        raise FileNotFoundError(f"The adapter '{source}' has no subfolder '{subfolder}'.")
    return folder


__all__ = ["resolve_adapter_folder", "ADAPTER_FILE_PATTERNS"]
