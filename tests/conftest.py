"""Tiny, seeded models shared by the tests."""

from __future__ import annotations

import os
import sys

if "triton" not in sys.modules and not os.environ.get("TRITON_INTERPRET"):
    import torch

    if not torch.cuda.is_available():
        # Without a GPU, Triton kernels can only run through its interpreter, which must be chosen before Triton is
        # first imported: this lets tests/test_kernels.py check the kernels in this process.
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from torch import nn

import peft_sara  # noqa: F401  (registers the method)
from peft_sara.presets import PRESETS, TINY_SD3_TRANSFORMER, build_model
from peft_sara.tuner.file_format import entries_checksum, split_sara_key


class MLPConv(nn.Module):
    """A small model with every supported layer type."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1x1 = nn.Conv2d(8, 8, 1)
        self.lin0 = nn.Linear(8 * 4 * 4, 32)
        self.lin1 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1x1(torch.relu(self.conv(x))))
        x = torch.relu(self.lin0(x.flatten(1)))
        return self.head(torch.relu(self.lin1(x)))


class Conv1DModel(nn.Module):
    """Two transformers ``Conv1D`` layers, which store their weight as in x out (``hidden=16``: a square one, which a
    weight shape cannot tell from ``nn.Linear``)."""

    def __init__(self, hidden: int = 24) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_fc = Conv1D(hidden, 16)
        self.c_proj = Conv1D(8, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.tanh(self.c_fc(x)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest, and steadily, on one thread (OpenMP spinning dominates on busy 2-core machines)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mlp_conv() -> MLPConv:
    torch.manual_seed(0)
    return MLPConv().eval()


def tiny_unet(seed: int = 0):
    """The presets' tiny SD1.x-shaped UNet (``peft_sara.presets.TINY_UNET``), seeded, in eval mode."""
    return build_model(PRESETS["tiny"], seed).eval()


def unet_inputs(batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([10] * batch),
        "encoder_hidden_states": torch.randn(batch, 6, 32, generator=generator),
    }


def tiny_sd3_transformer(seed: int = 0):
    """The presets' two-block SD3 transformer (``peft_sara.presets.TINY_SD3_TRANSFORMER``), seeded, in eval mode."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TINY_SD3_TRANSFORMER).eval()


def sd3_inputs(batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 5, 32, generator=generator),
        "pooled_projections": torch.randn(batch, 16, generator=generator),
        "timestep": torch.tensor([10] * batch),
    }


def tiny_clip_text(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def train_square_loss(model: nn.Module, x: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    """``steps`` AdamW steps on ``model(x).pow(2).mean()`` over the trainable parameters; the loss before each step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def fuzz_settings(max_examples: int):
    """The hypothesis settings of the fuzz tests: reproducible (derandomized, no example database), no deadline, and
    no health check against slow or large examples (each one saves and loads files)."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def resign(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Recompute every layer's checksum of an adapter's tensors (in place), as a buggy writer would: the file is then
    self-consistent, so only the deeper checks can refuse it."""
    layers: dict[str, dict[str, str]] = {}
    for key in tensors:
        split = split_sara_key(key)
        if split is not None and split[0]:
            layers.setdefault(split[0], {})[split[1]] = key
    for layer_name, keys in layers.items():
        stored = {name: tensors[key] for name, key in keys.items() if name != "sara_checksum"}
        tensors[keys["sara_checksum"]] = entries_checksum(layer_name, stored)
    return tensors
