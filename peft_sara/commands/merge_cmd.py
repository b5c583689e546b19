"""``peft-sara merge BASE ADAPTER -o OUT``: the base pipeline or model with the adapter baked into its weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from .output import add_common_options, parse_arguments
from .sources_args import add_source_options


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``peft-sara merge``."""
    parser = argparse.ArgumentParser(
        prog="peft-sara merge",
        description="Merge a SaRA adapter into its base and save the result with save_pretrained (safetensors): a "
        "whole pipeline for a pipeline base, or the one model for a model base. Loads anywhere the base loads.",
    )
    parser.add_argument("base", type=Path, help="local folder of the base pipeline (model_index.json) or model")
    parser.add_argument("adapter", help="SaRA adapter folder, or Hub repo id")
    parser.add_argument("-o", "--output", required=True, type=Path, help="folder to write the merged model to")
    add_source_options(parser, base_option=False)
    add_common_options(parser, json_output=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``peft-sara merge``."""
    args = parse_arguments(build_parser(), argv)
    from ..atomic import refuse_overlapping_output
    from ..conversion import load_adapted, save_merged

    refuse_overlapping_output(args.output, [args.base, args.adapter])
    source = load_adapted(args.base, args.adapter, args.subfolder, args.revision, args.token, whole_pipeline=True)
    output = save_merged(source, args.output)
    print(f"wrote the merged model to {output}")
    return 0


__all__ = ["main", "build_parser"]
