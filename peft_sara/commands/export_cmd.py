"""``peft-sara export ADAPTER --format F -o OUT``: a SaRA adapter as a LoRA (PEFT, diffusers, kohya) or a ``.diff``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .output import add_common_options, parse_arguments, print_json, print_table
from .sources_args import DOWNLOAD_HINT, add_source_options, base_folder

# peft_sara.export.formats' FORMATS less "merged" (merged models: `peft-sara merge`) and DTYPES, written out so that
# `--help` imports nothing heavy (a test keeps them equal)
EXPORT_FORMATS = ("peft-lora", "diffusers", "kohya", "diff")
EXPORT_DTYPES = ("bfloat16", "float16", "float32")
LAYER_COLUMNS = (
    ("component", "component"),
    ("module", "layer"),
    ("rank", "rank"),
    ("max_rank", "max"),
    ("effective_rank", "eff. rank"),
    ("relative_error", "rel. error"),
)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``peft-sara export``."""
    parser = argparse.ArgumentParser(
        prog="peft-sara export",
        description="Export a SaRA adapter for tools that read only LoRA or weight-difference files. LoRA formats "
        "factorise each layer's update by truncated SVD (convs as LoCon: a k x k down conv, a 1 x 1 up conv) and "
        "report each layer's relative Frobenius error; 'diff' is exact and dense. Formats: peft-lora (PEFT LoRA "
        "folder), diffusers (pytorch_lora_weights.safetensors for pipe.load_lora_weights), kohya (lora_unet_* file "
        "for ComfyUI / A1111 / Forge), diff (ComfyUI / A1111 full-difference file). The base model is needed only "
        "when the adapter's files cannot say how a layer is laid out (the error names the layer).",
    )
    parser.add_argument("adapter", help="SaRA adapter folder, or Hub repo id")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="output format")
    parser.add_argument(
        "--rank",
        default="full",
        help="LoRA rank: an integer, 'full' (exact up to float error; the default) or an energy fraction such as 0.99",
    )
    parser.add_argument(
        "-o", "--output", required=True, type=Path, help="a folder (peft-lora, diffusers) or a .safetensors file"
    )
    parser.add_argument("--components", nargs="+", default=None, help="only these pipeline components")
    parser.add_argument(
        "--component",
        default=None,
        help="the pipeline component (unet, transformer, text_encoder, ...) a single-model adapter (its files at the "
        "root of the folder) was trained for, where its files do not record it",
    )
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32", help="tensor dtype in the output")
    add_source_options(parser)
    add_common_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``peft-sara export``."""
    parser = build_parser()
    args = parse_arguments(parser, argv)
    from ..atomic import refuse_overlapping_output
    from ..conversion import BaseModelRequired, export_adapter, load_adapted, parse_rank, read_adapter_files
    from ..export.lowrank import describe_rank

    try:
        rank = parse_rank(args.rank)
    except ValueError as err:
        parser.error(f"argument --rank: {err}")
    refuse_overlapping_output(args.output, [args.adapter, args.base])
    base = base_folder(args, required=False)
    refuse_overlapping_output(args.output, [base])  # the base the adapter records is read too
    if base is not None:
        source = load_adapted(base, args.adapter, args.subfolder, args.revision, args.token)
    else:  # the adapter's files record every layer's shape and layout: no base model needed
        try:
            source = read_adapter_files(args.adapter, args.subfolder, args.revision, args.token, args.component)
        except BaseModelRequired as err:
            raise SystemExit(f"{err.cli_message} {DOWNLOAD_HINT}") from None
    result = export_adapter(
        source,
        args.output,
        args.format,
        rank=rank,
        components=args.components,
        dtype=args.dtype,
        progress=not args.quiet and not args.json,
    )
    report = result.summary()
    if args.json:
        print_json(report)
        return 0
    if result.lora is not None:
        print_table(report["layers"], LAYER_COLUMNS)
        print()
        print(
            f"{describe_rank(rank)}: total relative error {report['total_relative_error']:.3e} "
            f"(largest per layer {report['max_layer_relative_error']:.3e}), {report['lora_parameters']:,} LoRA "
            "parameters"
        )
    else:
        print(f"{len(report['layers'])} layers written as exact dense differences")
    print("wrote " + ", ".join(report["paths"]))
    return 0


__all__ = ["main", "build_parser"]
