"""Options shared by the subcommands that load a base model with an adapter (``export``, ``merge``)."""

from __future__ import annotations

import argparse
from pathlib import Path

DOWNLOAD_HINT = (
    "Pass --base FOLDER, a local copy of the base model (download one with `hf download ORG/NAME --local-dir FOLDER`)."
)


def add_source_options(parser: argparse.ArgumentParser, base_option: bool = True) -> None:
    """``--base`` (unless positional), ``--subfolder``, ``--revision``, ``--token``."""
    if base_option:
        parser.add_argument(
            "--base",
            default=None,
            help="local folder of the base pipeline (model_index.json) or model (config.json); default: the "
            "adapter's base_model_name_or_path when that is a local folder",
        )
    parser.add_argument("--subfolder", default=None, help="folder inside the adapter repo / folder")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of the adapter's Hub repo")
    parser.add_argument("--token", default=None, help="Hub token for private repos")


def base_folder(args: argparse.Namespace, required: bool = True) -> Path | None:
    """``--base``, or the base model the adapter records, which must then be a local folder (else ``None`` when not
    ``required``)."""
    if args.base:
        return Path(args.base)
    from ..adapter_files import adapter_component_names, read_sara_config
    from ..resolve import resolve_adapter_folder

    folder = resolve_adapter_folder(args.adapter, args.subfolder, args.revision, args.token, None, False)
    component = adapter_component_names(folder)[0]
    recorded = read_sara_config(folder / component if component else folder).base_model_name_or_path
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    if not required:
        return None
    raise SystemExit(f"The adapter records the base model {recorded!r}, which is not a local folder. {DOWNLOAD_HINT}")


__all__ = ["DOWNLOAD_HINT", "add_source_options", "base_folder"]
