"""The planner's shortcuts change no number: the optimizer state created without a step is the state a first step
creates, and a plan made with it equals a plan whose optimizer took that step."""

from __future__ import annotations

import pytest
import torch

from peft_sara.planning import PRESETS, MethodSpec, PlanRequest, plan_training_memory, tracker

pytestmark = pytest.mark.usefixtures("one_thread")


def first_step_state(optimizer: torch.optim.Optimizer) -> None:
    """The optimizer state as a whole step on zero gradients creates it (what the planner did before)."""
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def state_layout(optimizer: torch.optim.Optimizer) -> list[dict[str, tuple]]:
    return [
        {key: (tuple(value.shape), value.dtype, value.device) for key, value in optimizer.state[param].items()}
        for group in optimizer.param_groups
        for param in group["params"]
    ]


@pytest.mark.parametrize(
    "make",
    [
        lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, foreach=True),
        lambda params: torch.optim.Adam(params, lr=1e-4, amsgrad=True),
        lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
    ],
    ids=["adamw-foreach", "adam-amsgrad", "sgd-momentum (a step)"],
)
def test_initialized_state_is_the_state_a_first_step_creates(make):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2).to(torch.bfloat16))
    stepped, initialized = make(list(model.parameters())), make(list(model.parameters()))
    first_step_state(stepped)
    tracker.initialize_optimizer_state(initialized)
    assert state_layout(initialized) == state_layout(stepped)
    assert all(param.grad is None for param in model.parameters())


@pytest.mark.parametrize(
    "method",
    [MethodSpec("sara", fraction=0.05), MethodSpec("lora", rank=4), MethodSpec("full")],
    ids=["sara", "lora", "full"],
)
def test_a_plan_equals_the_plan_whose_optimizer_took_a_first_step(method, monkeypatch):
    request = PlanRequest(PRESETS["tiny"], method, resolution=64, batch_size=2, dtype="bfloat16")
    plan = plan_training_memory(request).to_dict()
    with monkeypatch.context() as patch:
        patch.setattr("peft_sara.planning.plan.initialize_optimizer_state", first_step_state)
        stepped = plan_training_memory(request).to_dict()
    plan.pop("seconds"), stepped.pop("seconds")
    assert plan == stepped
