"""One rank of the multi-process training tests (``tests/test_distributed.py``); also runs as a single process.

A plain training loop over a small conv + linear model with a SaRA adapter, the low-rank loss and progressive
re-selection at ``--reselect_step``; a resumable checkpoint at ``--checkpoint_step``; then a second run resumed from it
into a freshly built model. Both with AdamW (whose per-entry moments re-selection re-orders) and with SGD + momentum
(linear in the gradients, so runs that differ only by float rounding stay within float tolerance; Adam's normalisation
turns rounding noise in near-zero gradients into +-lr steps). Each rank writes its adapter tensors
(``<optimizer>-<run>-rank<i>.pt``) to ``--output_dir``.

``--engine accelerate`` (under ``accelerate launch``, or alone): ``accelerator.prepare(model, optimizer)`` once per
run, DDP across processes. ``--engine fsdp2`` (under ``torch.distributed.run``): ``fully_shard`` on the whole model,
mixed ``requires_grad``, on CPU (gloo) or ``--device cuda`` (NCCL, one GPU per rank); no checkpoint
(``save_training_state`` writes from one process and refuses sharded values).
Every rank sees its slice of the same global batch, so all runs see the same data per optimizer step.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from accelerate import Accelerator
from peft import get_peft_model
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import peft_sara  # noqa: F401  (registers the method)
from peft_sara import SaRAConfig
from peft_sara.training import SaRATrainingHelper, load_training_state, save_training_state
from peft_sara.tuner.selection import gathered

GLOBAL_BATCH = 4
TARGETS = ["conv", "lin0", "lin1"]


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.lin0 = nn.Linear(8 * 4 * 4, 32)
        self.lin1 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def build(
    args: argparse.Namespace, optimizer_name: str, device: torch.device
) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    config = SaRAConfig(
        target_modules=TARGETS,
        threshold=0.05,
        progressive_step=args.reselect_step,
        lambda_rank=args.lambda_rank,
        rank_min_dim=4,
        rank_layers_per_step=1,
    )
    model = get_peft_model(TinyNet().to(device), config)
    if args.engine == "fsdp2":
        fully_shard(model, mesh=init_device_mesh(device.type, (dist.get_world_size(),)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer_name == "adamw":
        return model, torch.optim.AdamW(trainable, lr=1e-2, weight_decay=1e-2)
    return model, torch.optim.SGD(trainable, lr=0.5, momentum=0.9, weight_decay=1e-2)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 3, 4, 4, generator=generator), torch.randn(GLOBAL_BATCH, 4, generator=generator)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every SaRA tensor of the model, whole (sharded ones gathered), values Parameters at full capacity."""
    tensors = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if "sara_" in name:
            tensors[name] = gathered(tensor).detach().cpu().clone()
    return tensors


class Run:
    """The engine-specific pieces of one process: its rank, how to wrap, back-propagate and unwrap."""

    def __init__(self, engine: str, device_type: str) -> None:
        self.engine = engine
        if engine == "accelerate":
            self.accelerator = Accelerator()
            self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
            self.device = self.accelerator.device
        else:
            if device_type == "cuda":
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.device = torch.device(device_type, torch.cuda.current_device() if device_type == "cuda" else None)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        if self.engine == "accelerate":
            return self.accelerator.prepare(model, optimizer)
        return model, optimizer  # fully_shard wrapped the model in place

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine == "accelerate":
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def train(run: Run, model, optimizer, helper: SaRATrainingHelper, steps: range, save=None) -> None:
    """Optimizer steps over this rank's slice of each global batch; ``save(step)`` after each step if given."""
    per_rank = GLOBAL_BATCH // run.world
    rows = slice(run.rank * per_rank, (run.rank + 1) * per_rank)
    for step in steps:
        x, y = (tensor[rows].to(run.device) for tensor in global_batch(step))
        loss = nn.functional.mse_loss(model(x), y) + helper.regularization()
        run.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        helper.step()
        if save is not None:
            save(step + 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["accelerate", "fsdp2"], default="accelerate")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="fsdp2 only (accelerate decides)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--reselect_step", type=int, default=3)
    parser.add_argument("--checkpoint_step", type=int, default=4)
    parser.add_argument("--lambda_rank", type=float, default=1e-2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = Run(args.engine, args.device)

    for optimizer_name in ("adamw", "sgd"):
        checkpoint_dir = os.path.join(args.output_dir, optimizer_name, "checkpoint")

        # The uninterrupted run: one `prepare`, re-selection at --reselect_step, a checkpoint at --checkpoint_step.
        inner, optimizer = build(args, optimizer_name, run.device)
        model, optimizer = run.prepare(inner, optimizer)
        values_params = [p for n, p in inner.named_parameters() if "sara_values" in n]
        helper = SaRATrainingHelper(inner, optimizer, total_steps=args.steps)

        def save(step: int) -> None:
            if step == args.checkpoint_step and run.engine == "accelerate":
                if run.rank == 0:
                    save_training_state(checkpoint_dir, inner, optimizer, helper=helper)  # noqa: B023
                run.barrier()

        train(run, model, optimizer, helper, range(args.steps), save)
        assert helper.reselected
        # Re-selection kept every values Parameter (the ones DDP and FSDP2 registered their hooks on).
        assert [p for n, p in inner.named_parameters() if "sara_values" in n] == values_params
        torch.save(adapter_tensors(inner), os.path.join(args.output_dir, f"{optimizer_name}-full-rank{run.rank}.pt"))
        if run.engine != "accelerate":
            continue

        # The resumed run: a fresh model prepared first, then the checkpoint loaded into it in place.
        inner, optimizer = build(args, optimizer_name, run.device)
        model, optimizer = run.prepare(inner, optimizer)
        helper = SaRATrainingHelper(inner, optimizer, total_steps=args.steps)
        load_training_state(checkpoint_dir, inner, optimizer, helper=helper)
        assert helper.reselected and helper.global_step == args.checkpoint_step
        train(run, model, optimizer, helper, range(args.checkpoint_step, args.steps))
        torch.save(adapter_tensors(inner), os.path.join(args.output_dir, f"{optimizer_name}-resumed-rank{run.rank}.pt"))
    run.barrier()
    if run.engine == "fsdp2":
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
