"""Fine-tune a text-to-image model (SD 1.x / 2.x, SDXL, SD3 or Flux) on image-caption pairs with SaRA.

The diffusers ``train_text_to_image_lora.py`` / ``train_text_to_image_lora_sdxl.py`` workflow, with the same flags,
and a SaRA adapter instead of LoRA: only the smallest-magnitude ("temporarily ineffective") weights of the denoiser
are trained, as a sparse update, with the paper's nuclear-norm low-rank loss and progressive re-selection
(``peft_sara.training.SaRATrainingHelper``). The VAE and text encoders stay frozen unless ``--train_text_encoder``
(SaRA on the CLIP encoders too). Copy this file (with the ``sara_*.py`` helpers beside it) and edit it.

    accelerate launch examples/train_text_to_image_sara.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --train_data_dir ./my_images --resolution 512 --center_crop --random_flip \\
        --train_batch_size 4 --gradient_accumulation_steps 1 --max_train_steps 5000 \\
        --threshold 2e-3 --lambda_rank 5e-4 --mixed_precision fp16 \\
        --checkpointing_steps 500 --validation_prompt "a photo in the style" --output_dir sara-style

SDXL: the same with ``--pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 --resolution 1024
--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix``; the UNet is conditioned on both text encoders and
on each image's original size and crop (``add_time_ids``). SD3 and Flux (``black-forest-labs/FLUX.1-dev``) train
their transformer with flow matching (``--weighting_scheme``; Flux also ``--guidance_scale``). ``--rank`` and the other
LoRA-only flags stop with a message saying what to use instead.

``--train_data_dir`` is an image folder with a ``metadata.jsonl`` (the paper's dataset layout), one line per image:
``{"file_name": "0001.png", "text": "a caption"}``. ``--dataset_name`` loads a Hub dataset instead.

Outputs in ``--output_dir``: the adapter in PEFT format under ``unet/`` (``transformer/`` for SD3 / Flux;
``text_encoder/``, ``text_encoder_2/`` when trained), a model card ``README.md``, ``checkpoint-<step>/`` folders (per
component: adapter + optimizer / scheduler / SaRA / RNG state, resumable with ``--resume_from_checkpoint``),
``validation-*.png`` grids and, with ``--export_lora_rank``, ``pytorch_lora_weights.safetensors`` (a LoRA that
``pipe.load_lora_weights`` reads). Load the adapter with ``peft_sara.load_sara_adapter(pipe, output_dir)``.

Resuming reproduces an uninterrupted run exactly when data preprocessing draws no random numbers: with
``--center_crop`` (or square images at ``--resolution``) and ``--dataloader_num_workers 0``. ``--random_flip`` is
applied in the training loop and keeps resumption exact.

Multi-process: ``accelerate launch --multi_gpu --num_processes N ...`` (DDP; add ``ACCELERATE_USE_CPU=1`` for CPU
processes over gloo). Progressive re-selection compacts the SaRA values in place, so the DDP wrapper built by
``accelerator.prepare`` stays valid and every rank keeps the same entries. Under DeepSpeed (ZeRO-2) checkpoints go
through ``accelerator.save_state`` (every rank writes its optimizer partition; the adapter is written beside them) and
re-selection is refused: DeepSpeed optimizes flattened fp32 copies whose state cannot be re-ordered. See
``docs/DISTRIBUTED.md`` for accelerate configs (FSDP: in your own loop, not with this script's checkpoints).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sara_*.py helpers live beside this script
import sara_args  # noqa: E402
import sara_data  # noqa: E402
import sara_loop  # noqa: E402
import sara_losses  # noqa: E402
import sara_models  # noqa: E402
import sara_outputs  # noqa: E402
import sara_setup  # noqa: E402
import sara_validation  # noqa: E402

SUPPORTED_PIPELINES = (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data").add_argument
    data("--dataset_name", default=None, help="Hub dataset (or a local dataset script / folder for load_dataset).")
    data("--dataset_config_name", default=None, help="Config of --dataset_name.")
    data("--train_data_dir", default=None, help="Image folder with metadata.jsonl (file_name, text).")
    data("--image_column", default="image", help="Dataset column holding the images.")
    data("--caption_column", default="text", help="Dataset column holding the captions (a string or a list).")
    data("--max_train_samples", type=int, default=None, help="Train on the first N samples only (for debugging).")
    sara_args.add_common_arguments(parser, default_output_dir="sara-model")
    sara_args.add_text_encoder_arguments(parser)
    sara_args.add_flow_matching_arguments(parser)
    args = parser.parse_args(argv)
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("Pass --dataset_name or --train_data_dir.")
    return sara_args.check_common_arguments(parser, args, needs=("datasets",))


def main(args: argparse.Namespace) -> None:
    accelerator = sara_setup.make_accelerator(args)
    repo_id = sara_outputs.create_hub_repo(args, accelerator)
    weight_dtype = sara_setup.weight_dtype_of(accelerator)

    # 1. The pipeline: its text encoders condition the denoiser, and it renders the validation images.
    vae = sara_models.load_vae(args, weight_dtype)
    pipe = sara_models.load_pipeline(args, weight_dtype, vae=vae)
    if not isinstance(pipe, SUPPORTED_PIPELINES):
        raise ValueError(
            f"This script trains {', '.join(cls.__name__ for cls in SUPPORTED_PIPELINES)} models; "
            f"{args.pretrained_model_name_or_path} is a {type(pipe).__name__}."
        )
    noise_scheduler = sara_models.noise_scheduler_for(args, pipe)
    pipe.to(accelerator.device)

    # 2. SaRA adapters, injected in place: the components stay diffusers / transformers models.
    modules = sara_models.trained_modules(args, pipe)

    # 3. Data; an optimizer, LR schedule and SaRA helper (low-rank loss, re-selection) per adapted component; resume
    #    (before `prepare`, in place) and prepare everything once.
    with accelerator.main_process_first():
        train_dataset = sara_data.load_image_dataset(
            args, args.train_data_dir, args.dataset_name, max_samples=args.max_train_samples
        )
    components, train_dataloader, steps_per_epoch, deepspeed = sara_setup.setup_training(
        args, accelerator, modules, train_dataset, sara_data.collate_images
    )
    denoiser = components[0].prepared
    text_encoders = {component.name: component.prepared for component in components[1:]}

    def compute_loss(batch: dict[str, Any]) -> torch.Tensor:
        pixel_values = sara_data.random_flip(batch, args)  # here, not in the dataset: resuming stays exact
        captions = sara_data.pick_captions(batch["captions"])
        latents = sara_losses.encode_latents(vae, pixel_values, weight_dtype)
        conditioning = sara_losses.image_conditioning(pipe, batch, captions, args, accelerator.device, text_encoders)
        return sara_losses.denoising_loss(pipe, denoiser, noise_scheduler, latents, conditioning, args).mean()

    # 4. Train.
    validate = (
        functools.partial(sara_validation.log_validation, pipe, args, accelerator) if args.validation_prompt else None
    )
    global_step = sara_loop.train(
        args, accelerator, components, train_dataloader, steps_per_epoch, compute_loss, validate, deepspeed,
        project_name="text2image-sara",
    )  # fmt: skip

    # 5. Save the adapter (PEFT format, one folder per component) with a model card and the optional LoRA export;
    #    check that it loads by rendering the final validation images from a fresh pipeline; push.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        sara_outputs.finish_training(
            args, accelerator, pipe, components, repo_id, global_step,
            fresh_pipeline=functools.partial(sara_models.load_pipeline, args, weight_dtype, vae=vae),
            validate=sara_validation.log_validation,
            trained_with=f"`examples/train_text_to_image_sara.py` on `{args.dataset_name or args.train_data_dir}`",
        )  # fmt: skip
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
