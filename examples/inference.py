"""Generate images with a SaRA adapter and save them as one PNG grid.

With ``--compare`` the grid has two rows: the base pipeline on top, the same seeds with the adapter below.

    python examples/inference.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --adapter your-username/sara-style --prompt "a castle on a hill" \\
        --num_images 4 --steps 30 --seed 0 --scale 1.0 --compare --output grid.png

``--adapter`` is a local folder or a Hub repo id written by ``peft_sara.save_sara_adapter`` / ``push_sara_adapter``
(one subfolder per component), or a single-model adapter (``PeftModel.save_pretrained``) for the denoiser.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

import peft_sara
from peft_sara.export.sources import dtype_kwargs

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="Base pipeline: Hub id or folder.")
    parser.add_argument("--adapter", required=True, help="SaRA adapter: Hub repo id or folder.")
    parser.add_argument("--adapter_subfolder", default=None, help="Folder of the adapter inside the repo.")
    parser.add_argument("--adapter_revision", default=None, help="Branch, tag or commit of the adapter repo.")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--num_images", type=int, default=4, help="Images per row (one seed each).")
    parser.add_argument("--steps", type=int, default=30, help="Denoising steps.")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's.")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="Image i uses seed + i.")
    parser.add_argument("--scale", type=float, default=1.0, help="Adapter strength (1.0 = as trained).")
    parser.add_argument("--compare", action="store_true", help="Add a row generated without the adapter.")
    parser.add_argument("--fuse", action="store_true", help="Fuse the adapter into the weights (faster sampling).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="Default: float16 on CUDA, else float32.")
    parser.add_argument("--output", type=Path, default=Path("sara_grid.png"))
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.steps < 1:
        parser.error("--num_images and --steps must be >= 1.")
    return args


def generate(pipe: DiffusionPipeline, args: argparse.Namespace) -> np.ndarray:
    """``num_images`` images of ``prompt`` as floats in [0, 1], shape (n, H, W, 3); image i uses seed ``seed + i``."""
    generators = [torch.Generator("cpu").manual_seed(args.seed + i) for i in range(args.num_images)]
    kwargs = {"height": args.height, "width": args.width}
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = [args.negative_prompt] * args.num_images
    return pipe(
        [args.prompt] * args.num_images,
        num_inference_steps=args.steps,
        generator=generators,
        output_type="np",
        **kwargs,
    ).images


def make_grid(rows: list[np.ndarray]) -> Image.Image:
    """Tile rows of equally sized images (each row an array (n, H, W, 3) in [0, 1]) into one picture."""
    tiles = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    return Image.fromarray((np.clip(tiles, 0, 1) * 255).round().astype(np.uint8))


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    pipe = DiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, **dtype_kwargs(DiffusionPipeline, dtype)
    )
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)

    rows = []
    if args.compare:
        rows.append(generate(pipe, args))  # before loading: exactly the base pipeline
    adapter = peft_sara.load_sara_adapter(
        pipe,
        args.adapter,
        subfolder=args.adapter_subfolder,
        revision=args.adapter_revision,
        scale=args.scale,
        fuse=args.fuse,
    )
    rows.append(generate(pipe, args))

    args.output.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows).save(args.output)
    layout = "top: base, bottom: with adapter" if args.compare else "with adapter"
    print(f"Adapter '{adapter}' (scale {args.scale}{', fused' if args.fuse else ''}): wrote {args.output} ({layout}).")
    return args.output


if __name__ == "__main__":
    main()
