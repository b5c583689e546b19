"""Setting up a SaRA training run with accelerate: the Accelerator, the step plan, an optimizer / LR schedule / SaRA
helper per adapted component (:class:`peft_sara.training.TrainedComponent`), resuming and ``accelerator.prepare``, and
the plan logged before the loop."""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DistributedType,
    ProjectConfiguration,
    set_seed,
)
from diffusers.optimization import get_scheduler
from sara_models import TEXT_ENCODERS
from torch import nn

from peft_sara import SaRAConfig
from peft_sara.adapter_files import save_injected_adapter
from peft_sara.atomic import distributed_folder_writer
from peft_sara.training import (
    DEFAULT_ADAPTER_NAME,
    SaRATrainingHelper,
    TrainedComponent,
    latest_checkpoint,
    paper_learning_rate,
    resume_from_checkpoint,
)
from peft_sara.tuner.names import DEFAULT_THRESHOLD

logger = get_logger(__name__, log_level="INFO")


def check_xformers(args: argparse.Namespace) -> None:
    """Refuse ``--enable_xformers_memory_efficient_attention`` where it cannot run, saying what to do."""
    if not args.enable_xformers_memory_efficient_attention:
        return
    if not torch.cuda.is_available():
        raise ValueError(
            "--enable_xformers_memory_efficient_attention needs a CUDA GPU, and this machine has none: drop the flag "
            "(diffusers already uses PyTorch's scaled_dot_product_attention, which is as memory-efficient)."
        )
    try:
        import xformers  # noqa: F401  (optional dependency)
    except ImportError as err:
        raise ValueError(
            "--enable_xformers_memory_efficient_attention needs xformers: `pip install xformers` (built for your "
            "torch), or drop the flag (PyTorch's scaled_dot_product_attention is used then)."
        ) from err


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The Accelerator (seeded data order, so a resumed run sees the batches an uninterrupted one would), logging,
    seed and output folder."""
    check_xformers(args)
    # SDXL's first text encoder contributes its penultimate layer only: its last layer's values get no gradient.
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=getattr(args, "train_text_encoder", False))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, args.logging_dir))
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=[ddp_kwargs],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def weight_dtype_of(accelerator: Accelerator) -> torch.dtype:
    """The dtype of the frozen weights under the run's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def plan_steps(args: argparse.Namespace, accelerator: Accelerator, num_examples: int) -> int:
    """Optimizer steps per epoch; sets ``args.max_train_steps`` (from the epochs if not given) and the epochs."""
    batches_per_epoch = math.ceil(num_examples / (args.train_batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    return steps_per_epoch


def resolve_learning_rate(args: argparse.Namespace, config: SaRAConfig, accelerator: Accelerator) -> float:
    """``--learning_rate``, or the paper's fit for the threshold; times the global batch size with ``--scale_lr``."""
    if args.learning_rate is None:
        threshold = config.threshold if config.threshold is not None else DEFAULT_THRESHOLD
        args.learning_rate = paper_learning_rate(threshold)
        if config.threshold is None:  # --trainable_fraction picks the entries; the paper's fit needs a threshold
            logger.info(
                f"Learning rate {args.learning_rate:.3g}: the paper's rate for its default threshold {threshold:g} "
                "(--trainable_fraction sets no threshold; set --learning_rate to choose another)"
            )
        else:
            logger.info(
                f"Learning rate {args.learning_rate:.3g} = paper_learning_rate({threshold:g}) (set --learning_rate "
                "to override)"
            )
    else:
        logger.info(f"Learning rate {args.learning_rate:.3g} (from --learning_rate)")
    if args.scale_lr:
        factor = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate *= factor
        if getattr(args, "text_encoder_lr", None) is not None:
            args.text_encoder_lr *= factor
        logger.info(f"--scale_lr: learning rate x {factor} = {args.learning_rate:.3g}")
    return args.learning_rate


def build_components(
    args: argparse.Namespace, accelerator: Accelerator, modules: dict[str, nn.Module]
) -> list[TrainedComponent]:
    """An AdamW (or 8-bit AdamW), an LR schedule and a SaRA helper per adapted component (call after
    :func:`plan_steps`). Text encoders take ``--text_encoder_lr`` / ``--adam_weight_decay_text_encoder`` if given."""
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb  # optional dependency
        except ImportError as err:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from err
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    learning_rate = resolve_learning_rate(
        args, next(iter(modules.values())).peft_config[DEFAULT_ADAPTER_NAME], accelerator
    )
    components = []
    for index, (name, module) in enumerate(modules.items()):
        is_text_encoder = name in TEXT_ENCODERS
        text_lr = getattr(args, "text_encoder_lr", None)
        text_decay = getattr(args, "adam_weight_decay_text_encoder", None)
        decay = text_decay if is_text_encoder and text_decay is not None else args.adam_weight_decay
        official = getattr(args, "weight_decay_mode", "delta") == "official"
        # The official rule is applied by the helper to the SaRA entries: the optimizer must not decay them as well.
        sara_values = [param for key, param in module.named_parameters() if param.requires_grad and "sara_" in key]
        others = [param for key, param in module.named_parameters() if param.requires_grad and "sara_" not in key]
        groups = [{"params": sara_values, "weight_decay": 0.0 if official else decay}]
        groups += [{"params": others, "weight_decay": decay}] if others else []
        optimizer = optimizer_cls(
            groups,
            lr=text_lr if is_text_encoder and text_lr is not None else learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
        lr_scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=args.max_train_steps * accelerator.num_processes,
            num_cycles=args.lr_num_cycles,
            power=args.lr_power,
        )
        helper = SaRATrainingHelper(
            module,
            optimizer,
            total_steps=args.max_train_steps,
            adapter_name=DEFAULT_ADAPTER_NAME,
            seed=args.seed + index,
            weight_decay=decay if official else 0.0,
            weight_decay_mode="official" if official else "delta",
        )
        components.append(TrainedComponent(name, module, optimizer, lr_scheduler, helper))
    return components


def setup_training(
    args: argparse.Namespace,
    accelerator: Accelerator,
    modules: dict[str, nn.Module],
    train_dataset: torch.utils.data.Dataset,
    collate_fn: Callable[[list], dict[str, Any]],
) -> tuple[list[TrainedComponent], torch.utils.data.DataLoader, int, bool]:
    """The data loader, an optimizer / LR schedule / SaRA helper per adapted component, the resume and
    ``accelerator.prepare``: returns the components, the prepared loader, the steps per epoch and whether DeepSpeed
    runs."""
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        shuffle=True,
        collate_fn=collate_fn,
        batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers,
        # Keeps the loader's own seed draw off the global RNG (whose state checkpoints restore).
        generator=torch.Generator().manual_seed(args.seed),
    )
    steps_per_epoch = plan_steps(args, accelerator, len(train_dataset))
    components = build_components(args, accelerator, modules)
    train_dataloader, deepspeed = prepare_and_resume(args, accelerator, components, train_dataloader)
    return components, train_dataloader, steps_per_epoch, deepspeed


def save_adapter_hook(accelerator: Accelerator, name: str, models: list, weights: list, output_dir: str) -> None:
    """accelerate's save-state hook (DeepSpeed): write the adapter in PEFT format beside DeepSpeed's own states."""
    if accelerator.is_main_process:
        save_injected_adapter(accelerator.unwrap_model(models[0]), os.path.join(output_dir, name), DEFAULT_ADAPTER_NAME)
    weights.clear()  # nothing else to write for the denoiser outside DeepSpeed's checkpoint


def save_engine_checkpoint(accelerator: Accelerator, save_path: str) -> None:
    """DeepSpeed's checkpoint: every rank writes its part with accelerate's ``save_state`` into one staging folder, which
    the main process publishes whole once all have written (``peft_sara.atomic.distributed_folder_writer``), so
    ``latest_checkpoint`` never names a checkpoint a killed job left half written."""
    with distributed_folder_writer(save_path, accelerator.is_main_process, accelerator.wait_for_everyone) as staging:
        accelerator.save_state(str(staging), exclude_frozen_parameters=True)


def resolve_checkpoint(args: argparse.Namespace) -> str | None:
    """The folder ``--resume_from_checkpoint`` names ("latest": the newest in ``--output_dir``, None if none)."""
    if args.resume_from_checkpoint == "latest":
        return latest_checkpoint(args.output_dir)
    path = args.resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(args.output_dir, os.path.basename(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder.")
    return path


def check_engine(accelerator: Accelerator, components: Sequence[TrainedComponent]) -> bool:
    """Whether DeepSpeed runs (then its checkpoints go through accelerate's save_state); refuses what cannot work."""
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "These scripts checkpoint with peft_sara.training.save_training_state, which reads whole (unsharded) SaRA "
            "values: train with DDP or DeepSpeed. FSDP2 works in your own loop (see docs/DISTRIBUTED.md)."
        )
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    if len(components) > 1:
        raise ValueError("Under DeepSpeed these scripts train one model: drop --train_text_encoder, or use DDP.")
    if components[0].helper.progressive_step is not None:
        raise ValueError(
            "DeepSpeed optimizes flattened fp32 copies of the SaRA values, whose state progressive re-selection "
            "cannot re-order: pass --progressive_fraction 0 with DeepSpeed, or train with DDP or FSDP2."
        )
    accelerator.register_save_state_pre_hook(functools.partial(save_adapter_hook, accelerator, components[0].name))
    accelerator.register_for_checkpointing(components[0].helper)
    return True


def prepare_and_resume(
    args: argparse.Namespace,
    accelerator: Accelerator,
    components: list[TrainedComponent],
    train_dataloader: torch.utils.data.DataLoader,
) -> tuple[torch.utils.data.DataLoader, bool]:
    """Resume from ``--resume_from_checkpoint`` if asked, and ``accelerator.prepare`` everything once.

    SaRA checkpoints load before ``prepare``, into the plain optimizers, writing the adapter into the SaRA values in
    place (their size and identity never change, so wrappers stay valid): adapter, optimizer, scheduler, helper
    (global step, re-selection) and RNG states. DeepSpeed checkpoints load after it. Returns the prepared loader and
    whether DeepSpeed runs.
    """
    deepspeed = check_engine(accelerator, components)
    checkpoint = resolve_checkpoint(args) if args.resume_from_checkpoint else None
    if args.resume_from_checkpoint and checkpoint is None:
        logger.info(f"No checkpoint in {args.output_dir}: starting a new run.")
    if checkpoint is not None and not deepspeed:
        resume_from_checkpoint(checkpoint, components, DEFAULT_ADAPTER_NAME)
    count = len(components)
    prepared = accelerator.prepare(
        *[component.model for component in components],
        *[component.optimizer for component in components],
        train_dataloader,
        *[component.lr_scheduler for component in components],
    )
    for index, component in enumerate(components):
        component.prepared = prepared[index]
        component.optimizer = prepared[count + index]
        component.lr_scheduler = prepared[2 * count + 1 + index]
    if checkpoint is not None and deepspeed:
        accelerator.load_state(checkpoint, load_module_strict=False)  # the adapter-only module state
    if checkpoint is not None:
        logger.info(f"Resumed from {checkpoint} at step {components[0].helper.global_step}")
    return prepared[2 * count], deepspeed


def log_training_plan(
    args: argparse.Namespace, accelerator: Accelerator, components: Sequence[TrainedComponent], num_examples: int
) -> None:
    """Log the run's size (examples, epochs, optimizer steps, batch sizes) and each component's SaRA selection."""
    logger.info("***** Running training *****")
    logger.info(
        f"  Examples = {num_examples}, epochs = {args.num_train_epochs}, optimizer steps = {args.max_train_steps}"
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
