"""SaRA -> LoRA by truncated SVD, one layer at a time, with the error each truncation makes
(:func:`convert_to_lora` for a whole pipeline or model).

A layer's update ``Delta_W`` (from :meth:`peft_sara.tuner.layer.SaRALayer.get_sparse_update`) is viewed as a matrix
``out x in * prod(kernel)`` (transformers' ``Conv1D`` stores its weight transposed: ``in x out``, transposed back here)
and factorised as ``up @ down`` from its SVD, the singular values split evenly (``sqrt(S)`` on each side, which keeps
both factors in the same range for half-precision files). Convolutions take the LoCon layout: ``down`` is a k x k
convolution to ``rank`` channels, ``up`` a 1 x 1 convolution, exactly the layers PEFT's LoRA builds for a conv.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..tuner.file_format import CONV, LayerLayout

if TYPE_CHECKING:
    from ..tuner.functional import SparseUpdate
    from .sources import ExportSource

# The ranks an export accepts: a fixed rank, "full" (exact up to float error) or an energy fraction in (0, 1].
Rank = int | float | str
FULL_RANK = "full"


def parse_rank(value: Rank) -> Rank:
    """Normalise a rank given in Python or on the command line: ``8`` / ``"8"``, ``"full"``, ``0.99`` / ``"0.99"``."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == FULL_RANK:
            return FULL_RANK
        try:
            value = int(text) if text.isdigit() else float(text)
        except ValueError:
            raise ValueError(
                f"Invalid rank {value!r}: pass a positive integer, 'full', or an energy fraction in (0, 1] such as 0.99."
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid rank {value!r}: pass a positive integer, 'full', or a fraction in (0, 1].")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"Invalid rank {value}: a fixed rank must be at least 1.")
        return value
    if not 0 < value <= 1:
        raise ValueError(
            f"Invalid energy fraction {value}: it must lie in (0, 1] (the share of sum(S^2) each layer keeps)."
        )
    return float(value)


def describe_rank(rank: Rank) -> str:
    """Human-readable form of a rank choice, for reports."""
    if rank == FULL_RANK:
        return "full (exact)"
    if isinstance(rank, float):
        return f"energy {rank:g} per layer"
    return f"rank {rank}"


def delta_matrix(update: SparseUpdate, transposed: bool = False) -> torch.Tensor:
    """The dense update as a float32 (float64 for float64 values) ``out x in * prod(kernel)`` matrix."""
    dense = update.to_dense()
    if dense.dtype not in (torch.float32, torch.float64):
        dense = dense.float()
    if transposed:
        dense = dense.t()
    return dense.reshape(dense.shape[0], -1)


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    """Number of singular values above ``max(S) * max(shape) * eps`` (the usual numerical-rank tolerance)."""
    if singular_values.numel() == 0 or float(singular_values[0]) == 0:
        return 0
    tolerance = float(singular_values[0]) * max(shape) * torch.finfo(singular_values.dtype).eps
    return int((singular_values > tolerance).sum())


def effective_rank(singular_values: torch.Tensor) -> float:
    """``exp`` of the entropy of the normalised singular values (Roy & Vetterli); 0 for a zero matrix."""
    total = float(singular_values.sum())
    if total == 0:
        return 0.0
    probabilities = singular_values[singular_values > 0] / total
    return math.exp(-float((probabilities * probabilities.log()).sum()))


def choose_rank(singular_values: torch.Tensor, shape: tuple[int, int], rank: Rank) -> int:
    """The rank one layer is exported at: fixed (at most the matrix's), its numerical rank, or an energy cut-off."""
    exact = numerical_rank(singular_values, shape)
    if exact == 0:
        return 0
    if rank == FULL_RANK:
        return exact
    if isinstance(rank, float):
        energy = singular_values.double() ** 2
        cumulative = torch.cumsum(energy, 0) / energy.sum()
        # smallest k whose top-k singular values hold at least `rank` of the energy (float rounding aside)
        return min(int(torch.searchsorted(cumulative, torch.tensor(rank - 1e-12, dtype=cumulative.dtype))) + 1, exact)
    return min(int(rank), min(shape))


@dataclass
class LayerFactors:
    """One layer's LoRA: ``Delta_W ~= up @ down`` in the layout of the module kind, and how well it fits.

    ``down`` is ``(rank, in)`` for linear layers and ``(rank, in, *kernel)`` for convs; ``up`` is ``(out, rank)`` and
    ``(out, rank, 1, ...)``. ``error`` is ``||Delta_W - up @ down||_F / ||Delta_W||_F`` measured on the factors.
    """

    name: str
    kind: str
    down: torch.Tensor
    up: torch.Tensor
    rank: int
    norm: float
    residual: float
    max_rank: int
    effective_rank: float

    @property
    def error(self) -> float:
        """Relative Frobenius error of the factors (0 for a zero update)."""
        return self.residual / self.norm if self.norm else 0.0

    def delta(self) -> torch.Tensor:
        """``up @ down`` as a matrix ``out x in * prod(kernel)``."""
        return self.up.reshape(self.up.shape[0], -1) @ self.down.reshape(self.down.shape[0], -1)


def factorize(name: str, update: SparseUpdate, layout: LayerLayout, rank: Rank) -> LayerFactors:
    """Truncated-SVD LoRA factors of one layer's update (rank 0 and empty factors for a zero update)."""
    kind = layout.kind
    matrix = delta_matrix(update, transposed=layout.transposed)
    left, singular_values, right = torch.linalg.svd(matrix, full_matrices=False)
    chosen = choose_rank(singular_values, tuple(matrix.shape), rank)
    root = singular_values[:chosen].sqrt()
    up = left[:, :chosen] * root
    down = root[:, None] * right[:chosen]
    norm = float(torch.linalg.vector_norm(matrix))
    residual = float(torch.linalg.vector_norm(matrix - up @ down)) if chosen else norm
    if kind == CONV:
        weight_shape = tuple(update.weight_shape)
        down = down.reshape(chosen, *weight_shape[1:])
        up = up.reshape(weight_shape[0], chosen, *([1] * (len(weight_shape) - 2)))
    return LayerFactors(
        name=name,
        kind=kind,
        down=down.contiguous(),
        up=up.contiguous(),
        rank=chosen,
        norm=norm,
        residual=residual,
        max_rank=min(matrix.shape),
        effective_rank=effective_rank(singular_values),
    )


@dataclass
class LoRAExport:
    """The LoRA factors of an adapter, per component (``"unet"``, ``"text_encoder"``, ...) and module name."""

    rank: Rank
    components: dict[str, dict[str, LayerFactors]] = field(default_factory=dict)

    def layers(self) -> list[tuple[str, LayerFactors]]:
        """(component, factors) of every exported layer, in order."""
        return [(component, f) for component, layers in self.components.items() for f in layers.values()]

    @property
    def total_error(self) -> float:
        """``sqrt(sum ||E_l||^2) / sqrt(sum ||Delta_W_l||^2)`` over all layers: the whole adapter's relative error."""
        residual = sum(f.residual**2 for _, f in self.layers())
        norm = sum(f.norm**2 for _, f in self.layers())
        return math.sqrt(residual / norm) if norm else 0.0

    @property
    def max_error(self) -> float:
        """The largest per-layer relative error."""
        return max((f.error for _, f in self.layers()), default=0.0)

    def parameter_count(self) -> int:
        """Number of LoRA parameters (both factors of every layer)."""
        return sum(f.down.numel() + f.up.numel() for _, f in self.layers())

    def summary(self) -> dict:
        """A JSON-ready report: the rank choice, per-layer rank and error, totals."""
        return {
            "rank": self.rank,
            "total_relative_error": self.total_error,
            "max_layer_relative_error": self.max_error,
            "lora_parameters": self.parameter_count(),
            "layers": [
                {
                    "component": component,
                    "module": f.name,
                    "kind": f.kind,
                    "rank": f.rank,
                    "max_rank": f.max_rank,
                    "effective_rank": round(f.effective_rank, 3),
                    "delta_norm": f.norm,
                    "relative_error": f.error,
                }
                for component, f in self.layers()
            ],
        }


# ------------------------------------------------------------------------------------------------- whole adapters
def convert_to_lora(
    source: Any,
    rank: Rank = "full",
    adapter_name: str | None = None,
    component: str | None = None,
    components: Sequence[str] | None = None,
    progress: bool = False,
) -> LoRAExport:
    """LoRA factors of a SaRA adapter, per component and layer, with each layer's relative Frobenius error.

    Args:
        source: A ``DiffusionPipeline`` with a SaRA adapter, a ``PeftModel``, a model with an injected adapter, or an
            adapter's files (:func:`peft_sara.conversion.read_adapter_files`: no base model needed).
        rank: A fixed rank (capped at each layer's size), ``"full"`` (each layer's numerical rank: exact up to float
            error) or an energy fraction in (0, 1] (per layer, the fewest singular values holding that share of
            ``sum(S^2)``).
        adapter_name: Which adapter (may be omitted when there is one).
        component: For a single model, the pipeline component it is (default: from its class).
        components: For a pipeline, only these components.
        progress: Show a progress bar.
    """
    rank = parse_rank(rank)
    from .files import resolve_export_source  # imports diffusers and PEFT (pipelines, live models)

    return factorize_source(resolve_export_source(source, adapter_name, component, components), rank, progress)


def factorize_source(source: ExportSource, rank: Rank, progress: bool = False) -> LoRAExport:
    """LoRA factors of every layer of a resolved source (``rank`` as :func:`parse_rank` returns it); raises a
    ``ValueError`` naming a layer LoRA cannot express (grouped or dilated convolutions, ...) before any SVD."""
    work = source.layers()
    problems = [problem for c, name, layer in work if (problem := layer.layout.lora_problem(f"{c}.{name}"))]
    if problems:
        raise ValueError(problems[0] + (f" ({len(problems) - 1} more such layers.)" if len(problems) > 1 else ""))
    export = LoRAExport(rank=rank)
    for component_name, name, layer in tqdm(work, desc=f"SVD ({describe_rank(rank)})", disable=not progress):
        factors = factorize(name, layer.read_update(), layer.layout, rank)
        export.components.setdefault(component_name, {})[name] = factors
    return export


__all__ = [
    "Rank",
    "FULL_RANK",
    "LayerFactors",
    "LoRAExport",
    "parse_rank",
    "describe_rank",
    "factorize",
    "factorize_source",
    "convert_to_lora",
    "choose_rank",
    "effective_rank",
    "numerical_rank",
    "delta_matrix",
]
