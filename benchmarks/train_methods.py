"""The methods ``benchmarks.train_step`` compares, each prepared on the same model and batch: what it trains, its
optimizer and its step, and the plan that matches the other methods' trainable counts to SaRA's."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from peft import LoraConfig, ShiraConfig, SupertuningConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

import peft_sara
from benchmarks.flags import child_setup
from benchmarks.measure import DTYPES, PhaseClock
from benchmarks.workload import Batch, diffusion_loss, target_layers
from peft_sara.presets import ModelPreset, build_model
from peft_sara.training import sara_layers
from peft_sara.tuner.selection import select_trainable_indices

METHODS: dict[str, str] = {
    "frozen_forward": "frozen base, forward only (torch.no_grad)",
    "floor": "frozen base, forward + backward to the input latents only (no trainable parameters)",
    "full_ft": "full fine-tuning, AdamW on every parameter",
    "lora_r8": "PEFT LoRA r=8 (alpha 8) on SaRA's target modules (Linear + Conv2d)",
    "lora_r64": "PEFT LoRA r=64 (alpha 64) on SaRA's target modules (Linear + Conv2d)",
    "lora_matched": "PEFT LoRA on SaRA's target modules at the rank whose trainable count matches SaRA's",
    "shira": "PEFT SHiRA (random sparse support) on SaRA's Linear targets, r matched to SaRA's Linear count",
    "supertuning": "PEFT Super-Tuning bottom-k (select_top=False) on SaRA's Linear targets, SaRA's Linear count",
    "masked_dense": "target weights fully trainable, dense grads masked to SaRA's entries after backward, AdamW",
    "sara": "peft-sara SaRA, AdamW on the sparse values",
}
DEFAULT_METHODS = tuple(method for method in METHODS if method != "lora_r64")  # `--methods all` adds LoRA r=64
REFERENCE_FULL, REFERENCE_LORA, FLOOR = "full_ft", "lora_r8", "floor"
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 1e-2


# ------------------------------------------------------------------------------------------------ the plan
def sara_config(plan_or_args: dict[str, Any], **overrides: Any) -> peft_sara.SaRAConfig:
    """The SaRA config of this run: default diffusers targets, selection by fraction or threshold."""
    selection = plan_or_args["sara_selection"]
    return peft_sara.SaRAConfig(**selection, **overrides)


def model_dtype(spec: dict[str, Any]) -> torch.dtype:
    """The dtype the run's model is built in (``--dtype``; adapters keep PEFT's float32 weights)."""
    return DTYPES[spec.get("dtype", "float32")]


def make_plan(spec: dict[str, Any]) -> dict[str, Any]:
    """SaRA's targets and per-layer trainable counts, and the matched settings of the other methods (in a child)."""
    preset, device = child_setup(spec)
    model = build_model(preset, spec["seed"], device, model_dtype(spec))
    total_params = sum(param.numel() for param in model.parameters())
    peft_model = get_peft_model(model, sara_config(spec))
    layers = []
    for name, layer in sara_layers(peft_model.get_base_model()):
        base = layer.get_base_layer()
        is_conv = isinstance(base, nn.Conv2d)
        kernel = base.kernel_size[0] * base.kernel_size[1] if is_conv else 1
        groups = base.groups if is_conv else 1
        layers.append(
            {
                "name": name,
                "kind": "conv" if is_conv else "linear",
                "in": layer.in_features,
                "out": layer.out_features,
                "numel": base.weight.numel(),
                "sara_count": layer.num_trainable("default"),
                # LoRA's trainable count per unit of rank: A is (r, in/groups, k, k), B is (out, r, 1, 1) / Linear.
                "lora_per_rank": layer.in_features // groups * kernel + layer.out_features,
            }
        )
    linear = [layer for layer in layers if layer["kind"] == "linear"]
    sara_total = sum(layer["sara_count"] for layer in layers)
    sara_linear = sum(layer["sara_count"] for layer in linear)
    linear_numel = sum(layer["numel"] for layer in linear)

    lora_matched_rank = max(1, round(sara_total / sum(layer["lora_per_rank"] for layer in layers)))
    # SHiRA trains r * (in + out) entries per layer (at most in * out): one global r.
    shira_rank = max(1, round(sara_linear / sum(layer["in"] + layer["out"] for layer in linear)))
    shira_rank = min([shira_rank] + [layer["in"] * layer["out"] // (layer["in"] + layer["out"]) for layer in linear])
    return {
        "sara_selection": spec["sara_selection"],
        "model_parameters": total_params,
        "sara_trainable": sara_total,
        "sara_trainable_linear": sara_linear,
        "targeted_weight_entries": sum(layer["numel"] for layer in layers),
        "linear_weight_entries": linear_numel,
        "target_names": [layer["name"] for layer in layers],
        "linear_target_names": [layer["name"] for layer in linear],
        "num_target_layers": {"linear": len(linear), "conv": len(layers) - len(linear)},
        "lora_matched_rank": lora_matched_rank,
        "shira_rank": shira_rank,
        "supertuning_sparsity": 1.0 - sara_linear / linear_numel,
    }


# ------------------------------------------------------------------------------------------------ one method
class TrainingStep:
    """One method's model, optimizer and step; ``mode`` is 'forward', 'input_grad' or 'train'."""

    def __init__(self, model: nn.Module, batch: Batch, mode: str, optimizer=None, grad_masks=(), save=None):
        self.model, self.batch, self.mode = model, batch, mode
        self.optimizer, self.grad_masks, self.save = optimizer, list(grad_masks), save

    def run(self, clock: PhaseClock) -> None:
        if self.mode == "forward":
            with torch.no_grad():
                diffusion_loss(self.model, self.batch)
            clock.mark("forward")
            return
        loss = diffusion_loss(self.model, self.batch)
        clock.mark("forward")
        loss.backward()
        clock.mark("backward")
        if self.mode == "input_grad":
            for tensor in self.batch.inputs.values():
                if isinstance(tensor, torch.Tensor):  # (SDXL's added_cond_kwargs is a dict)
                    tensor.grad = None
            clock.mark("optimizer")
            return
        for param, mask in self.grad_masks:
            param.grad.mul_(mask)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.mark("optimizer")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [param for param in self.model.parameters() if param.requires_grad]


def _adamw(params: Sequence[nn.Parameter], weight_decay: float = WEIGHT_DECAY) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=weight_decay)


def _peft_step(model: nn.Module, batch: Batch, config) -> TrainingStep:
    peft_model = get_peft_model(model, config)
    params = [param for param in peft_model.parameters() if param.requires_grad]
    return TrainingStep(peft_model, batch, "train", _adamw(params), save=peft_model.save_pretrained)


def _save_tensors(tensors: dict[str, torch.Tensor]):
    def save(directory: str) -> None:
        save_file(
            {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()},
            os.path.join(directory, "weights.safetensors"),
        )

    return save


def setup_method(
    method: str, model: nn.Module, batch: Batch, preset: ModelPreset, plan: dict[str, Any], seed: int
) -> TrainingStep:
    """Prepare ``method`` on ``model`` (in place) and return its step."""
    if method in ("frozen_forward", "floor"):
        model.requires_grad_(False)
        if method == "floor":
            batch.inputs[preset.input_key].requires_grad_(True)
            return TrainingStep(model, batch, "input_grad")
        return TrainingStep(model, batch, "forward")
    if method == "full_ft":
        model.requires_grad_(True)
        return TrainingStep(
            model, batch, "train", _adamw(list(model.parameters())), save=_save_tensors(model.state_dict())
        )
    if method in ("lora_r8", "lora_r64", "lora_matched"):
        rank = {"lora_r8": 8, "lora_r64": 64}.get(method, plan["lora_matched_rank"])
        return _peft_step(
            model, batch, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=plan["target_names"])
        )
    if method == "shira":
        return _peft_step(
            model,
            batch,
            ShiraConfig(r=plan["shira_rank"], random_seed=seed, target_modules=plan["linear_target_names"]),
        )
    if method == "supertuning":
        return _peft_step(
            model,
            batch,
            SupertuningConfig(
                sparsity=plan["supertuning_sparsity"], select_top=False, target_modules=plan["linear_target_names"]
            ),
        )
    if method == "sara":
        return _peft_step(model, batch, sara_config(plan))
    if method == "masked_dense":
        model.requires_grad_(False)
        layers = target_layers(model, plan["target_names"])
        grad_masks = []
        for layer in layers.values():
            weight = layer.weight
            weight.requires_grad_(True)
            indices, _ = select_trainable_indices(weight, **plan["sara_selection"])
            mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
            mask[indices.long()] = True
            grad_masks.append((weight, mask.view_as(weight)))
        # No weight decay: AdamW's decay would move the frozen entries, which a masked baseline must keep.
        optimizer = _adamw([weight for weight, _ in grad_masks], weight_decay=0.0)
        step = TrainingStep(
            model,
            batch,
            "train",
            optimizer,
            grad_masks,
            save=_save_tensors({f"{name}.weight": layer.weight for name, layer in layers.items()}),
        )
        return step
    raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")
