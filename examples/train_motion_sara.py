"""Teach AnimateDiff a new motion (e.g. a camera move) with SaRA on its motion modules only.

The paper's AnimateDiff experiment as a diffusers script: a Stable Diffusion 1.x pipeline plus a ``MotionAdapter``
make an ``AnimateDiffPipeline`` whose UNet (``UNetMotionModel``) interleaves the image layers with temporal "motion
modules". SaRA adapts the motion modules' linear layers only (the image layers, text encoder and VAE stay frozen), on
a folder of short clips with captions. The adapter loads with ``peft_sara.load_sara_adapter`` into an
``AnimateDiffPipeline`` built on the same base and motion adapter. Copy this file (with the ``sara_*.py`` helpers
beside it) and edit it: its training loop is written out in ``main``.

    accelerate launch examples/train_motion_sara.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --motion_adapter_name_or_path guoyww/animatediff-motion-adapter-v1-5-2 \\
        --train_data_dir ./pans --num_frames 16 --sample_stride 4 --resolution 256 --beta_schedule linear \\
        --train_batch_size 1 --max_train_steps 2000 --threshold 2e-3 --lambda_rank 5e-4 --mixed_precision fp16 \\
        --gradient_checkpointing --checkpointing_steps 500 --validation_prompt "a castle, camera pans left" \\
        --output_dir sara-pan-left

``--train_data_dir`` holds one clip per line of its ``metadata.jsonl``: ``{"file_name": "clip-001", "text": "a
caption"}``, where ``file_name`` is a folder of frames (PNG / JPEG, in name order) or a video file (``.gif`` with
Pillow; ``.mp4`` / ``.webm`` / ``.mov`` need ``imageio``). Every clip gives ``--num_frames`` frames taken
``--sample_stride`` apart from its start, resized and cropped alike (``--center_crop`` for exact resumption).

Outputs in ``--output_dir``: the adapter in PEFT format under ``unet/``, a model card, ``checkpoint-<step>/`` folders,
``validation-*.gif`` previews (Pillow) and, with ``--export_lora_rank``, ``pytorch_lora_weights.safetensors`` (a motion
LoRA that ``AnimateDiffPipeline.load_lora_weights`` reads).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import AnimateDiffPipeline, DDPMScheduler, DiffusionPipeline, MotionAdapter
from diffusers.utils import export_to_gif, load_video, make_image_grid
from PIL import Image
from tqdm.auto import tqdm

from peft_sara.export.sources import dtype_kwargs
from peft_sara.training import checkpoint_folder, remove_old_checkpoints, save_training_checkpoint, unwrap_optimizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sara_*.py helpers live beside this script
import sara_args  # noqa: E402
import sara_data  # noqa: E402
import sara_losses  # noqa: E402
import sara_models  # noqa: E402
import sara_outputs  # noqa: E402
import sara_setup  # noqa: E402

logger = get_logger(__name__, log_level="INFO")

# The linear layers of the temporal transformers: attention projections and feed-forward. Their proj_in / proj_out are
# called as `proj_in(input=...)`, a keyword that PEFT tuner layers (SaRA's included) do not take.
MOTION_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
KEYWORD_CALLED = ("proj_in", "proj_out")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("motion model and clips").add_argument
    data(
        "--motion_adapter_name_or_path",
        default=None,
        help="A diffusers MotionAdapter (Hub id or folder); omit it if --pretrained_model_name_or_path is an "
        "AnimateDiff pipeline.",
    )
    data("--train_data_dir", required=True, help="Folder of clips with metadata.jsonl (file_name, text).")
    data("--caption_column", default="text", help="metadata.jsonl key holding the captions (a string or a list).")
    data("--num_frames", type=int, default=16, help="Frames per training clip (AnimateDiff: 16).")
    data("--sample_stride", type=int, default=4, help="Take every N-th frame of a clip (AnimateDiff: 4).")
    data("--max_train_samples", type=int, default=None, help="Train on the first N clips only (for debugging).")
    data(
        "--beta_schedule",
        choices=["linear", "scaled_linear"],
        default=None,
        help="Noise schedule of the training scheduler (default: the base pipeline's; AnimateDiff used linear).",
    )
    sara_args.add_common_arguments(parser, default_output_dir="sara-motion-model")
    parser.set_defaults(resolution=256)
    args = parser.parse_args(argv)
    return sara_args.check_common_arguments(parser, args)


def motion_targets(target_modules: str | None) -> str:
    """A full-match regex over the motion modules' layers (``--target_modules`` chooses among their names)."""
    names = target_modules.split(",") if target_modules else MOTION_LAYERS
    refused = [name for name in names if name in KEYWORD_CALLED]
    if refused:
        raise ValueError(
            f"--target_modules {refused[0]}: diffusers calls the motion modules' {' / '.join(KEYWORD_CALLED)} with "
            f"`input=`, which PEFT tuner layers do not accept; choose among {', '.join(MOTION_LAYERS)}."
        )
    return r".*motion_modules\..*\.(" + "|".join(re.escape(name) for name in names) + ")"


def read_clip(path: Path) -> list[Image.Image]:
    """The frames of a clip: a folder of images in name order, or a video file (diffusers' ``load_video``)."""
    if path.is_dir():
        return [Image.open(frame) for frame in sara_data.image_files(path)]
    return load_video(str(path))


class ClipDataset(torch.utils.data.Dataset):
    """The clips of ``metadata.jsonl``: ``pixel_values`` (frames x 3 x H x W in ``[-1, 1]``) and ``caption``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        root = Path(args.train_data_dir)
        lines = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines() if line.strip()]
        if args.max_train_samples is not None:
            lines = lines[: args.max_train_samples]
        missing = [line.get("file_name") for line in lines if not (root / str(line.get("file_name"))).exists()]
        if missing or any(args.caption_column not in line for line in lines):
            raise ValueError(
                f"Every line of {root / 'metadata.jsonl'} needs a 'file_name' (a frames folder or video file in "
                f"{root}) and a '{args.caption_column}'; missing clips: {missing[:3]}."
            )
        self.clips = [(root / line["file_name"], line[args.caption_column]) for line in lines]

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, caption = self.clips[index]
        frames = read_clip(path)
        span = (self.args.num_frames - 1) * self.args.sample_stride + 1
        if len(frames) < span:
            raise ValueError(
                f"{path} has {len(frames)} frames; --num_frames {self.args.num_frames} at --sample_stride "
                f"{self.args.sample_stride} needs {span}."
            )
        first = sara_data.resize_and_crop(frames[0], self.args)
        pixel_values = [first["pixel_values"]] + [
            sara_data.resize_and_crop(frame, self.args, first["crop_top_left"])["pixel_values"]
            for frame in frames[self.args.sample_stride : span : self.args.sample_stride]
        ]
        return {"pixel_values": torch.stack(pixel_values), "caption": caption}


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Clips stacked into batch x frames x 3 x H x W, with their captions."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]).contiguous().float(),
        "captions": [example["caption"] for example in examples],
    }


def load_animatediff(args: argparse.Namespace, weight_dtype: torch.dtype, **components: Any) -> AnimateDiffPipeline:
    """The base SD pipeline with the motion adapter, as an ``AnimateDiffPipeline`` (its UNet a ``UNetMotionModel``)."""
    if args.motion_adapter_name_or_path is not None:
        components["motion_adapter"] = MotionAdapter.from_pretrained(
            args.motion_adapter_name_or_path,
            cache_dir=args.cache_dir,
            **dtype_kwargs(MotionAdapter, weight_dtype),
        )
    else:
        config = DiffusionPipeline.load_config(
            args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir
        )
        if config.get("motion_adapter", [None, None]) == [None, None]:
            raise ValueError(
                f"{args.pretrained_model_name_or_path} has no motion adapter: pass --motion_adapter_name_or_path "
                "(e.g. guoyww/animatediff-motion-adapter-v1-5-2)."
            )
    return sara_models.load_pipeline(args, weight_dtype, pipeline_class=AnimateDiffPipeline, **components)


def log_validation(
    pipe: AnimateDiffPipeline, args: argparse.Namespace, accelerator: Accelerator, name: str, step: int
) -> list[Image.Image]:
    """Generate ``num_validation_images`` clips with a fixed seed, save them side by side as one GIF, log the frames."""
    outputs = sara_outputs.generate_validation(pipe, args, accelerator, name, num_frames=args.num_frames)
    clips = [output.frames[0] for output in outputs]
    frames = [make_image_grid(list(frame), rows=1, cols=len(clips)) for frame in zip(*clips)]
    export_to_gif(frames, os.path.join(args.output_dir, f"validation-{name}.gif"))
    sara_outputs.log_images(accelerator, name, frames, step, args.validation_prompt)
    return frames


def usage_lines(args: argparse.Namespace, repo_id: str | None) -> list[str]:
    """How to load the adapter into an ``AnimateDiffPipeline``, for the model card."""
    motion = f'MotionAdapter.from_pretrained("{args.motion_adapter_name_or_path or "<motion-adapter>"}")'
    return [
        "",
        "Load it into an `AnimateDiffPipeline` on the same base and motion adapter:",
        "",
        "```python",
        "import peft_sara",
        "from diffusers import AnimateDiffPipeline, MotionAdapter",
        "from diffusers.utils import export_to_gif",
        "",
        f'pipe = AnimateDiffPipeline.from_pretrained("{args.pretrained_model_name_or_path}", motion_adapter={motion})',
        f'peft_sara.load_sara_adapter(pipe, "{repo_id or args.output_dir}")',
        f'export_to_gif(pipe("{args.validation_prompt or "a castle"}", num_frames={args.num_frames}).frames[0], '
        '"clip.gif")',
        "```",
    ]


def main(args: argparse.Namespace) -> None:
    accelerator = sara_setup.make_accelerator(args)
    repo_id = sara_outputs.create_hub_repo(args, accelerator)
    weight_dtype = sara_setup.weight_dtype_of(accelerator)

    # 1. The AnimateDiff pipeline; SaRA on the motion modules of its UNet only.
    vae = sara_models.load_vae(args, weight_dtype)
    pipe = load_animatediff(args, weight_dtype, vae=vae)
    noise_scheduler = sara_models.noise_scheduler_for(args, pipe)
    if args.beta_schedule is not None:
        noise_scheduler = DDPMScheduler.from_config(noise_scheduler.config, beta_schedule=args.beta_schedule)
    sara_models.quantize_base(args, pipe, accelerator.device, weight_dtype)  # --base_quantization
    pipe.to(accelerator.device)
    modules = sara_models.trained_modules(args, pipe, denoiser_targets=motion_targets(args.target_modules))

    # 2. Clips; the optimizer, LR schedule and SaRA helper; resume (before `prepare`, in place), prepare.
    train_dataset = ClipDataset(args)
    components, train_dataloader, steps_per_epoch, deepspeed = sara_setup.setup_training(
        args, accelerator, modules, train_dataset, collate
    )
    denoiser = components[0].prepared

    # 3. Train: the loop of diffusers' LoRA scripts, plus SaRA's low-rank loss (once per optimizer step) and the SaRA
    #    helpers' step after the optimizers' (progressive re-selection, in place).
    models = [component.prepared for component in components]
    helpers = [component.helper for component in components]
    trainable = [param for component in components for param in component.trainable_parameters()]

    def validate(name: str, step: int) -> None:
        """The validation clips (main process only), with the trained models in eval mode meanwhile."""
        if not (args.validation_prompt and accelerator.is_main_process):
            return
        for model in models:
            model.eval()
        log_validation(pipe, args, accelerator, name, step)
        for model in models:
            model.train()

    if accelerator.is_main_process:
        config = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
        accelerator.init_trackers("motion-sara", config=config)
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
                pixel_values = sara_data.random_flip(batch, args)  # whole clips: batch x frames x 3 x H x W
                batch_size, num_frames = pixel_values.shape[:2]
                latents = sara_losses.encode_latents(vae, pixel_values.flatten(0, 1), weight_dtype)
                latents = latents.unflatten(0, (batch_size, num_frames)).transpose(1, 2)  # batch x C x frames x h x w
                captions = sara_data.pick_captions(batch["captions"])
                conditioning = sara_losses.encode_prompts(pipe, captions, accelerator.device)
                # UNetMotionModel takes one prompt embedding per frame (AnimateDiffPipeline repeats them alike).
                embeds = conditioning["encoder_hidden_states"]
                conditioning["encoder_hidden_states"] = embeds.repeat_interleave(num_frames, 0)
                loss = sara_losses.ddpm_loss(denoiser, noise_scheduler, latents, conditioning, args).mean()
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

    # 4. Save, export, check the saved adapter from a fresh pipeline, card, push.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        sara_outputs.finish_training(
            args, accelerator, pipe, components, repo_id, global_step,
            fresh_pipeline=functools.partial(load_animatediff, args, weight_dtype, vae=vae),
            validate=log_validation,
            trained_with=f"`examples/train_motion_sara.py` on the clips of `{args.train_data_dir}` ({args.num_frames} "
            f"frames, stride {args.sample_stride}), SaRA on the motion modules only",
            tags=["animatediff", "text-to-video"],
            pipeline_tag="text-to-video",
            preview="validation-final.gif",
            notes=usage_lines(args, repo_id),
        )  # fmt: skip
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
