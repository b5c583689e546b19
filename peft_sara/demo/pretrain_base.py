"""The demo's pretrained base model, shipped with the package so that the demo starts fine-tuning at once.

``peft_sara/demo/pretrained/digits/`` holds the class-conditional UNet that :func:`peft_sara.demo.diffusion.pretrain`
makes from the default settings (:class:`~peft_sara.demo.settings.DemoSettings` on the digits), trained on one torch
thread, plus ``pretrain_info.json``: the settings' cache key, a SHA-256 of the weights, the losses and the time it
took. The demo uses it when its settings have the same key and the weights hash matches; other settings (``--quick``,
another dataset, other pretraining steps) and ``--pretrain`` train a base as before (cached in the user's cache).

Reproduce it (bitwise on the same CPU type; about 2 minutes of one core)::

    python -m peft_sara.demo.pretrain_base --check            # retrain and compare with the shipped weights
    python -m peft_sara.demo.pretrain_base --output FOLDER     # write a fresh copy (the shipped folder by default)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from ..atomic import folder_writer
from .data import load_splits
from .diffusion import PretrainResult, build_noise_scheduler, build_unet, pretrain
from .settings import DemoSettings, cache_key

SHIPPED_FOLDER = Path(__file__).parent / "pretrained" / "digits"
INFO_NAME = "pretrain_info.json"
PRETRAIN_THREADS = 1  # one thread: the same bits on every run (two threads may sum in another order)


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights: every state-dict entry's name, dtype, shape and bytes, in name order (the same
    for any file format the weights are stored in)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def shipped_info(folder: Path = SHIPPED_FOLDER) -> dict[str, Any] | None:
    """The record of the shipped base (``pretrain_info.json``), or ``None`` if the package has none."""
    path = folder / INFO_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def shipped_base(settings: DemoSettings, folder: Path = SHIPPED_FOLDER) -> PretrainResult | None:
    """The shipped base model if it was pretrained with ``settings``' pretraining settings, else ``None``.

    Raises ``RuntimeError`` if the shipped weights do not match their recorded hash (a damaged installation)."""
    info = shipped_info(folder)
    if info is None or info["cache_key"] != cache_key(settings):
        return None
    unet = UNet2DModel.from_pretrained(folder).eval()
    digest = weights_sha256(unet)
    if digest != info["weights_sha256"]:
        raise RuntimeError(
            f"The demo's shipped base model in {folder} does not match its recorded hash ({digest[:12]} instead of "
            f"{info['weights_sha256'][:12]}): reinstall peft-sara, or run the demo with --pretrain."
        )
    return PretrainResult(unet, info["losses"], info["seconds"], reused_from=str(folder), saved_to=None, shipped=True)


def pretrain_default_base(settings: DemoSettings | None = None) -> tuple[UNet2DModel, dict[str, Any]]:
    """Pretrain the base of ``settings`` (default: the demo's defaults) on :data:`PRETRAIN_THREADS` thread(s), and
    return it with its record."""
    settings = settings or DemoSettings()
    splits = load_splits(settings.dataset, settings.heldout_fraction, settings.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(PRETRAIN_THREADS)
    start = time.perf_counter()
    try:
        unet = build_unet(settings.unet_config, settings.seed)
        losses = pretrain(
            unet,
            build_noise_scheduler(),
            splits.train_images,
            splits.train_labels,
            settings.pretrain_steps,
            settings.pretrain_batch_size,
            settings.pretrain_learning_rate,
            settings.seed,
            settings.pretrain_ema_decay,
        )
    finally:
        torch.set_num_threads(previous_threads)
    info = {
        "cache_key": cache_key(settings),
        "dataset": settings.dataset,
        "pretrain_steps": settings.pretrain_steps,
        "threads": PRETRAIN_THREADS,
        "torch": torch.__version__.split("+")[0],
        "weights_sha256": weights_sha256(unet),
        "seconds": round(time.perf_counter() - start, 1),
        "losses": losses,
    }
    return unet, info


def write_base(unet: UNet2DModel, info: dict[str, Any], folder: Path) -> None:
    """Save ``unet`` (diffusers' ``save_pretrained``: config.json + safetensors) and its record into ``folder``, published
    as one unit (``peft_sara.atomic.folder_writer``): a killed write leaves the previous base or this one."""
    with folder_writer(folder) as staging:
        unet.save_pretrained(staging)
        (staging / INFO_NAME).write_text(json.dumps(info, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m peft_sara.demo.pretrain_base``: pretrain the demo's default base; write it or check it."""
    parser = argparse.ArgumentParser(
        prog="python -m peft_sara.demo.pretrain_base",
        description="Pretrain the demo's default base model (digits, the demo's default settings, one torch thread) "
        "and write it, or compare it bitwise with the one shipped in the package.",
    )
    parser.add_argument("--output", type=Path, default=SHIPPED_FOLDER, help=f"where to write it ({SHIPPED_FOLDER})")
    parser.add_argument("--check", action="store_true", help="write nothing: compare with the shipped weights")
    args = parser.parse_args(argv)
    unet, info = pretrain_default_base()
    print(f"pretrained in {info['seconds']:.0f} s; weights sha256 {info['weights_sha256']}")
    if args.check:
        shipped = shipped_info()
        if shipped is None:
            raise SystemExit("The package ships no demo base model to compare with.")
        same = shipped["weights_sha256"] == info["weights_sha256"] and shipped["cache_key"] == info["cache_key"]
        print(f"shipped weights sha256 {shipped['weights_sha256']}: {'identical' if same else 'DIFFERENT'}")
        return 0 if same else 1
    write_base(unet, info, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
