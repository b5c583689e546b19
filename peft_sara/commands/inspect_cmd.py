"""``peft-sara inspect ADAPTER``: what a saved SaRA adapter holds, per layer and in total (no base model needed)."""

from __future__ import annotations

import argparse

from .output import add_common_options, human_bytes, parse_arguments, print_json, print_table, use_libraries

LAYER_COLUMNS = (
    ("module", "layer"),
    ("weight_shape", "weight"),
    ("trainable", "trainable"),
    ("frozen", "frozen"),
    ("density", "density"),
    ("delta_norm", "||dW||"),
    ("effective_rank", "eff. rank"),
    ("rank", "rank"),
)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``peft-sara inspect``."""
    parser = argparse.ArgumentParser(
        prog="peft-sara inspect",
        description="Per layer of a SaRA adapter: trainable and frozen entries, density, ||Delta_W||_F, effective rank "
        "(exp of the singular-value entropy) and numerical rank; per component the file size; totals and base model.",
    )
    parser.add_argument(
        "adapter",
        nargs="+",
        help="adapter folder, or Hub repo id (user/name); several: also the hotswap slot they need",
    )
    parser.add_argument("--subfolder", default=None, help="folder inside the adapter repo / folder")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of the Hub repo")
    parser.add_argument("--token", default=None, help="Hub token for private repos")
    parser.add_argument("--no-rank", action="store_true", help="skip the per-layer SVD (faster on large adapters)")
    add_common_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``peft-sara inspect``."""
    # One adapter: its files are read (no PEFT, diffusers or transformers import: see peft_sara.export.adapter_stats).
    args = parse_arguments(build_parser(), argv, libraries=False)
    if len(args.adapter) > 1:  # several adapters: the hotswap slot that serves them all
        use_libraries(args)
        from ..hotswap import hotswap_sizing

        sizing = hotswap_sizing(args.adapter, revision=args.revision, token=args.token)
        if args.json:
            print_json({"max_fraction": sizing.max_fraction, "largest": sizing.largest, "layers": sizing.layers})
        else:
            print(f"A hotswap slot for these {len(args.adapter)} adapters (largest layer: {sizing.largest}):")
            print(f"  {sizing.call()}")
        return 0
    from ..export.adapter_stats import inspect_adapter

    report = inspect_adapter(
        args.adapter[0],
        subfolder=args.subfolder,
        revision=args.revision,
        token=args.token,
        ranks=not args.no_rank,
        progress=not args.quiet and not args.json,
    )
    if args.json:
        print_json(report)
        return 0
    print(f"SaRA adapter {report['adapter']}  (base model: {report['base_model'] or 'unknown'})")
    for component in report["components"]:
        print()
        print(
            f"[{component['component'] or 'model'}] {component['selection']}; "
            f"file {human_bytes(component['file_bytes'])}"
        )
        print_table(component["layers"], LAYER_COLUMNS)
    totals = report["totals"]
    density = f"{totals['density']:.4%}" if totals["density"] is not None else "-"
    print()
    print(
        f"total: {totals['layers']} layers, {totals['trainable']:,} trainable + {totals['frozen']:,} frozen entries, "
        f"density {density}, ||Delta_W||_F {totals['delta_norm']:.4g}, files {human_bytes(totals['file_bytes'])}"
    )
    return 0


__all__ = ["main", "build_parser"]
