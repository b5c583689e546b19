"""The selection picks exactly the entries of its definition: the k smallest magnitudes, ties broken by position (the
first k of a stable ascending argsort of |w| in float32), or every |w| < threshold; whatever path the one-pass
selection takes (sampled bound, bound that falls short, NaNs, ties at the cutoff, half-precision weights)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from conftest import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from peft_sara.tuner import selection
from peft_sara.tuner.selection import select_trainable_indices, threshold_cutoff


def reference_fraction(weight: torch.Tensor, fraction: float) -> tuple[torch.Tensor, float]:
    """The definition, written plainly: sort |w| (float32) stably, take the first k positions, in ascending order."""
    magnitudes = weight.detach().reshape(-1).abs().float().numpy()
    count = min(magnitudes.size, max(1, round(fraction * magnitudes.size)))
    order = np.argsort(magnitudes, kind="stable")  # NaN last, like torch's stable sort
    return torch.from_numpy(np.sort(order[:count])), float(magnitudes[order[count - 1]])


def reference_threshold(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    magnitudes = weight.detach().reshape(-1).abs().float().numpy()
    return torch.from_numpy(np.flatnonzero(magnitudes < np.float32(threshold)))


def assert_same_selection(got: tuple[torch.Tensor, float], expected: tuple[torch.Tensor, float]) -> None:
    indices, cutoff = got
    expected_indices, expected_cutoff = expected
    assert torch.equal(indices.long(), expected_indices.long())
    assert cutoff == expected_cutoff or (np.isnan(cutoff) and np.isnan(expected_cutoff))


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@st.composite
def weights(draw) -> torch.Tensor:
    """Weights with many ties: integer levels (quantized magnitudes, zeros, signs), optionally scaled, in any dtype,
    with the odd NaN / inf."""
    size = draw(st.integers(1, 3000))
    levels = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):
        values = torch.randint(-levels, levels + 1, (size,), generator=generator).float() / levels
    else:
        values = torch.randn(size, generator=generator)
    special = draw(st.sampled_from(["none", "nan", "inf", "zeros"]))
    if special != "none":
        where = torch.rand(size, generator=generator) < draw(st.sampled_from([0.01, 0.3, 0.99]))
        values[where] = {"nan": torch.nan, "inf": -torch.inf, "zeros": -0.0}[special]
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from([(size,), (1, size)]))
    return values.to(dtype).reshape(shape)


@contextlib.contextmanager
def pass_sizes(sample_size: int, chunk_size: int):
    """Small samples make the estimated bound fall short or overshoot, small chunks put ties and candidates across
    chunk borders: every path must give the definition's entries."""
    original = selection.SAMPLE_SIZE, selection.CHUNK_SIZE
    selection.SAMPLE_SIZE, selection.CHUNK_SIZE = sample_size, chunk_size
    try:
        yield
    finally:
        selection.SAMPLE_SIZE, selection.CHUNK_SIZE = original


SAMPLE_SIZES = st.sampled_from([16, 64, selection.SAMPLE_SIZE])
CHUNK_SIZES = st.sampled_from([7, 256, selection.CHUNK_SIZE])


@fuzz_settings(max_examples=300)
@given(weight=weights(), fraction=st.floats(1e-4, 1.0), sample_size=SAMPLE_SIZES, chunk_size=CHUNK_SIZES)
def test_fraction_selects_the_first_k_of_a_stable_argsort(weight, fraction, sample_size, chunk_size):
    with pass_sizes(sample_size, chunk_size):
        got = select_trainable_indices(weight, trainable_fraction=fraction)
    assert_same_selection(got, reference_fraction(weight, fraction))


@fuzz_settings(max_examples=200)
@given(
    weight=weights(),
    threshold=st.sampled_from([1e-3, 2e-3, 0.0019989013671875, 0.05, 0.5, 1.0, 3.0]),
    chunk_size=CHUNK_SIZES,
)
def test_threshold_selects_exactly_the_magnitudes_below_it_in_float32(weight, threshold, chunk_size):
    with pass_sizes(selection.SAMPLE_SIZE, chunk_size):
        indices, cutoff = select_trainable_indices(weight, threshold=threshold)
    assert torch.equal(indices.long(), reference_threshold(weight, threshold))
    assert cutoff == threshold_cutoff(threshold)


def test_selection_beyond_two_to_the_24_entries_breaks_ties_by_exact_position():
    # Past 2**24 positions a float32 can no longer tell neighbours apart: ties straddle that position here.
    numel = 2**24 + 4099
    magnitudes = torch.full((numel,), 0.5)
    magnitudes[: 2**24 - 3] = 0.75  # the smallest (0.25) and the tied (0.5) entries all lie around and past 2**24
    magnitudes[2**24 + 7 :: 3] = 0.25
    weight = magnitudes * torch.where(torch.arange(numel) % 2 == 0, 1.0, -1.0)
    fraction = 3000 / numel
    indices, cutoff = select_trainable_indices(weight, trainable_fraction=fraction)
    smallest = torch.arange(2**24 + 7, numel, 3)
    tied = torch.arange(2**24 - 3, numel)
    tied = tied[magnitudes[tied] == 0.5][: 3000 - smallest.numel()]
    assert cutoff == 0.5
    assert indices.dtype == torch.int32
    assert torch.equal(indices.long(), torch.sort(torch.cat([smallest, tied])).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selection_of_a_large_quantized_weight_matches_the_stable_argsort(dtype):
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randint(-20, 21, (1500, 3000), generator=generator).float() / 400).to(dtype)
    assert_same_selection(select_trainable_indices(weight, trainable_fraction=0.02), reference_fraction(weight, 0.02))


def test_selection_leaves_the_global_random_state_alone():
    weight = torch.randn(300, 400)  # large enough to draw a sample
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    select_trainable_indices(weight, trainable_fraction=0.05)
    assert torch.equal(torch.rand(4), expected)
