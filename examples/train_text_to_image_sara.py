"""Fine-tune a text-to-image model (SD 1.x / 2.x, SDXL, SD3 or Flux) on image-caption pairs with SaRA.

The diffusers ``train_text_to_image_lora.py`` / ``train_text_to_image_lora_sdxl.py`` workflow, with the same flags,
and a SaRA adapter instead of LoRA: only the smallest-magnitude ("temporarily ineffective") weights of the denoiser
are trained, as a sparse update, with the paper's nuclear-norm low-rank loss and progressive re-selection
(``peft_sara.training.SaRATrainingHelper``). The VAE and text encoders stay frozen unless ``--train_text_encoder``
(SaRA on the CLIP encoders too). Copy this file (with the ``sara_*.py`` helpers beside it) and edit it: its training
loop is written out in ``main``.

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

from accelerate.logging import get_logger
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from tqdm.auto import tqdm

from peft_sara.training import checkpoint_folder, remove_old_checkpoints, save_training_checkpoint, unwrap_optimizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sara_*.py helpers live beside this script
import sara_args  # noqa: E402
import sara_data  # noqa: E402
import sara_losses  # noqa: E402
import sara_models  # noqa: E402
import sara_outputs  # noqa: E402
import sara_setup  # noqa: E402

logger = get_logger(__name__, log_level="INFO")
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
    sara_models.quantize_base(args, pipe, accelerator.device, weight_dtype)  # --base_quantization
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

    # 4. Train: the loop of diffusers' LoRA scripts, plus SaRA's low-rank loss (once per optimizer step) and the SaRA
    #    helpers' step after the optimizers' (progressive re-selection, in place).
    models = [component.prepared for component in components]
    helpers = [component.helper for component in components]
    trainable = [param for component in components for param in component.trainable_parameters()]

    def validate(name: str, step: int) -> None:
        """The validation images (main process only), with the trained models in eval mode meanwhile."""
        if not (args.validation_prompt and accelerator.is_main_process):
            return
        for model in models:
            model.eval()
        sara_outputs.log_validation(pipe, args, accelerator, name, step)
        for model in models:
            model.train()

    if accelerator.is_main_process:
        config = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
        accelerator.init_trackers("text2image-sara", config=config)
    sara_setup.log_training_plan(args, accelerator, components, len(train_dataset))
    global_step = helpers[0].global_step  # > 0 when resumed
    first_epoch = global_step // steps_per_epoch
    batches_to_skip = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    for epoch in range(first_epoch, args.num_train_epochs):
        for model in models:
            model.train()
        loader = train_dataloader
        if epoch == first_epoch and batches_to_skip:  # resumed mid-epoch: the batches the run had not seen yet
            loader = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
        loader.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(*models):
                pixel_values = sara_data.random_flip(batch, args)  # here, not in the dataset: resuming stays exact
                captions = sara_data.pick_captions(batch["captions"])
                latents = sara_losses.encode_latents(vae, pixel_values, weight_dtype)
                conditioning = sara_losses.image_conditioning(
                    pipe, batch, captions, args, accelerator.device, text_encoders
                )
                loss = sara_losses.denoising_loss(pipe, denoiser, noise_scheduler, latents, conditioning, args).mean()
                total_loss = loss
                if accelerator.sync_gradients:
                    # The low-rank loss counts once per optimizer step: accelerator.backward divides every
                    # micro-batch's loss by the accumulation steps, so scale it back up.
                    regularization = sum(helper.regularization() for helper in helpers)
                    total_loss = loss + regularization * args.gradient_accumulation_steps
                accelerator.backward(total_loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                for component in components:
                    component.optimizer.step()
                    component.lr_scheduler.step()
                    component.optimizer.zero_grad()

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress_bar.update(1)
            for component in components:
                if args.use_8bit_adam and component.helper.reselection_due():
                    # Blockwise-quantized moments cannot be re-ordered entry by entry: restart them.
                    unwrap_optimizer(component.optimizer).state.clear()
                if component.helper.step():  # in place: same Parameters, optimizer state re-ordered
                    logger.info(
                        f"Step {global_step}: re-selected {component.name}, "
                        f"{component.helper.trainable_count():,} trainable entries left"
                    )
            logs = {
                "loss": loss.detach().item(),
                "rank_loss": sum(helper.last_regularization for helper in helpers),
                "lr": components[0].lr_scheduler.get_last_lr()[0],
            }
            progress_bar.set_postfix(**logs)
            accelerator.log(logs, step=global_step)

            if global_step % args.checkpointing_steps == 0:
                save_path = checkpoint_folder(args.output_dir, global_step)
                if deepspeed:  # every rank writes its part; published whole (peft_sara.atomic)
                    sara_setup.save_engine_checkpoint(accelerator, save_path)
                elif accelerator.is_main_process:
                    save_training_checkpoint(save_path, components)  # published whole (peft_sara.atomic)
                # Old checkpoints go only once the new one is complete: a killed save never leaves none.
                if accelerator.is_main_process and args.checkpoints_total_limit is not None:
                    for removed in remove_old_checkpoints(args.output_dir, keep=args.checkpoints_total_limit):
                        logger.info(f"Removed {removed} (--checkpoints_total_limit {args.checkpoints_total_limit})")
                logger.info(f"Saved {save_path}")
            if args.validation_steps and global_step % args.validation_steps == 0:
                validate(f"step-{global_step}", global_step)
            if global_step >= args.max_train_steps:
                break
        if args.validation_epochs and epoch % args.validation_epochs == 0:
            validate(f"epoch-{epoch}", global_step)

    # 5. Save the adapter (PEFT format, one folder per component) with a model card and the optional LoRA export;
    #    check that it loads by rendering the final validation images from a fresh pipeline; push.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        sara_outputs.finish_training(
            args, accelerator, pipe, components, repo_id, global_step,
            fresh_pipeline=functools.partial(sara_models.load_pipeline, args, weight_dtype, vae=vae),
            validate=sara_outputs.log_validation,
            trained_with=f"`examples/train_text_to_image_sara.py` on `{args.dataset_name or args.train_data_dir}`",
        )  # fmt: skip
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
