"""The flags the SaRA training scripts share, as in diffusers' LoRA scripts (``train_text_to_image_lora.py``,
``train_dreambooth_lora*.py``), and the checks every script applies after parsing. LoRA-only flags stop with a message
that says what to use instead (:data:`NO_SARA_MEANING`)."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence

from sara_data import INTERPOLATION

from peft_sara.conversion import parse_rank

# Flags of diffusers' LoRA scripts that SaRA has no use for, and what to do instead.
_DEEPFLOYD = (
    "is a DeepFloyd IF option of diffusers' train_dreambooth_lora.py; these scripts train SD 1.x/2.x, SDXL, SD3."
)
_ADAMW_ONLY = (
    "these scripts train with AdamW (--use_8bit_adam for bitsandbytes' 8-bit AdamW); Prodigy has not been tried with "
    "SaRA's progressive re-selection."
)
NO_SARA_MEANING = {
    "--rank": "SaRA has no rank: it trains the pre-trained weights whose magnitude is below a threshold. Choose how "
    "many with --threshold (paper: 2e-3, about 6% of SD1.5's UNet; 8e-4 about 2%; 2e-4 about 0.6%) or "
    "--trainable_fraction (e.g. 0.05). For a LoRA file of a given rank, add --export_lora_rank RANK.",
    "--lora_alpha": "SaRA has no LoRA scale: its update counts in full. Set the strength at inference with "
    "pipe.set_adapters([name], [weight]).",
    "--lora_dropout": "SaRA has no dropout: regularise with --lambda_rank (the paper's nuclear-norm low-rank loss).",
    "--use_dora": "DoRA is a LoRA variant; SaRA learns a sparse update of the pre-trained weights, with no magnitude "
    "vector to train.",
    "--lora_layers": "use --target_modules (comma-separated module names or suffixes) to choose SaRA's layers.",
    "--output_kohya_format": "SaRA saves in PEFT format. For kohya / A1111 / ComfyUI, run `peft-sara export "
    "OUTPUT_DIR --format kohya -o lora.safetensors` after training; --export_lora_rank RANK writes a "
    "diffusers-format LoRA as well.",
    "--do_edm_style_training": "EDM-style training (Playground v2.5) is not implemented in these scripts.",
    "--optimizer": _ADAMW_ONLY,
    "--prodigy_beta3": _ADAMW_ONLY,
    "--prodigy_decouple": _ADAMW_ONLY,
    "--prodigy_use_bias_correction": _ADAMW_ONLY,
    "--prodigy_safeguard_warmup": _ADAMW_ONLY,
    "--tokenizer_name": "the pipeline's own tokenizers are used: pass a pipeline folder holding the one you want.",
    "--pre_compute_text_embeddings": _DEEPFLOYD,
    "--tokenizer_max_length": _DEEPFLOYD,
    "--text_encoder_use_attention_mask": _DEEPFLOYD,
    "--class_labels_conditioning": _DEEPFLOYD,
    "--validation_images": _DEEPFLOYD,
    "--enable_npu_flash_attention": "Ascend NPUs are not supported by these scripts.",
    "--debug_loss": "per-file loss logging is not implemented; the loss and the low-rank loss are logged every step.",
}


# ------------------------------------------------------------------------------------------------------- arguments
class _NoSaRAMeaning(argparse.Action):
    """Stops parsing with the message of :data:`NO_SARA_MEANING` for the flag."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string}: {NO_SARA_MEANING[option_string]}")


def export_rank(text: str) -> int | float | str:
    """``--export_lora_rank``: a rank (``8``), ``full`` (exact) or an energy fraction per layer (``0.99``)."""
    try:
        return parse_rank(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_common_arguments(parser: argparse.ArgumentParser, default_output_dir: str) -> None:
    """The flags every script takes: model, training, SaRA, checkpoints, validation, logging, Hub, LoRA export."""
    model = parser.add_argument_group("model").add_argument
    model("--pretrained_model_name_or_path", required=True, help="Base pipeline: Hub id or local folder.")
    model(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="A VAE to use instead of the pipeline's, e.g. madebyollin/sdxl-vae-fp16-fix (which may run in fp16).",
    )
    model("--revision", default=None, help="Revision of the base pipeline.")
    model("--variant", default=None, help="Weights variant of the base pipeline, e.g. fp16.")
    model("--cache_dir", default=None, help="Cache for downloaded models and datasets.")

    train = parser.add_argument_group("training").add_argument
    train("--output_dir", default=default_output_dir, help="Where the adapter, checkpoints and validation go.")
    train("--seed", type=int, default=0, help="Seed of everything random (data order, noise, layer sampling).")
    train("--resolution", type=int, default=512, help="Images are resized (shorter side) and cropped to this size.")
    train("--center_crop", action="store_true", help="Center crop (default: random crop).")
    train("--random_flip", action="store_true", help="Flip images horizontally at random.")
    train(
        "--image_interpolation_mode",
        choices=sorted(INTERPOLATION),
        default="lanczos",
        help="Resampling filter of the resize.",
    )
    train("--train_batch_size", type=int, default=1, help="Batch size per device.")
    train("--num_train_epochs", type=int, default=100)
    train("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    train("--gradient_accumulation_steps", type=int, default=1)
    train("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the trained models.")
    train(
        "--learning_rate",
        type=float,
        default=None,
        help="Default: the paper's fit for the threshold, 1e-3 * exp(-350 * threshold): 4.97e-4 at 2e-3, the default "
        "threshold (also used with --trainable_fraction).",
    )
    train(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by accumulation steps x batch size x number of processes.",
    )
    train(
        "--lr_scheduler",
        default="constant",
        help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant" or "constant_with_warmup".',
    )
    train("--lr_warmup_steps", type=int, default=0)
    train("--lr_num_cycles", type=int, default=1, help="Hard resets of cosine_with_restarts.")
    train("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    train("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW.")
    train("--adam_beta1", type=float, default=0.9)
    train("--adam_beta2", type=float, default=0.999)
    train(
        "--adam_weight_decay",
        type=float,
        default=1e-2,
        help="Decoupled weight decay of the SaRA entries; what it decays: --weight_decay_mode.",
    )
    train(
        "--weight_decay_mode",
        choices=("delta", "official"),
        default="delta",
        help="delta (default): AdamW's own decay of the trained deltas, pulling the update toward the pre-trained "
        "weight, as for any PEFT adapter. official: decay the selected weights toward 0, as the official SaRA code "
        "(optim/adamw2.py) does (SaRATrainingHelper(weight_decay=..., weight_decay_mode='official')).",
    )
    train("--adam_epsilon", type=float, default=1e-8)
    train("--max_grad_norm", type=float, default=1.0)
    train(
        "--prediction_type",
        choices=["epsilon", "v_prediction"],
        default=None,
        help="DDPM models (SD 1.x/2.x, SDXL, AnimateDiff): override the scheduler's prediction type.",
    )
    train(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR loss weighting (Hang et al., 2023); 5.0 is the recommended value. DDPM models only.",
    )
    train(
        "--noise_offset",
        type=float,
        default=0.0,
        help="Per-channel offset noise (helps very dark or bright images; 0.05-0.1 is typical). DDPM models only.",
    )
    train(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Default: accelerate's config. Frozen weights use this dtype; SaRA values stay float32.",
    )
    train("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    train(
        "--base_quantization",
        choices=("none", "bnb-4bit", "bnb-8bit", "quanto-int8", "quanto-int4"),
        default="none",
        help="Quantize the frozen denoiser's Linear layers before training (QLoRA-style: SaRA's values stay float32 "
        "and its forward adds the sparse update to the backend's own). bnb-*: bitsandbytes (NF4 / LLM.int8), "
        "quantized layer by layer on the training device; quanto-*: optimum-quanto, frozen. The saved adapter applies "
        "to the full-precision base.",
    )
    train(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="xformers attention (CUDA only). PyTorch 2's scaled_dot_product_attention, the default, is about as lean.",
    )
    train("--dataloader_num_workers", type=int, default=0)
    train("--local_rank", type=int, default=-1, help="Set by torch.distributed launchers; accelerate reads LOCAL_RANK.")

    sara = parser.add_argument_group("SaRA")
    selection = sara.add_mutually_exclusive_group()
    selection.add_argument(
        "--threshold", type=float, default=None, help="Train weights with |w| < threshold (default 2e-3, the paper's)."
    )
    selection.add_argument(
        "--trainable_fraction",
        type=float,
        default=None,
        help="Train the smallest fraction of each weight by magnitude instead.",
    )
    sara.add_argument(
        "--target_modules",
        default=None,
        help="Comma-separated module names / suffixes to adapt. Default: SaRA's defaults for the denoiser.",
    )
    sara.add_argument(
        "--lambda_rank", type=float, default=0.0, help="Weight of the nuclear-norm low-rank loss (paper: 5e-4)."
    )
    sara.add_argument(
        "--rank_layers_per_step", default="1", help='Layers sampled per step by the low-rank loss, or "all".'
    )
    sara.add_argument(
        "--rank_min_dim", type=int, default=64, help="Layers take part in the low-rank loss if min dim > this."
    )
    sara.add_argument(
        "--progressive_fraction",
        type=float,
        default=0.5,
        help="Re-select the trainable weights after this fraction of the steps (paper: 0.5); 0 disables.",
    )
    sara.add_argument(
        "--progressive_step", type=int, default=None, help="Re-select at this step (overrides the fraction)."
    )

    out = parser.add_argument_group("checkpoints, validation, logging, Hub").add_argument
    out("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    out("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    out("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest" in --output_dir.')
    out("--validation_prompt", default=None, help="Prompt of the validation images.")
    out("--num_validation_images", type=int, default=4, help="Images (motion: clips) per validation, side by side.")
    out("--validation_steps", type=int, default=None, help="Validate every N steps (default 100 without epochs).")
    out("--validation_epochs", type=int, default=None, help="Validate after every N-th epoch (and the first).")
    out("--validation_inference_steps", type=int, default=30, help="Denoising steps of the validation images.")
    out("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    out("--logging_dir", default="logs", help="Tracker logs, relative to --output_dir.")
    out("--push_to_hub", action="store_true", help="Upload the adapter, its card and validation images at the end.")
    out("--hub_model_id", default=None, help="Hub repo (default: the name of --output_dir).")
    out("--hub_token", default=None, help="Hub token (default: the logged-in one).")
    out(
        "--export_lora_rank",
        type=export_rank,
        default=None,
        help="Also write pytorch_lora_weights.safetensors (diffusers format, read by pipe.load_lora_weights) in "
        "--output_dir: the SaRA update as a LoRA of this rank per layer (an integer), 'full' (exact) or an energy "
        "fraction such as 0.99. The card reports the approximation error.",
    )

    for flag in NO_SARA_MEANING:
        parser.add_argument(flag, nargs="?", action=_NoSaRAMeaning, help=argparse.SUPPRESS)


def add_text_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """``--train_text_encoder`` and its learning rate / weight decay, as in diffusers' SDXL DreamBooth-LoRA script."""
    group = parser.add_argument_group("text encoders").add_argument
    group(
        "--train_text_encoder",
        action="store_true",
        help="Add SaRA to the CLIP text encoder(s) too (SD 1.x/2.x and SDXL).",
    )
    group("--text_encoder_lr", type=float, default=None, help="Learning rate of the text encoders (default: same).")
    group("--adam_weight_decay_text_encoder", type=float, default=None, help="Their weight decay (default: same).")


def add_flow_matching_arguments(parser: argparse.ArgumentParser) -> None:
    """SD3 / Flux (rectified flow) flags, as in diffusers' SD3 and Flux scripts."""
    group = parser.add_argument_group("SD3 and Flux").add_argument
    group(
        "--max_sequence_length",
        type=int,
        default=None,
        help="T5 prompt length (default: 77 for SD3, 512 for Flux), in training and validation.",
    )
    group(
        "--weighting_scheme",
        choices=["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"],
        default="logit_normal",
        help="Timestep sampling / loss weighting.",
    )
    group(
        "--precondition_outputs",
        type=int,
        choices=[0, 1],
        default=1,
        help="SD3 only: 1 regresses the clean latents (EDM preconditioning), 0 the flow (noise - latents).",
    )
    group(
        "--guidance_scale",
        type=float,
        default=3.5,
        help="Flux only: the guidance the transformer is conditioned on while training (guidance-distilled models "
        "such as FLUX.1-dev).",
    )


EXAMPLES_EXTRA_HINT = "pip install 'peft-sara[examples]' installs everything the training scripts use"


def check_dependencies(parser: argparse.ArgumentParser, modules: Sequence[str]) -> None:
    """Stop before anything loads when an optional package the script imports later (``datasets``) is missing, with
    the command that installs it."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(
            f"This script needs {', '.join(missing)}, which is not installed: `pip install {' '.join(missing)}` "
            f"({EXAMPLES_EXTRA_HINT})."
        )


def check_common_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace, needs: Sequence[str] = ()
) -> argparse.Namespace:
    """Checks and normalisations every script applies after parsing; ``needs``: optional packages the script imports
    later (checked first, see :func:`check_dependencies`)."""
    backend = getattr(args, "base_quantization", "none").split("-")[0]
    quantizer = {"bnb": "bitsandbytes", "quanto": "optimum"}.get(backend)
    check_dependencies(parser, [*needs, *([quantizer] if quantizer else [])])
    if args.rank_layers_per_step != "all":
        args.rank_layers_per_step = int(args.rank_layers_per_step)
    if args.report_to == "wandb" and args.hub_token is not None:
        parser.error("--hub_token with --report_to wandb would expose the token: log in with `hf auth login` instead.")
    if args.validation_steps is None and args.validation_epochs is None:
        args.validation_steps = 100
    return args
