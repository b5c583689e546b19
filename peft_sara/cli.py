"""The ``peft-sara`` command line (also ``python -m peft_sara``).

Each subcommand is a module with a ``main(argv) -> int`` that owns its own arguments and ``--help``
(``peft_sara/commands/``, and the demo's own command line):

    peft-sara inspect ADAPTER                         # per-layer entries, density, ||dW||, effective rank, file size
    peft-sara analyze MODEL [--inputs x.safetensors]  # the paper's small-weight observation on a local model
    peft-sara export ADAPTER --format kohya --rank 16 -o style.safetensors   # LoRA / .diff for other tools
    peft-sara merge BASE ADAPTER -o OUT               # the base with the adapter baked in (save_pretrained)
    peft-sara push ADAPTER user/name                  # upload with the full SaRA model card
    peft-sara demo [--quick] [--output-dir DIR] ...   # the built-in SaRA vs LoRA fine-tune (python -m peft_sara.demo)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import demo
from .commands import analyze_cmd, export_cmd, inspect_cmd, merge_cmd, push_cmd
from .constants import __version__


@dataclass(frozen=True)
class Subcommand:
    """One ``peft-sara`` subcommand: a one-line summary and its entry point (which parses the remaining arguments)."""

    summary: str
    main: Callable[[list[str]], int | None]


SUBCOMMANDS: dict[str, Subcommand] = {
    "inspect": Subcommand("per-layer statistics of a saved SaRA adapter (folder or Hub id)", inspect_cmd.main),
    "analyze": Subcommand("fraction of tiny weights per layer of a model, histogram, zeroing test", analyze_cmd.main),
    "export": Subcommand("write an adapter as a LoRA (peft-lora, diffusers, kohya) or a .diff file", export_cmd.main),
    "merge": Subcommand("save a base pipeline / model with the adapter merged into its weights", merge_cmd.main),
    "push": Subcommand("upload an adapter folder to the Hub with the full SaRA model card", push_cmd.main),
    "demo": Subcommand("fine-tune a small digit diffusion model with SaRA and LoRA on CPU, and compare", demo.main),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``--version`` and the list of subcommands."""
    listing = "\n".join(f"  {name:<10} {command.summary}" for name, command in SUBCOMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="peft-sara",
        description="SaRA (progressive sparse low-rank adaptation) for PEFT and diffusers.",
        epilog=f"subcommands:\n{listing}\n\nRun `peft-sara <subcommand> --help` for its options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"peft-sara {__version__}")
    parser.add_argument("subcommand", choices=sorted(SUBCOMMANDS), metavar="subcommand", help="what to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the subcommand")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peft-sara`` console script and ``python -m peft_sara``."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return SUBCOMMANDS[args.subcommand].main(args.args) or 0


__all__ = ["main", "build_parser", "SUBCOMMANDS"]
