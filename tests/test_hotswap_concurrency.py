"""Hotswapping while other threads run forwards: every forward computes with one adapter whole (the old or the new),
never a mix of layers of both, and never an error."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from peft import get_peft_model
from torch import nn

import peft_sara
from peft_sara.adapter_files import read_adapter_weights
from peft_sara.hotswap import enable_sara_hotswap, hotswap_guard, swap_state_dicts


class Deep(nn.Module):
    def __init__(self, layers: int = 8, width: int = 48) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


@pytest.fixture
def served(tmp_path):
    torch.manual_seed(0)
    base = Deep()
    states = {}
    for name, seed in (("A", 1), ("B", 2)):
        torch.manual_seed(seed)
        config = peft_sara.SaRAConfig(
            target_modules=[
                "blocks.0",
                "blocks.1",
                "blocks.2",
                "blocks.3",
                "blocks.4",
                "blocks.5",
                "blocks.6",
                "blocks.7",
            ],
            trainable_fraction=0.05,
            init_weights=False,
        )
        model = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "sara_values" in param_name:
                    param.normal_(0, 0.5)  # large updates: a mix of A and B layers is far from either
        model.save_pretrained(tmp_path / name)
        states[name] = read_adapter_weights(tmp_path / name)
    server = copy.deepcopy(base)
    enable_sara_hotswap(server, 0.05, target_modules=[f"blocks.{i}" for i in range(8)])
    x = torch.randn(64, 48)
    expected = {}
    for name in ("A", "B"):
        swap_state_dicts([("model", server, states[name])], "default")
        with torch.no_grad():
            expected[name] = server(x)
    assert not torch.equal(expected["A"], expected["B"])
    return server, states, x, expected


def test_concurrent_forwards_see_one_adapter_whole(served, one_thread):
    server, states, x, expected = served
    outputs, errors, stop = [], [], threading.Event()

    def serve():
        try:
            with torch.no_grad():
                while not stop.is_set():
                    outputs.append(server(x))
        except Exception as err:  # noqa: BLE001 - recorded and asserted below
            errors.append(err)

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for swap in range(60):
            swap_state_dicts([("model", server, states["AB"[swap % 2]])], "default")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors
    assert len(outputs) > 20
    mixed = [out for out in outputs if not (torch.equal(out, expected["A"]) or torch.equal(out, expected["B"]))]
    assert not mixed, f"{len(mixed)} of {len(outputs)} forwards computed with a mix of adapters"


def test_a_guard_keeps_one_adapter_and_a_swap_inside_it_is_refused(served):
    server, states, x, expected = served
    swap_state_dicts([("model", server, states["A"])], "default")
    with hotswap_guard(server):
        with pytest.raises(RuntimeError, match="wait for itself"):
            swap_state_dicts([("model", server, states["B"])], "default")
        with torch.no_grad():
            assert torch.equal(server(x), expected["A"])  # nested forward inside the guard: re-entrant
    swapper = threading.Thread(target=swap_state_dicts, args=([("model", server, states["B"])], "default"))
    with hotswap_guard(server):
        swapper.start()
        swapper.join(timeout=0.2)
        assert swapper.is_alive()  # the swap waits for the guard
        with torch.no_grad():
            assert torch.equal(server(x), expected["A"])
    swapper.join()
    with torch.no_grad():
        assert torch.equal(server(x), expected["B"])


def test_a_model_with_a_slot_still_copies(served):
    server, _, x, expected = served
    clone = copy.deepcopy(server)
    with torch.no_grad():
        assert torch.equal(clone(x), server(x))
