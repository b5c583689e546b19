"""The training loop of the SaRA scripts: gradient accumulation, SaRA's low-rank loss once per optimizer step,
clipping, one optimizer / scheduler / SaRA-helper step per component (progressive re-selection in place),
checkpoints (:func:`peft_sara.training.save_training_checkpoint`), validation."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from peft_sara.training import (
    TrainedComponent,
    checkpoint_folder,
    remove_old_checkpoints,
    save_training_checkpoint,
    unwrap_optimizer,
)

logger = get_logger(__name__, log_level="INFO")


def train(
    args: argparse.Namespace,
    accelerator: Accelerator,
    components: Sequence[TrainedComponent],
    train_dataloader: torch.utils.data.DataLoader,
    steps_per_epoch: int,
    compute_loss: Callable[[dict[str, Any]], torch.Tensor],
    validate: Callable[[str, int], None] | None = None,
    deepspeed: bool = False,
    project_name: str = "sara",
) -> int:
    """The training loop: gradient accumulation, SaRA's low-rank loss once per optimizer step, clipping, one optimizer
    / scheduler / helper step per component (progressive re-selection in place), checkpoints, validation.

    ``compute_loss(batch)`` returns the batch's scalar loss; ``validate(name, step)`` renders validation output (main
    process only, models in eval mode). Returns the last global step.
    """
    models = [component.prepared for component in components]
    helpers = [component.helper for component in components]
    trainable = [param for component in components for param in component.trainable_parameters()]
    global_step = helpers[0].global_step
    if accelerator.is_main_process:
        config = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))}
        accelerator.init_trackers(project_name, config=config)

    logger.info("***** Running training *****")
    logger.info(
        f"  Examples = {len(train_dataloader.dataset)}, epochs = {args.num_train_epochs}, "
        f"optimizer steps = {args.max_train_steps}"
    )
    logger.info(
        f"  Batch size per device = {args.train_batch_size}, accumulation = {args.gradient_accumulation_steps}, "
        f"total batch = {args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps}"
    )
    for component in components:
        logger.info(
            f"  SaRA on {component.name}: {component.helper.config.selection_rule}, "
            f"{component.helper.trainable_count():,} trainable entries, re-selection at step "
            f"{component.helper.progressive_step}"
        )

    def run_validation(name: str, every: int | None, count: int) -> None:
        """Validate as ``name`` on the main process when ``every`` (``--validation_steps`` / ``_epochs``) divides
        ``count``."""
        if validate is None or not every or count % every or not accelerator.is_main_process:
            return
        for model in models:
            model.eval()
        validate(name, global_step)
        for model in models:
            model.train()

    first_epoch = global_step // steps_per_epoch
    batches_to_skip = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    for epoch in range(first_epoch, args.num_train_epochs):
        for model in models:
            model.train()
        loader = train_dataloader
        if epoch == first_epoch and batches_to_skip:
            loader = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
        loader.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(*models):
                loss = compute_loss(batch)
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
                if accelerator.is_main_process and args.checkpoints_total_limit is not None:
                    for removed in remove_old_checkpoints(args.output_dir, keep=args.checkpoints_total_limit - 1):
                        logger.info(f"Removed {removed} (--checkpoints_total_limit {args.checkpoints_total_limit})")
                if deepspeed:  # every rank writes its part
                    accelerator.save_state(save_path, exclude_frozen_parameters=True)
                elif accelerator.is_main_process:
                    save_training_checkpoint(save_path, components)
                logger.info(f"Saved {save_path}")
            run_validation(f"step-{global_step}", args.validation_steps, global_step)
            if global_step >= args.max_train_steps:
                break
        run_validation(f"epoch-{epoch}", args.validation_epochs, epoch)
    return global_step
