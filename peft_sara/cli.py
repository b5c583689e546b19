"""The ``peft-sara`` command line (also ``python -m peft_sara``).

Each subcommand is a module with a ``main(argv) -> int`` that owns its own arguments and ``--help``
(``peft_sara/commands/``, and the demo's own command line). Nothing heavy is imported before a subcommand's arguments
are parsed: ``import peft_sara`` does not register SaRA with PEFT when it starts this command line (see
``peft_sara/__init__.py``), the subcommand modules import torch, diffusers and PEFT inside ``main`` and register SaRA
there (``commands.output.parse_arguments``), so ``--help`` of every subcommand answers at once; ``inspect`` of one
adapter reads its files with torch and safetensors alone (no PEFT, diffusers or transformers):

    peft-sara inspect ADAPTER                         # per-layer entries, density, ||dW||, effective rank, file size
    peft-sara analyze MODEL [--inputs x.safetensors]  # the paper's small-weight observation on a local model
    peft-sara export ADAPTER --format kohya --rank 16 -o style.safetensors   # LoRA / .diff for other tools
    peft-sara merge BASE ADAPTER -o OUT               # the base with the adapter baked in (save_pretrained)
    peft-sara push ADAPTER user/name                  # upload with the full SaRA model card
    peft-sara demo [--quick] [--output-dir DIR] ...   # the built-in SaRA vs LoRA fine-tune (python -m peft_sara.demo)

Optional libraries' import-time log lines (torchao, bitsandbytes) are dropped unless ``--verbose`` or ``--debug``
is given (:mod:`peft_sara.quiet`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .constants import __version__
from .quiet import drop_import_noise, keep_import_noise

# Errors that mean "this input cannot be used" (a missing or hostile file, a bad option value): exit status 2.
BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, KeyError)
DEBUG_FLAG = "--debug"
VERBOSE_FLAG = "--verbose"


@dataclass(frozen=True)
class Subcommand:
    """One ``peft-sara`` subcommand: a one-line summary and the module whose ``main(argv)`` runs it. The module is
    imported only when the subcommand runs, and imports nothing heavy itself until its arguments are parsed."""

    summary: str
    module: str

    def main(self, argv: list[str]) -> int | None:
        """Import the subcommand's module and run it."""
        return importlib.import_module(self.module, __package__).main(argv)


SUBCOMMANDS: dict[str, Subcommand] = {
    "inspect": Subcommand("per-layer statistics of a saved SaRA adapter (folder or Hub id)", ".commands.inspect_cmd"),
    "analyze": Subcommand(
        "fraction of tiny weights per layer of a model, histogram, zeroing test", ".commands.analyze_cmd"
    ),
    "export": Subcommand(
        "write an adapter as a LoRA (peft-lora, diffusers, kohya) or a .diff file", ".commands.export_cmd"
    ),
    "merge": Subcommand("save a base pipeline / model with the adapter merged into its weights", ".commands.merge_cmd"),
    "push": Subcommand("upload an adapter folder to the Hub with the full SaRA model card", ".commands.push_cmd"),
    "plan": Subcommand("peak training memory of SaRA / LoRA / full FT, planned on fake tensors", ".commands.plan_cmd"),
    "demo": Subcommand("fine-tune a small digit diffusion model with SaRA and LoRA on CPU, and compare", ".demo"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``--version``, ``--debug`` and the list of subcommands."""
    listing = "\n".join(f"  {name:<10} {command.summary}" for name, command in SUBCOMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="peft-sara",
        description="SaRA (progressive sparse low-rank adaptation) for PEFT and diffusers.",
        epilog=f"subcommands:\n{listing}\n\nRun `peft-sara <subcommand> --help` for its options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"peft-sara {__version__}")
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        help="print the full traceback of an error, and every third-party log line (also accepted after the "
        "subcommand)",
    )
    parser.add_argument(
        VERBOSE_FLAG,
        action="store_true",
        help="also print what optional libraries log as they load (hidden by default; also accepted after the "
        "subcommand)",
    )
    parser.add_argument("subcommand", choices=sorted(SUBCOMMANDS), metavar="subcommand", help="what to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the subcommand")
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}" if not isinstance(err, ValueError) else text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peft-sara`` console script and ``python -m peft_sara``.

    Errors end the command with one line on stderr (no traceback unless ``--debug``): exit status 2 for input that
    cannot be used (a missing, corrupted or hostile file, a refused output path), 1 for anything else.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    if debug or VERBOSE_FLAG in argv:
        keep_import_noise()
    else:
        drop_import_noise()
    args = build_parser().parse_args([arg for arg in argv if arg not in (DEBUG_FLAG, VERBOSE_FLAG)])
    try:
        return SUBCOMMANDS[args.subcommand].main(args.args) or 0
    except KeyboardInterrupt:
        print(f"peft-sara {args.subcommand}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        status = 2 if isinstance(err, BAD_INPUT_ERRORS) else 1
        hint = "" if status == 2 else f" (run with {DEBUG_FLAG} for the traceback)"
        print(f"peft-sara {args.subcommand}: error: {_one_line(err)}{hint}", file=sys.stderr)
        return status


__all__ = ["main", "build_parser", "SUBCOMMANDS"]
